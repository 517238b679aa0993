"""Data: synthetic pairs, augmentation ground truth, preprocessing round trips, loaders and their errors."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, grid_affine
from monai.data import MetaTensor
from monai.transforms import Compose

from custom_nets.data import (
    BrainSynthesizer,
    LoadVolumed,
    RandAffineMovingd,
    RandFieldOfViewCutd,
    RandPaird,
    SyntheticPairDataset,
    SynthPaird,
    load_datalist,
    load_pair_list,
    preprocessing_transforms,
    sample_pairs,
    save_nifti,
    scan_ixi_folder,
    write_demo_data,
)
from custom_nets.data.transforms import user_mask_key
from custom_nets.geometry import resample, voxel_grid

SMALL = {"spatial_size": 40, "pixdim": 6.4}  # the 256 mm cube at 6.4 mm: tiny and fast


@pytest.fixture(scope="module")
def synth():
    return BrainSynthesizer(**SMALL)


def _centroids(label: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World centroid (mm) of tissue labels 1..3 of a (1, I, J, K) label map."""
    vox = voxel_grid(label.shape[1:], dtype=torch.float64)
    out = []
    for c in (1, 2, 3):
        v = vox[label[0] == c].mean(0)
        out.append(affine[:3, :3] @ v + affine[:3, 3])
    return torch.stack(out)


def _label_fit(image: torch.Tensor, label: torch.Tensor) -> float:
    """R^2 of the image explained by its label map (per-label means): high only if image and labels are aligned."""
    img, lab = image.flatten().double(), label.flatten().long()
    means = torch.zeros(4, dtype=torch.float64).index_add_(0, lab, img) / torch.bincount(lab, minlength=4).clamp_min(1)
    return float(1 - ((img - means[lab]) ** 2).sum() / ((img - img.mean()) ** 2).sum())


def test_synthetic_pair_is_deterministic_under_its_seed(synth):
    make = SynthPaird(synth, contrasts=("t1", "t2", "pd", "random"))
    a, b, c = make({"seed": 5}), make({"seed": 5}), make({"seed": 6})
    for key in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["fixed_image"], c["fixed_image"])
    # training items (no seed) are reproducible through the transform's random state
    make.set_random_state(3)
    first = make({})
    make.set_random_state(3)
    assert torch.equal(first["moving_image"], make({})["moving_image"])
    aug = RandAffineMovingd()
    assert torch.equal(aug(dict(a))["fixed_to_moving"], aug(dict(b))["fixed_to_moving"])


def test_dataset_items_are_the_same_wherever_they_are_loaded(synth):
    kw = {"pair": {"synthesizer": SMALL}, "augment": {}}
    ds1, ds2 = SyntheticPairDataset(4, seed=1, **kw), SyntheticPairDataset(4, seed=1, **kw)
    assert torch.equal(ds1[2]["moving_image"], ds2[2]["moving_image"])
    assert torch.equal(ds1[3]["fixed_to_moving"], ds2[3]["fixed_to_moving"])
    assert not torch.equal(ds1[2]["fixed_to_moving"], ds1[3]["fixed_to_moving"])


def test_images_and_labels_stay_aligned(synth):
    make = SynthPaird(synth, contrasts=("t1", "t2", "pd", "random"), cross_contrast_prob=1.0)
    aug = RandAffineMovingd()
    for seed in range(3):
        d = aug(make({"seed": seed}))
        for side in ("fixed", "moving"):
            img, lab = d[f"{side}_image"], d[f"{side}_label"]
            assert img.shape == lab.shape == (1, 40, 40, 40)
            assert torch.equal(img.affine, lab.affine)
            fit = _label_fit(img, lab)
            assert fit > 0.8, (side, seed, fit)
            # misaligned labels would show: they leave at least twice the unexplained variance
            assert 1 - _label_fit(img, torch.roll(lab, 2, dims=1)) > 2 * (1 - fit)
    t1 = SynthPaird(synth, contrasts=("t1",), cross_contrast_prob=0.0)({"seed": 0})
    assert t1["fixed_contrast"] == "t1"  # the preset ordering on T1: CSF < GM < WM
    img, lab = t1["fixed_image"], t1["fixed_label"]
    m = [img[lab == c].mean() for c in (1, 2, 3)]
    assert m[0] < m[1] < m[2]


