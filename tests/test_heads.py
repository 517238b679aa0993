"""Synthetic raw heads and brain extraction: determinism, the brain inside the head, poses, grids, shipped weights."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from custom_nets.brainmask import (
    DEFAULT_BRAIN_EXTRACTOR_WEIGHTS,
    _back_to_grid,
    clean_mask,
    extract_brain_mask,
    load_brain_extractor,
)
from custom_nets.brainmask_train import dice
from custom_nets.data import BrainSynthesizer, HeadSynthesizer, subject_seed
from custom_nets.data.heads import HEAD_CENTRE_MNI, HEAD_LABELS, OUT_OF_VIEW, brain_mask
from custom_nets.data.template import cube_affine
from custom_nets.geometry import resample, voxel_grid, voxel_to_world
from custom_nets.handlers import WeightsIntegrityError
from custom_nets.quality import QualityThresholds

SMALL = {"spatial_size": 40, "pixdim": 8.0}  # the 320 mm head cube at 8 mm


@pytest.fixture(scope="module")
def heads():
    return HeadSynthesizer(**SMALL)


@pytest.fixture(scope="module")
def heads_5mm():
    return HeadSynthesizer(56, 5.0)  # a 280 mm cube at 5 mm: the network resamples it to its 4 mm cube


@pytest.fixture(scope="module")
def extractor():
    return load_brain_extractor()


def _pose(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = rng.uniform(0.5, 2.5)
    pose = np.eye(4)
    pose[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    pose[:3, 3] = rng.uniform(-20, 20, size=3)
    return pose


def test_head_deterministic_and_varied(heads):
    a, b = heads.head(11), heads.head(11)
    assert a.shape == (1, *heads.shape) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, heads.head(12))
    present = set(torch.unique(heads.head(11, cut=False)).tolist())
    # brain, CSF rim, skull, fat, muscle at least; no out-of-view voxel without a cut
    assert {1, 2, 3, 4, 5, 7, 8} <= present and OUT_OF_VIEW not in present and max(present) < len(HEAD_LABELS)
    img = heads.image(a, "t1", 3)
    assert img.shape == (1, *heads.shape) and img.dtype == torch.float32
    assert torch.equal(img, heads.image(a, "t1", 3)) and not torch.equal(img, heads.image(a, "t1", 4))
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # Rician noise in the background, and the head brighter than the background
    background = img[a == 0]
    assert float(background.min()) > 0.0 and float(img[a > 0].mean()) > 3 * float(background.mean())


def test_head_brain_is_the_brain_synthesizers(heads):
    pose = _pose(1)
    brains = BrainSynthesizer(SMALL["spatial_size"], SMALL["pixdim"], centre=HEAD_CENTRE_MNI)
    truth = BrainSynthesizer.labels(brains.subject(21, pose)).long()
    labels = heads.head(21, pose, cut=False)
    inside = truth > 0
    assert torch.equal(labels[inside], truth[inside])
    assert torch.equal(brain_mask(labels) > 0, inside)
    # the head adds more non-brain tissue than there is brain
    assert int((labels > 3).sum()) > int(inside.sum())


def test_pose_moves_the_head_exactly(heads):
    # a 90-degree turn about z through the cube centre plus a 3-voxel shift maps voxel centres onto voxel centres
    centre = torch.from_numpy(heads.affine[:3, 3] + heads.affine[:3, :3] @ ((np.array(heads.shape) - 1) / 2))
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = rot
    pose[:3, 3] = centre - rot @ centre + torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64) * heads.pixdim
    moved = heads.head(5, pose.numpy(), cut=False)[0]
    still = heads.head(5, cut=False)[0]
    # moved[v] = still[u] with world(u) = inv(pose) world(v)
    affine = torch.from_numpy(heads.affine)
    vox = voxel_grid(heads.shape, dtype=torch.float64).reshape(1, -1, 3)
    world = voxel_to_world(vox, affine[None])
    src = voxel_to_world(world, (torch.linalg.inv(affine) @ torch.linalg.inv(pose))[None])[0].round().long()
    ok = ((src >= 0) & (src < torch.tensor(heads.shape))).all(-1)
    got = moved.reshape(-1)[ok]
    want = still[src[ok, 0], src[ok, 1], src[ok, 2]]
    assert float((got == want).float().mean()) > 0.995
    assert float((moved > 0).float().mean()) > 0.05  # a head, not an empty grid


def test_fov_cut_zeroes_slabs(heads):
    labels = heads.head(7, cut=True)
    out = labels[0] == OUT_OF_VIEW
    assert out.any()
    # slabs perpendicular to one grid axis (the head's superior axis, z here)
    assert torch.equal(out, out[:1, :1].expand_as(out))
    img = heads.image(labels, "random", 7)
    assert float(img[0][out].abs().max()) == 0.0 and float(img[0][~out].min()) > 0.0
    assert float(brain_mask(labels)[0][out].sum()) == 0.0


def test_clean_mask_keeps_largest_component_and_fills_holes():
    m = torch.zeros(20, 20, 20, dtype=torch.bool)
    m[2:10, 2:10, 2:10] = True
    m[4:6, 4:6, 4:6] = False  # an enclosed hole
    m[13:16, 13:16, 13:16] = True  # a smaller component
    m[0:3, 16:20, 0:2] = True  # a small component touching the border of the grid
    out = clean_mask(m)
    box = torch.zeros_like(m)
    box[2:10, 2:10, 2:10] = True
    assert torch.equal(out, box)


class _ThresholdNet(nn.Module):
    """An oracle 'network': the brain is whatever is bright in its input cube."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 20.0 + self.dummy


