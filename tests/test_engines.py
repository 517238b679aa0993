"""The engine pieces without the bundle: prepare-batch, error metric, losses."""

import pytest
import torch
from helpers import grid_affine, smooth_image
from monai.data import MetaTensor

from custom_nets import ConvNetDetector, KeyMorph, fit_tps
from custom_nets.engines import KeyMorphPrepareBatch, RegistrationMetricsd, transform_error_mm
from custom_nets.losses import KeyMorphLoss


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