def test_ground_truth_carries_label_centroids(synth):
    same = SynthPaird(synth, same_subject_prob=1.0, cross_contrast_prob=1.0)
    aug = RandAffineMovingd(rotation_angle_deg=150.0)  # large rotation about a random axis, scale, shear, shift
    d = aug(same({"seed": 11}))
    gt = d["fixed_to_moving"]
    assert not torch.allclose(gt, torch.eye(4, dtype=torch.float64), atol=0.5)
    cf = _centroids(d["fixed_label"], d["fixed_label"].affine)
    cm = _centroids(d["moving_label"], d["moving_label"].affine)
    mapped = cf @ gt[:3, :3].T + gt[:3, 3]
    assert (mapped - cm).norm(dim=1).max() < 3.2  # half a 6.4 mm voxel
    assert (cf - cm).norm(dim=1).max() > 10  # without the ground truth they are far apart
    other = SynthPaird(synth, same_subject_prob=0.0)({"seed": 12})  # different anatomy: template alignment
    assert other["fixed_subject"] != other["moving_subject"]
    diff = _centroids(other["fixed_label"], other["fixed_label"].affine) - _centroids(
        other["moving_label"], other["moving_label"].affine
    )
    assert diff.norm(dim=1).max() < 6.0


def test_a_posed_subject_keeps_its_anatomy():
    """subject(seed, pose) is the same deformed anatomy moved by exactly pose (the deformation lives in template
    space): probability-weighted tissue centroids and second moments map through the pose."""
    from custom_nets.data import random_affine_matrix

    synth = BrainSynthesizer(spatial_size=64, pixdim=4.0)
    rng = np.random.default_rng(3)
    pose = random_affine_matrix(rng, 0, 0.0, 0.0, 12.0, rotation_angle_deg=70.0, centre=(0, -17, 5))
    base, posed = synth.subject(21), synth.subject(21, pose=pose)
    world = voxel_grid(synth.shape, dtype=torch.float64).reshape(-1, 3) @ torch.as_tensor(synth.affine[:3, :3]).T
    world = world + torch.as_tensor(synth.affine[:3, 3])
    rot, shift = torch.as_tensor(pose[:3, :3]), torch.as_tensor(pose[:3, 3])
    for c in (1, 2, 3):
        wb, wp = base[c].reshape(-1).double(), posed[c].reshape(-1).double()
        mb, mp = (wb[:, None] * world).sum(0) / wb.sum(), (wp[:, None] * world).sum(0) / wp.sum()
        assert (rot @ mb + shift - mp).norm() < 0.3, c
        cb = ((world - mb) * wb[:, None]).T @ (world - mb) / wb.sum()
        cp = ((world - mp) * wp[:, None]).T @ (world - mp) / wp.sum()
        assert (rot @ cb @ rot.T - cp).abs().max() < 0.02 * cb.abs().max(), c
    other = synth.subject(22)  # a different subject really differs
    assert (other[1] - base[1]).abs().mean() > 0.01


def test_augmentation_invents_no_ground_truth(synth):
    """A pair without a ground truth (real scans whose records carry no world_from_template) stays without one: the
    random misalignment alone would claim the two scans were aligned before it."""
    d = SynthPaird(synth)({"seed": 2})
    d.pop("fixed_to_moving")
    out = RandAffineMovingd()(dict(d, seed=5))
    assert "fixed_to_moving" not in out
    assert not torch.allclose(out["moving_image"], d["moving_image"], atol=1e-3)  # it was still misaligned


def test_augmentation_ranges_and_ramp(synth):
    d = SynthPaird(synth)({"seed": 1})
    aug = RandAffineMovingd(ramp=0.0)
    assert torch.allclose(aug(dict(d))["fixed_to_moving"], torch.eye(4, dtype=torch.float64))
    assert torch.allclose(aug(dict(d))["moving_image"], d["moving_image"], atol=1e-5)
    aug.set_ramp(1.0)
    angles = []
    for seed in range(40):
        m = aug(dict(d, seed=seed))["fixed_to_moving"][:3, :3]
        angles.append(
            float(torch.rad2deg(torch.arccos(((torch.trace(m / torch.det(m) ** (1 / 3)) - 1) / 2).clamp(-1, 1))))
        )
    assert max(angles) > 120  # full-range rotations occur