def _oblique_lps_grid() -> tuple[tuple[int, int, int], torch.Tensor]:
    """An LPS, anisotropic (2.5 x 3 x 6 mm), slightly oblique grid covering a head."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([2.5, 3.0, 6.0])
    shape = (96, 80, 40)
    affine[:3, 3] = np.array([0.0, -20.0, -10.0]) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, torch.from_numpy(affine)


def test_extract_brain_mask_lines_up_on_lps_anisotropic_grid():
    shape, affine = _oblique_lps_grid()
    world = voxel_to_world(voxel_grid(shape, dtype=torch.float64).reshape(1, -1, 3), affine[None])[0]
    # an off-centre, asymmetric ellipsoid in world mm: any flip or shift of an axis would move it
    centre = torch.tensor([25.0, -40.0, 10.0], dtype=torch.float64)
    radii = torch.tensor([45.0, 70.0, 35.0], dtype=torch.float64)
    truth = ((((world - centre) / radii) ** 2).sum(-1) < 1).reshape(1, *shape).float()
    image = truth * 900.0 + 40.0 + 5.0 * torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    mask = extract_brain_mask(_ThresholdNet(), image, affine)
    assert mask.shape == (1, *shape) and mask.dtype == torch.float32
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert dice(mask, truth) > 0.95


def test_mask_back_to_the_image_grid_in_slabs():
    soft = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    cube = torch.from_numpy(cube_affine(16, 4.0, (1.0, 2.0, 3.0)))
    shape, affine = _oblique_lps_grid()
    whole = resample(soft, torch.eye(4, dtype=torch.float64), shape, affine, cube)[0] > 0.5
    slabs = _back_to_grid(soft, cube, shape, affine, slab=16000)  # 5 planes of 80 x 40: 96 = 19 x 5 + 1
    assert slabs.dtype == torch.float32 and torch.equal(slabs > 0.5, whole)


def test_extract_brain_mask_errors():
    net = _ThresholdNet()
    with pytest.raises(ValueError, match=r"\(1, I, J, K\)"):
        extract_brain_mask(net, torch.zeros(8, 8, 8), torch.eye(4))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        extract_brain_mask(net, torch.zeros(1, 8, 8, 8), torch.eye(3))
    with pytest.raises(ValueError, match="multiple of 16"):
        extract_brain_mask(net, torch.zeros(1, 8, 8, 8), torch.eye(4), size=40)


@pytest.mark.parametrize("index,contrast", [(0, "t1"), (1, "random")])
def test_shipped_weights_extract_the_brain_of_held_out_raw_heads(extractor, heads_5mm, index, contrast):
    """A floor under the shipped weights, not the target: benchmarks/bench_brainmask.py measured a mean Dice of 0.78
    (min 0.67) on held-out raw heads, short of the 0.95 the raw-head issue asks for (it stays open). An untrained
    network gives about 0 here."""
    synth = heads_5mm
    seed = subject_seed("test", 10_000 + index)
    labels = synth.head(seed, _pose(index), cut=False)
    image = synth.image(labels, contrast, seed)
    mask = extract_brain_mask(extractor, image, torch.from_numpy(synth.affine))
    assert mask.shape == image.shape
    assert dice(mask, brain_mask(labels)) >= 0.6


def test_brain_masking_in_the_preprocessing_strips_heads_and_leaves_brains(extractor, heads_5mm):
    """BrainMaskd: a raw head is multiplied by its (dilated) brain mask, which is stored for the outputs; the same
    brain already skull-stripped is left exactly as it is; a user mask is used as given."""
    from monai.data import MetaTensor

    from custom_nets.data import BrainMaskd

    synth = heads_5mm
    seed = subject_seed("test", 10_000)
    labels = synth.head(seed, _pose(0), cut=False)
    truth = brain_mask(labels)
    head = synth.image(labels, "t1", seed)
    affine = torch.from_numpy(synth.affine)
    masking = BrainMaskd(["fixed_image", "moving_image"], extractor)
    out = masking(
        {"fixed_image": MetaTensor(head, affine=affine), "moving_image": MetaTensor(head * truth, affine=affine)}
    )
    stripped, mask = out["fixed_image"].as_tensor(), out["fixed_brainmask"]
    assert mask.dtype == torch.uint8 and mask.shape == head.shape and torch.equal(mask.affine, affine.float())
    assert torch.equal(stripped, head * mask)
    assert float((stripped > 0).sum()) < 0.8 * float((head > 0).sum())  # most of the head is gone
    assert float((truth * mask).sum() / truth.sum()) > 0.9  # most of the brain is kept
    assert torch.equal(out["moving_image"].as_tensor(), head * truth) and "moving_brainmask" not in out
    # a user's mask (a file) is used as it is
    import nibabel as nib

    path = Path(tempfile.mkdtemp()) / "mask.nii.gz"
    nib.save(nib.Nifti1Image(truth[0].numpy().astype(np.uint8), synth.affine), str(path))
    given = BrainMaskd(["fixed_image"], None)({"fixed_image": MetaTensor(head, affine=affine), "fixed_mask": str(path)})
    assert torch.equal(given["fixed_image"].as_tensor(), head * truth)
    assert given["fixed_mask_agreement"] != given["fixed_mask_agreement"]  # NaN: no extractor to compare with
    # with the extractor at hand, a given mask is compared with the extractor's: the right one agrees, one moved
    # 40 mm (onto skull and scalp) does not (quality verdict: QualityThresholds.min_mask_agreement)
    moved = Path(tempfile.mkdtemp()) / "moved.nii.gz"
    nib.save(nib.Nifti1Image(np.roll(truth[0].numpy(), 8, axis=2).astype(np.uint8), synth.affine), str(moved))
    agree = {}
    for name, mask_path in (("right", path), ("moved", moved)):
        item = masking({"fixed_image": MetaTensor(head, affine=affine), "fixed_mask": str(mask_path),
                        "moving_image": MetaTensor(head, affine=affine)})  # fmt: skip
        agree[name] = item["fixed_mask_agreement"]
        assert item["moving_mask_agreement"] != item["moving_mask_agreement"]  # no mask given: not measured
    limit = QualityThresholds().min_mask_agreement
    assert agree["right"] > limit > agree["moved"], agree


def test_tampered_weights_are_refused(tmp_path):
    bundle = DEFAULT_BRAIN_EXTRACTOR_WEIGHTS.parents[1]
    (tmp_path / "models").mkdir()
    shutil.copy(bundle / "large_files.yml", tmp_path / "large_files.yml")
    copy = tmp_path / "models" / DEFAULT_BRAIN_EXTRACTOR_WEIGHTS.name
    shutil.copy(DEFAULT_BRAIN_EXTRACTOR_WEIGHTS, copy)
    net = load_brain_extractor(copy)  # the intact copy matches the recorded SHA-256
    assert not net.training
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match=f"{copy.name}.*does not match"):
        load_brain_extractor(copy)
    with pytest.raises(FileNotFoundError, match="no brain-extractor weights"):
        load_brain_extractor(tmp_path / "models" / "missing.pt")


def test_write_brain_mask_writes_the_mask_on_the_image_grid(extractor, heads_5mm, tmp_path):
    """The MONAI Label brain-mask task's writer: the mask lands on the input's own grid (an LPS file here)."""
    import nibabel as nib

    from custom_nets.brainmask import write_brain_mask

    synth = heads_5mm
    seed = subject_seed("test", 10_001)
    labels = synth.head(seed, _pose(1), cut=False)
    image = synth.image(labels, "t1", seed)[0].numpy()[::-1, ::-1]  # stored LPS
    lps = synth.affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, -1, 0, image.shape[1] - 1], [0, 0, 1, 0],
                                   [0, 0, 0, 1]])  # fmt: skip
    src = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image), lps), str(src))
    stats = write_brain_mask(extractor, src, tmp_path / "mask.nii.gz")
    out = nib.load(str(tmp_path / "mask.nii.gz"))
    assert out.shape == image.shape and np.allclose(out.affine, lps) and out.get_data_dtype() == np.uint8
    truth = brain_mask(labels)[0].numpy()[::-1, ::-1]
    assert dice(torch.from_numpy(np.asarray(out.dataobj) > 0), torch.from_numpy(truth.copy() > 0)) >= 0.6
    assert stats["brain_voxels"] == int((np.asarray(out.dataobj) > 0).sum()) and stats["brain_volume_ml"] > 500
