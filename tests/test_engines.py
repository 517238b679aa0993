"""The engine pieces without the bundle: prepare-batch, error metric, losses."""

import pytest
import torch
from helpers import grid_affine, smooth_image
from monai.data import MetaTensor

from custom_nets import ConvNetDetector, KeyMorph, fit_tps
from custom_nets.engines import KeyMorphPrepareBatch
from custom_nets.geometry import voxel_grid
from custom_nets.losses import KeyMorphLoss, KeypointPretrainLoss
from custom_nets.metrics import RegistrationMetricsd, transform_error_mm


def _batch(b=2, shape=(16, 16, 16)):
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([grid_affine((2.0, 2.0, 2.0), gen) for _ in range(b)])
    img = smooth_image(shape, gen, batch=b)
    lab = (img * 3.99).floor()
    return {
        "fixed_image": MetaTensor(img, affine=a),
        "moving_image": MetaTensor(img.flip(2), affine=a),
        "fixed_label": MetaTensor(lab, affine=a),
        "moving_label": MetaTensor(lab.flip(2), affine=a),
        "fixed_to_moving": torch.eye(4, dtype=torch.float64).expand(b, 4, 4),
    }, a


def test_prepare_batch_reads_affines_and_samples_lambda():
    batch, a = _batch()
    moving, targets, args, kwargs = KeyMorphPrepareBatch()(batch, "cpu")
    assert moving.shape == (2, 1, 16, 16, 16) and args[0].shape == moving.shape
    assert torch.allclose(kwargs["moving_affine"], a) and torch.allclose(targets["fixed_affine"], a)
    assert set(targets) >= {"fixed_image", "fixed_label", "moving_label", "fixed_to_moving"}
    prep = KeyMorphPrepareBatch(transform_type="tps", tps_lambda_max=10.0, tps_lambda_min=0.01)
    torch.manual_seed(3)
    lams = [prep(batch, "cpu")[3]["tps_lambda"] for _ in range(50)]
    assert all(0.01 <= x <= 10.0 for x in lams) and min(lams) < 0.1 < 1.0 < max(lams)  # spread log-uniformly
    torch.manual_seed(3)
    assert prep(batch, "cpu")[3]["tps_lambda"] == lams[0]  # reproducible under the torch seed
    with pytest.raises(KeyError, match="moving_image"):
        KeyMorphPrepareBatch()({"fixed_image": batch["fixed_image"]}, "cpu")


def test_transform_error_in_mm():
    mask = torch.ones(2, 1, 8, 8, 8)
    a = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    truth = torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
    pred = truth.clone()
    pred[1, :3, 3] = torch.tensor([3.0, 0.0, 4.0])
    err = transform_error_mm(pred, truth, mask, a)
    assert torch.allclose(err, torch.tensor([0.0, 5.0], dtype=torch.float64))
    pts = torch.randn(2, 10, 3, dtype=torch.float64) * 5
    spline = fit_tps(pts, pts, lam=0.0)  # the identity as a spline
    assert transform_error_mm(spline, truth, mask, a).max() < 1e-6


def test_metrics_and_loss_terms():
    batch, _ = _batch()
    torch.manual_seed(0)
    net = KeyMorph(ConvNetDetector(num_keypoints=8, channels=(4, 8), pool_after=(0, 1)))
    moving, targets, args, kwargs = KeyMorphPrepareBatch()(batch, "cpu")
    pred = net(moving, *args, **kwargs)
    d = RegistrationMetricsd()({"pred": pred, "label": targets})
    assert d["error_mm"].shape == (2,) and (d["error_mm"] >= 0).all()
    assert d["pred_label"].shape == d["label_onehot"].shape == (2, 4, 16, 16, 16)
    assert ((d["dice"] >= 0) & (d["dice"] <= 1)).all()
    loss = KeyMorphLoss(image_loss=torch.nn.MSELoss(), dice_weight=1.0)
    value = loss(pred, targets)
    assert value.requires_grad and set(loss.last_terms) == {"image", "dice"}
    with pytest.raises(KeyError, match="fixed_label"):
        loss(pred, {k: v for k, v in targets.items() if k != "fixed_label"})
    with pytest.raises(ValueError, match="every term is off"):
        KeyMorphLoss(image_loss=None, dice_weight=0.0)