def test_augmentation_ramp_scales_the_rotation_at_start_middle_and_end(synth):
    """With a fixed angle and no scale, shear or shift, the ramp multiplies the rotation exactly: 0, 60 and 120
    degrees at ramp 0, 0.5 and 1; the translation range shrinks with it."""
    d = SynthPaird(synth)({"seed": 1})

    def angle(ramp: float, **kw) -> float:
        aug = RandAffineMovingd(rotation_angle_deg=120.0, scale=0.0, shear=0.0, translate=0.0, ramp=ramp, **kw)
        m = aug(dict(d, seed=3))["fixed_to_moving"][:3, :3]
        return float(torch.rad2deg(torch.arccos(((torch.trace(m) - 1) / 2).clamp(-1, 1))))

    assert [angle(r) for r in (0.0, 0.5, 1.0)] == pytest.approx([0.0, 60.0, 120.0], abs=1e-4)
    shifts = []
    for ramp in (0.25, 1.0):
        aug = RandAffineMovingd(rotate_deg=0.0, scale=0.0, shear=0.0, translate=0.2, ramp=ramp)
        shifts.append(max(float(aug(dict(d, seed=k))["fixed_to_moving"][:3, 3].abs().max()) for k in range(20)))
    half_fov = 0.5 * 40 * float(synth.affine[0, 0])
    assert shifts[0] <= 0.25 * 0.2 * half_fov + 1e-6 < shifts[1] <= 0.2 * half_fov + 1e-6


def test_augmentation_ramp_handler_sets_the_ramp_each_epoch(synth):
    """AugmentationRamp (train.json's ramp_epochs): from ``start`` to 1 linearly over ``ramp_epochs`` epochs, set when
    each epoch starts: 0.1, 0.325, 0.55, 0.775, 1.0 over 5 epochs with ramp_epochs 4."""
    from ignite.engine import Engine, Events

    from custom_nets.handlers import AugmentationRamp

    aug = RandAffineMovingd()
    dataset = type("D", (), {"transform": Compose([aug])})()
    engine = Engine(lambda e, b: None)
    AugmentationRamp(dataset, ramp_epochs=4, start=0.1).attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(aug.ramp))
    engine.run([0], max_epochs=5)
    assert seen == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])
    with pytest.raises(ValueError, match="no RandAffineMovingd"):
        AugmentationRamp(type("D", (), {"transform": Compose([])})(), ramp_epochs=4)


def test_field_of_view_cut_and_its_plane():
    """The cut removes the drawn fraction of the foreground at one end of one voxel axis, from the image and its labels
    alike, and the recorded world plane says exactly which voxels went (checked voxel by voxel on an oblique grid)."""
    affine = grid_affine((3.0, 3.5, 5.0), torch.Generator().manual_seed(2), origin=(-40.0, 30.0, -60.0))
    image = MetaTensor(torch.rand(1, 20, 24, 28) + 0.1, affine=affine)
    label = MetaTensor(torch.ones(1, 20, 24, 28), affine=affine)
    world = (voxel_grid((20, 24, 28), dtype=torch.float64) @ affine[:3, :3].T + affine[:3, 3]).reshape(-1, 3)
    axes, sides = set(), set()
    for seed in range(12):
        cut = RandFieldOfViewCutd(("image", "label"), "fov", prob=1.0, min_fraction=0.2, max_fraction=0.3)
        out = cut({"image": image, "label": label, "seed": seed})
        kept = out["image"].as_tensor()[0] > 0
        assert torch.equal(kept, out["label"].as_tensor()[0] > 0)
        assert torch.equal(out["image"][0][kept], image[0][kept])  # what is kept is untouched
        assert 0.15 <= 1 - kept.float().mean().item() <= 0.3  # whole slabs: a little under the drawn fraction
        plane = out["fov"]
        cut_away = world @ plane[:3] > plane[3]
        assert torch.equal(cut_away, ~kept.reshape(-1))
        along = affine[:3, :3].T @ plane[:3]  # +-1 along the cut voxel axis, 0 along the others
        axes.add(int(torch.argmax(torch.abs(along))))
        assert torch.allclose(torch.sort(torch.abs(along)).values, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        sides.add(bool(kept.reshape(-1)[0]))
        again = cut({"image": image, "label": label, "seed": seed})
        assert torch.equal(again["fov"], plane)  # a function of the seed
    assert axes == {0, 1, 2} and sides == {True, False}  # every axis, both ends
    whole = RandFieldOfViewCutd(("image",), "fov", prob=0.0)({"image": image, "seed": 3})
    assert torch.equal(whole["image"], image) and torch.equal(whole["fov"], torch.zeros(4, dtype=torch.float64))
    fixed = RandFieldOfViewCutd(("image",), "fov", prob=1.0, salt=1)({"image": image, "seed": 3})["fov"]
    moving = RandFieldOfViewCutd(("image",), "fov", prob=1.0, salt=2)({"image": image, "seed": 3})["fov"]
    assert not torch.equal(fixed, moving)  # the two sides of a pair are cut independently
    with pytest.raises(ValueError, match="min_fraction"):
        RandFieldOfViewCutd(("image",), "fov", min_fraction=0.5, max_fraction=0.2)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine)), str(path))
    return str(path)


def _blob(shape, affine, centre_mm, sigma_mm=15.0):
    world = voxel_grid(shape, dtype=torch.float64) @ affine[:3, :3].T + affine[:3, 3]
    return torch.exp(-((world - torch.tensor(centre_mm, dtype=torch.float64)) ** 2).sum(-1) / (2 * sigma_mm**2))


def _intensity_centroid(x, affine):
    world = voxel_grid(x.shape, dtype=torch.float64) @ affine[:3, :3].T + affine[:3, 3]
    return (world * x.double()[..., None]).sum((0, 1, 2)) / x.double().sum()


PREPROCESS_CASES = {
    "lps": (torch.diag(torch.tensor([-4.0, -4.0, 4.0, 1.0], dtype=torch.float64)), (64, 64, 40)),
    "aniso": (torch.diag(torch.tensor([2.5, 3.0, 6.0, 1.0], dtype=torch.float64)), (64, 64, 40)),
    "oblique": (grid_affine((3.0, 3.5, 5.0), torch.Generator().manual_seed(4), origin=(0, 0, 0)), (60, 56, 44)),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_preprocessing_round_trips_lps_anisotropic_oblique(tmp_path, synth, case):
    a, shape = PREPROCESS_CASES[case]
    a = a.clone()
    half = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    a[:3, 3] = torch.tensor([0.0, -17.0, 5.0], dtype=torch.float64) - a[:3, :3] @ half  # brain centre in the middle
    prep = Compose(preprocessing_transforms(("fixed_image",), ("fixed_label",), pixdim=4.0, spatial_size=64))
    # 1. a smooth blob: its world centroid survives orientation, spacing, crop and pad to 0.05 mm
    blob = _blob(shape, a, (10.0, -20.0, 30.0))
    out = prep({"fixed_image": _write(tmp_path / "blob.nii.gz", blob, a)})["fixed_image"]
    assert out.shape == (1, 64, 64, 64) and float(out.max()) == pytest.approx(1.0)
    assert torch.allclose(out.affine[:3, :3].norm(dim=0), torch.full((3,), 4.0, dtype=torch.float64), atol=1e-6)
    err = (_intensity_centroid(out[0].as_tensor(), out.affine) - torch.tensor([10.0, -20.0, 30.0])).norm()
    assert err < 0.05, float(err)
    # 2. a brain with labels: resampling the preprocessed labels back onto the original grid reproduces them
    d = SynthPaird(synth, same_subject_prob=1.0)({"seed": 3})
    img, lab = d["fixed_image"], d["fixed_label"]
    src = resample(img[None].as_tensor(), torch.eye(4), shape, a, img.affine)[0, 0]
    src_lab = resample(lab[None].as_tensor(), torch.eye(4), shape, a, lab.affine, mode="nearest")[0, 0]
    out = prep(
        {
            "fixed_image": _write(tmp_path / "img.nii.gz", src, a),
            "fixed_label": _write(tmp_path / "lab.nii.gz", src_lab, a),
        }
    )
    pl = out["fixed_label"]
    assert torch.equal(pl.affine, out["fixed_image"].affine)
    back = resample(pl[None].as_tensor().float(), torch.eye(4), shape, a, pl.affine, mode="nearest")[0, 0]
    inside = src_lab > 0
    assert (back[inside] == src_lab[inside]).float().mean() > 0.85


@pytest.mark.parametrize("overlay", ["", "groupwise.json"])
def test_the_editable_json_preprocessing_is_the_factory_pipeline(tmp_path, synth, overlay):
    """inference.json spells its preprocessing out as MONAI transforms in JSON (groupwise.json only changes the
    keys); with the shipped values it computes exactly what ``preprocessing_transforms`` (training, evaluation, the
    tests) computes: same keys, same voxels, same affines."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / n) for n in ("inference.json", overlay) if n])
    parser["skull_strip"] = False  # no extractor: user masks only (the extractor has its own tests)
    json_prep = parser.get_parsed_content("preprocessing")
    keys = parser["image_keys"]
    factory = Compose(
        preprocessing_transforms(
            keys, (), parser["pixdim"], parser["spatial_size"], on_disjoint=parser["on_disjoint"],
            refine_pixdim=parser["refine_pixdim"],
        )
    )  # fmt: skip
    d = SynthPaird(synth, same_subject_prob=0.0)({"seed": 5})
    item = {}
    for i, key in enumerate(keys):
        img = d[("fixed_image", "moving_image")[i]]
        shape = (40, 44, 30)
        a = grid_affine((3.0 + i, 3.5, 5.0), torch.Generator().manual_seed(7 + i), origin=(0, 0, 0))
        half = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
        a[:3, 3] = torch.tensor([0.0, -17.0, 5.0], dtype=torch.float64) - a[:3, :3] @ half
        src = resample(img[None].as_tensor(), torch.eye(4), shape, a, img.affine)[0, 0]
        item[key] = _write(tmp_path / f"{key}.nii.gz", src, a)
        if i == 1:  # a user mask on one side
            item[user_mask_key(key)] = _write(tmp_path / "mask.nii.gz", (src > float(src.mean())).float(), a)
    want, got = factory(dict(item)), json_prep(dict(item))
    assert sorted(got) == sorted(want)
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert set(keys) < set(tensors) and len(tensors) >= 2 * len(keys)  # the network inputs and the refine copies
    for k in tensors:
        assert got[k].shape == want[k].shape and torch.equal(got[k].as_tensor(), want[k].as_tensor()), k
        assert torch.equal(got[k].affine, want[k].affine), k


def test_load_volume_errors_name_the_file(tmp_path):
    load = LoadVolumed("img")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load({"img": str(tmp_path / "missing.nii.gz")})
    good = _write(tmp_path / "good.nii.gz", np.random.rand(8, 9, 10), np.eye(4))
    raw = gzip.open(good).read()
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not an image")
    (tmp_path / "text.nii").write_text("not an image either")
    for name in ("trunc.nii.gz", "junk.nii.gz", "text.nii"):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load({"img": str(tmp_path / name)})
    _write(tmp_path / "flat.nii.gz", np.random.rand(30, 40), np.eye(4))
    _write(tmp_path / "series.nii.gz", np.random.rand(8, 8, 8, 3), np.eye(4))
    nan = np.random.rand(8, 8, 8)
    nan[2, 3, 4] = np.nan
    _write(tmp_path / "nan.nii.gz", nan, np.eye(4))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz: expected a .*3D volume"):
        load({"img": str(tmp_path / "flat.nii.gz")})
    with pytest.raises(ValueError, match=r"series\.nii\.gz: expected a single-channel 3D volume, got 3 channel"):
        load({"img": str(tmp_path / "series.nii.gz")})
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: contains NaN"):
        load({"img": str(tmp_path / "nan.nii.gz")})
    _write(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8)), np.eye(4))
    with pytest.raises(ValueError, match=r"zero\.nii\.gz: every voxel is 0"):
        load({"img": str(tmp_path / "zero.nii.gz")})
    assert LoadVolumed("lab", reject_constant=False)({"lab": str(tmp_path / "zero.nii.gz")})["lab"].max() == 0
    assert isinstance(load({"img": good})["img"], MetaTensor)


def test_ixi_folder_and_pair_sampling(tmp_path):
    for subj in ("IXI002-Guys-0828", "IXI012-HH-1211"):
        for mod in ("T1", "T2", "PD", "MRA"):
            _write(tmp_path / f"{subj}-{mod}.nii.gz", np.random.rand(4, 4, 4), np.eye(4))
    _write(tmp_path / "IXI002-Guys-0828-T1_label.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
    recs = scan_ixi_folder(tmp_path)
    assert len(recs) == 6 and {r["modality"] for r in recs} == {"t1", "t2", "pd"}
    assert sum("label" in r for r in recs) == 1
    pairs = sample_pairs(recs, 50, same_subject_prob=1.0, cross_contrast_prob=1.0, seed=0)
    assert all(p["fixed_subject"] == p["moving_subject"] and p["fixed_modality"] != p["moving_modality"] for p in pairs)
    pairs = sample_pairs(recs, 50, same_subject_prob=0.0, cross_contrast_prob=0.0, seed=0)
    assert all(p["fixed_subject"] != p["moving_subject"] and p["fixed_modality"] == p["moving_modality"] for p in pairs)
    assert sample_pairs(recs, 5, seed=3) == sample_pairs(recs, 5, seed=3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_ixi_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no IXI-style"):
        scan_ixi_folder(tmp_path / "empty")


def test_datalist_errors(tmp_path):
    img = _write(tmp_path / "a.nii.gz", np.random.rand(4, 4, 4), np.eye(4))
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "modality": "T2"}]}))
    recs = load_datalist(tmp_path / "list.json", "training")
    assert recs[0]["image"] == img and recs[0]["modality"] == "t2"
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.nii.gz"}, {"image": "gone.nii.gz"}]))
    with pytest.raises(FileNotFoundError, match=r"gone\.nii\.gz.*entry 1"):
        load_datalist(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON"):
        load_datalist(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_datalist(tmp_path / "list.json", "test")


def test_demo_set_via_cli_and_its_ground_truth(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "custom_nets",
        "demo_data",
        "--out_dir",
        str(out),
        "--num_subjects",
        "3",
        "--pixdim",
        "6.4",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    datalist = out / "datalist.json"
    assert res.stdout.strip().endswith(str(datalist))
    recs = load_datalist(datalist)
    assert len(recs) == 9 and {r["modality"] for r in recs} == {"t1", "t2", "pd"}
    assert {r["subject"] for r in load_datalist(datalist, "test")}.isdisjoint(
        r["subject"] for r in load_datalist(datalist, "training")
    )
    pairs = load_pair_list(datalist)
    assert [p["rotation_deg"] for p in pairs] == [0, 45, 90, 135, 180]
    for p in pairs:  # the exact ground truth maps the fixed tissue centroids onto the moving ones (one anatomy)
        f, m = nib.load(p["fixed_label"]), nib.load(p["moving_label"])
        cf = _centroids(torch.tensor(f.get_fdata())[None], torch.tensor(f.affine))
        cm = _centroids(torch.tensor(m.get_fdata())[None], torch.tensor(m.affine))
        gt = torch.tensor(p["fixed_to_moving_ras"], dtype=torch.float64)
        dist = ((cf @ gt[:3, :3].T + gt[:3, 3]) - cm).norm(dim=1)
        # GM and WM agree to a fraction of the 6.4 mm voxel; thin CSF aliases and the fixed field of view cuts some
        assert dist[1:].max() < 2.0 and dist[0] < 8.0, (p["rotation_deg"], dist)
    again = write_demo_data(tmp_path / "again", num_subjects=3, pixdim=6.4, progress=False)
    assert np.array_equal(
        nib.load(str(again.parent / "sub-00_T1.nii.gz")).get_fdata(),
        nib.load(str(out / "sub-00_T1.nii.gz")).get_fdata(),
    )


@pytest.mark.parametrize("typed", ["[t1, pd]", "T1, PD"])
def test_demo_data_contrasts_as_people_type_them(tmp_path, typed):
    """``--contrasts "[t1, pd]"`` (fire's list) and ``"T1, PD"`` (a comma list, upper case: refused before): only
    those contrasts are written, in either form."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "custom_nets", "demo_data", "--out_dir", str(out), "--num_subjects", "3", "--pixdim",
           "6.4", "--contrasts", typed]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = load_datalist(out / "datalist.json")
    assert sorted(r["modality"] for r in recs) == ["pd"] * 3 + ["t1"] * 3
    assert not list(out.glob("*T2*"))


def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    path = save_nifti(np.zeros((3, 3, 3)), np.eye(4), tmp_path / "x.nii.gz")
    assert path.is_file() and not list(tmp_path.glob(".tmp-*"))

    def crash(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.ones((3, 3, 3)), np.eye(4), tmp_path / "x.nii.gz")
    assert not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    assert np.array_equal(nib.load(str(path)).get_fdata(), np.zeros((3, 3, 3)))  # the old file is intact


def test_pairs_carry_a_ground_truth_only_when_every_record_has_one(caplog):
    """Items of a batch need the same keys: with world_from_template on some records only, no pair gets a ground
    truth (with a warning), instead of a collate error deep in the data loader."""
    eye = np.eye(4).tolist()
    shifted = np.eye(4)
    shifted[:3, 3] = [3.0, -2.0, 1.0]
    records = [
        {"image": f"/x/{s}_{m}.nii.gz", "subject": s, "modality": m, "world_from_template": eye}
        for s in ("a", "b")
        for m in ("t1", "t2")
    ]
    records[1]["world_from_template"] = shifted.tolist()
    full = RandPaird(records, same_subject_prob=1.0, cross_contrast_prob=1.0)
    items = [full({"seed": s}) for s in range(8)]
    assert all(isinstance(d["fixed_to_moving"], torch.Tensor) for d in items)
    assert any(not torch.equal(d["fixed_to_moving"], torch.eye(4, dtype=torch.float64)) for d in items)
    del records[2]["world_from_template"]
    with caplog.at_level("WARNING"):
        partial = RandPaird(records, same_subject_prob=1.0, cross_contrast_prob=1.0)
    assert "1 of 4 records have no world_from_template" in caplog.text
    assert all("fixed_to_moving" not in partial({"seed": s}) for s in range(8))


def test_pair_ground_truth_maps_each_fixed_point_to_its_moving_point():
    """sample_pairs composes the records' world_from_template exactly: a template point x appears at W_f x in the
    fixed image and at W_m x in the moving one, so fixed_to_moving must take W_f x to W_m x (for rotations about
    different axes with shifts, the reversed compositions do not)."""
    from custom_nets.data import rotation_matrix, sample_pairs

    def pose(axis, degrees, shift):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rotation_matrix(axis, degrees), shift
        return m

    w = {"a": pose((0, 0, 1), 30.0, (5.0, -2.0, 7.0)), "b": pose((1, 0.5, 0), 70.0, (-3.0, 4.0, 1.0))}
    records = [{"image": f"/x/{s}.nii.gz", "subject": s, "modality": "t1", "world_from_template": w[s].tolist()}
               for s in ("a", "b")]  # fmt: skip
    x = np.array([[10.0, -20.0, 30.0, 1.0], [-40.0, 5.0, 12.0, 1.0]])
    for pair in sample_pairs(records, 6, same_subject_prob=0.0, cross_contrast_prob=0.0, seed=3):
        wf, wm = w[pair["fixed_subject"]], w[pair["moving_subject"]]
        gt = np.asarray(pair["fixed_to_moving"])
        assert np.allclose((wf @ x.T).T @ gt.T, (wm @ x.T).T, atol=1e-9)
        assert not np.allclose(gt, np.linalg.inv(wf) @ wm, atol=1e-3)


def test_a_training_epoch_of_any_length_costs_no_memory():
    """Unseeded training items are drawn lazily: an epoch of 10^7 pairs (an absurd ``epoch_length`` a server request
    could ask for) is not stored, items are fresh dicts, the end is an IndexError."""
    import tracemalloc

    from custom_nets.data import build_pair_dataset, synthetic_pairs

    items = synthetic_pairs(10**7, seed=None)
    assert len(items) == 10**7 and items[0] == {"seed": None} and items[-1] == {"seed": None}
    assert items[0] is not items[0]  # transforms may add keys: never a shared dict
    assert items[2:5] == [{"seed": None}] * 3
    with pytest.raises(IndexError):
        items[10**7]
    tracemalloc.start()
    ds = build_pair_dataset(num_pairs=10**7, seed=None, spatial_size=32, pixdim=8.0, augment=False)
    ds_small = build_pair_dataset(num_pairs=10, seed=None, spatial_size=32, pixdim=8.0, augment=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ds) == 10**7 and len(ds_small) == 10
    assert peak < 1.5 * 2**30, peak  # stored as a list, 10^7 items take about 2 GB more (measured 0.75 GB without)
    pair = ds[1_234_567]
    assert pair["fixed_image"].shape[-3:] == (32, 32, 32)
    # seeded items (evaluation) stay a fixed, reproducible list
    assert (
        synthetic_pairs(3, seed=0) == synthetic_pairs(3, seed=0)
        and len({i["seed"] for i in synthetic_pairs(3, 0)}) == 3
    )