def test_pretrain_loss_against_a_hand_computation_and_field_of_view_cuts():
    """Mean squared keypoint distance to the reference points (fixed) and to their images under the truth (moving),
    in ``scale_mm`` units; points cut out of an image's field of view leave that image's term."""
    loss = KeypointPretrainLoss(num_keypoints=5, seed=0, scale_mm=4.0)
    ref = loss.reference.double()
    truth = torch.eye(4, dtype=torch.float64)
    truth[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.1]])
    truth[:3, 3] = torch.tensor([5.0, -3.0, 2.0])
    ref_m = ref @ truth[:3, :3].T + truth[:3, 3]
    off_f = torch.arange(15, dtype=torch.float64).reshape(5, 3) / 7.0
    off_m = -torch.arange(15, dtype=torch.float64).reshape(5, 3) / 5.0
    pred = KeyMorphOutputStub(ref + off_f, ref_m + off_m)
    d2_f, d2_m = (off_f**2).sum(-1), (off_m**2).sum(-1)
    value = loss(pred, {"fixed_to_moving": truth[None]})
    assert value.item() == pytest.approx(((d2_f.sum() + d2_m.sum()) / 10 / 16).item(), rel=1e-5)
    # a plane that cuts away the moving points with x > ref_m[2, 0] (points 0..4 sorted by x: some are cut)
    level = float(torch.sort(ref_m[:, 0]).values[2])
    seen_m = ref_m[:, 0] <= level
    planes = {"fixed_fov": torch.zeros(1, 4, dtype=torch.float64),
              "moving_fov": torch.tensor([[1.0, 0.0, 0.0, level]], dtype=torch.float64)}  # fmt: skip
    value = loss(pred, {"fixed_to_moving": truth[None], **planes})
    expected = (d2_f.sum() + d2_m[seen_m].sum()) / (5 + int(seen_m.sum())) / 16
    assert 0 < int(seen_m.sum()) < 5
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(KeyError, match="fixed_to_moving"):
        loss(pred, {})


def test_training_pairs_carry_their_cuts_to_the_loss():
    """``build_pair_dataset(fov_cut=...)`` cuts each side independently and the prepare-batch hands the planes on."""
    from monai.data import list_data_collate

    from custom_nets.data import build_pair_dataset

    ds = build_pair_dataset(2, seed=0, spatial_size=40, pixdim=6.4, fov_cut={"prob": 1.0, "min_fraction": 0.2})
    items = [ds[i] for i in range(2)]
    for item in items:
        for side in ("fixed", "moving"):
            plane = item[f"{side}_fov"]
            assert plane.shape == (4,) and torch.linalg.norm(plane[:3]) > 0  # cut
            image, label = item[f"{side}_image"], item[f"{side}_label"]
            a = image.affine.double()
            world = voxel_grid(image.shape[1:], dtype=torch.float64) @ a[:3, :3].T + a[:3, 3]
            gone = world @ plane[:3] > plane[3]
            assert gone.any() and (image.as_tensor()[0][gone] == 0).all() and (label.as_tensor()[0][gone] == 0).all()
            assert (label.as_tensor()[0][~gone] > 0).any()  # brain left
    _, targets, _, _ = KeyMorphPrepareBatch()(list_data_collate(items), torch.device("cpu"))
    assert torch.equal(targets["moving_fov"], torch.stack([i["moving_fov"] for i in items]))
    assert torch.equal(targets["fixed_fov"], torch.stack([i["fixed_fov"] for i in items]))
    uncut = build_pair_dataset(1, seed=0, spatial_size=40, pixdim=6.4)[0]
    assert "fixed_fov" not in uncut


class KeyMorphOutputStub:
    """The two fields of :class:`~custom_nets.KeyMorphOutput` the pretraining loss reads, batch of one."""

    def __init__(self, keypoints_fixed, keypoints_moving):
        self.keypoints_fixed = keypoints_fixed[None].float()
        self.keypoints_moving = keypoints_moving[None].float()


def test_one_hot_labels_drop_values_outside_the_classes():
    """A label value the configured classes do not cover (e.g. FreeSurfer's 41 with 4 tissue classes, or -1) is all
    zero, not folded into the last class or background (which would make Dice count it as white matter)."""
    from custom_nets.losses import one_hot_labels

    labels = torch.tensor([0.0, 1.0, 3.0, 41.0, -1.0, 2.0]).view(1, 1, 6, 1, 1)
    onehot = one_hot_labels(labels, 4)
    assert onehot.shape == (1, 4, 6, 1, 1)
    assert onehot[0, :, :, 0, 0].T.tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 1, 0],
    ]
