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


def _output(warped, f2m, kp_moving, kp_alt, weights):
    from custom_nets.keymorph import KeyMorphOutput

    m2f = torch.linalg.inv(f2m)
    kp_fixed = torch.zeros_like(kp_moving)
    return KeyMorphOutput(warped, f2m, m2f, kp_fixed, kp_moving, weights, "affine", None, kp_alt)


def test_keymorph_loss_terms_and_total_against_hand_computations():
    """Each term on inputs whose value is known by hand, and the total as the weighted sum:

    * image (MSE): the warped image is the fixed one plus 0.1 everywhere -> 0.01; equal images -> 0;
    * Dice (soft, foreground classes): fixed label a box 8 voxels long on axis 0, moving label the same box shifted by
      2 voxels, identity transform and affines -> 1 - Dice = 1 - 2 * 6 / (8 + 8) = 0.25; a transform that undoes the
      shift (2 mm at 1 mm voxels) -> 0;
    * consistency: each moving keypoint 5 mm (3, 4, 0) from its other-contrast twin, weights 1, scale 4 mm ->
      25 / 16; with weights 0.5 -> half.
    """
    shape = (16, 16, 16)
    eye = torch.eye(4, dtype=torch.float64)[None]
    fixed = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    box = torch.zeros(1, 1, *shape)
    box[:, :, 4:12, 4:12, 4:12] = 1.0
    moved = torch.roll(box, shifts=2, dims=2)  # moving voxel i + 2 holds what fixed voxel i holds
    targets = {"fixed_image": fixed, "fixed_affine": eye, "moving_affine": eye}
    targets.update(fixed_label=box, moving_label=moved)
    kp = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alt = kp + torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    ones = torch.ones(1, 10, dtype=torch.float64)
    pred = _output(fixed + 0.1, eye.clone(), kp, alt, ones)

    loss = KeyMorphLoss(torch.nn.MSELoss(), image_weight=2.0, dice_weight=3.0, num_classes=2, consistency_weight=0.5)
    total = loss(pred, targets)
    assert loss.last_terms["image"] == pytest.approx(0.01, rel=1e-5)
    assert loss.last_terms["dice"] == pytest.approx(0.25, abs=1e-4)
    assert loss.last_terms["consistency"] == pytest.approx(25.0 / 16.0, rel=1e-9)
    assert float(total) == pytest.approx(2.0 * 0.01 + 3.0 * 0.25 + 0.5 * 25.0 / 16.0, abs=1e-4)

    undo = eye.clone()
    undo[0, 0, 3] = 2.0  # fixed point x -> moving point x + 2 mm along axis 0: the labels coincide
    exact = _output(fixed.clone(), undo, kp, kp.clone(), ones * 0.5)
    total = loss(exact, targets)
    assert loss.last_terms == pytest.approx({"image": 0.0, "dice": 0.0, "consistency": 0.0}, abs=1e-5)
    assert float(total) == pytest.approx(0.0, abs=1e-4)
    half = _output(fixed.clone(), undo, kp, alt, ones * 0.5)
    loss(half, targets)
    assert loss.last_terms["consistency"] == pytest.approx(0.5 * 25.0 / 16.0, rel=1e-9)


def test_registration_report_statistics_of_known_rows(tmp_path):
    """RegistrationReport on an engine whose outputs are known: success rate, median, mean and 90th percentile (linear
    interpolation, computed by hand here) per angle and overall, NaN Dice left out of the mean, one CSV row per pair."""
    import json

    from ignite.engine import Engine

    from custom_nets.report import RegistrationReport

    def batch(angles, errors, dice, subjects):
        n = len(angles)
        return {
            "fixed_image": torch.zeros(n, 1, 1, 1, 1),
            "rotation_angle_deg": torch.tensor(angles, dtype=torch.float64),
            "fixed_subject": [s[0] for s in subjects],
            "moving_subject": [s[1] for s in subjects],
            "out": {"error_mm": torch.tensor(errors), "success": torch.tensor(errors) < 2, "dice": torch.tensor(dice)},
        }

    data = [
        batch([0.0, 0.0], [0.5, 1.5], [0.9, 0.8], [("a", "a"), ("a", "b")]),
        batch([0.0], [3.0], [float("nan")], [("c", "d")]),
        batch([90.0, 90.0], [10.0, 1.0], [0.5, 0.7], [("e", "e"), ("f", "g")]),
    ]
    engine = Engine(lambda e, b: b["out"])
    RegistrationReport(str(tmp_path)).attach(engine)
    engine.run(data, max_epochs=1)
    summary = json.loads((tmp_path / "summary.json").read_text())
    overall, at0, at90 = summary["overall"], summary["by_rotation_deg"]["0.0"], summary["by_rotation_deg"]["90.0"]
    # overall errors sorted 0.5 1 1.5 3 10: p90 at rank 0.9 * 4 = 3.6 -> 3 + 0.6 * (10 - 3) = 7.2
    assert overall["pairs"] == 5 and overall["success_rate"] == pytest.approx(3 / 5)
    assert overall["median_error_mm"] == pytest.approx(1.5) and overall["mean_error_mm"] == pytest.approx(3.2)
    assert overall["p90_error_mm"] == pytest.approx(7.2) and overall["mean_dice"] == pytest.approx(0.725)
    # angle 0: 0.5 1.5 3 -> p90 at rank 1.8 -> 1.5 + 0.8 * 1.5 = 2.7; angle 90: 1 10 -> rank 0.9 -> 9.1
    assert at0["success_rate"] == pytest.approx(2 / 3) and at0["median_error_mm"] == pytest.approx(1.5)
    assert at0["p90_error_mm"] == pytest.approx(2.7) and at0["mean_dice"] == pytest.approx(0.85)
    assert at90["success_rate"] == pytest.approx(0.5) and at90["median_error_mm"] == pytest.approx(5.5)
    assert at90["p90_error_mm"] == pytest.approx(9.1) and at90["pairs"] == 2
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 6 and [r.split(",")[5] for r in rows[1:]] == ["True", "False", "False", "True", "False"]


def test_score_results_of_known_results(tmp_path):
    """What ``make demo`` / ``python -m custom_nets score`` print, on results whose error is known: a result 5 mm off
    by a translation (3, 4, 0) scores 5.0 mm everywhere on the brain, the true matrix 0 mm; warped labels equal to the
    fixed ones give Dice 1, a box shifted by 2 of its 8 voxels 0.75; the table counts 1 of 2 successes."""
    import json

    from custom_nets.data import save_nifti
    from custom_nets.scoring import format_scores, score_results

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)).numpy()
    labels = torch.zeros(16, 16, 16)
    labels[4:12, 4:12, 4:12] = 1
    save_nifti(labels.numpy(), affine, tmp_path / "fixed_label.nii.gz")
    for name in ("fixed.nii.gz", "m0.nii.gz", "m1.nii.gz"):
        save_nifti(torch.rand(16, 16, 16).numpy(), affine, tmp_path / name)
    truth = torch.as_tensor(_about_matrix(), dtype=torch.float64)
    off = truth.clone()
    off[:3, 3] += torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    pairs = [
        {"moving_image": "m0.nii.gz", "fixed_image": "fixed.nii.gz", "fixed_label": "fixed_label.nii.gz",
         "fixed_to_moving_ras": truth.tolist(), "rotation_deg": 90},
        {"moving_image": "m1.nii.gz", "fixed_image": "fixed.nii.gz", "fixed_label": "fixed_label.nii.gz",
         "fixed_to_moving_ras": truth.tolist(), "rotation_deg": 0},
    ]  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps({"test_pairs": pairs}))
    results = tmp_path / "results"
    results.mkdir()
    (results / "m0.json").write_text(json.dumps({"fixed_to_moving_ras": off.tolist()}))
    (results / "m1.json").write_text(json.dumps({"fixed_to_moving_ras": truth.tolist()}))
    save_nifti(torch.roll(labels, 2, 0).numpy(), affine, results / "m0_label_warped.nii.gz")
    save_nifti(labels.numpy(), affine, results / "m1_label_warped.nii.gz")
    rows = score_results(results, tmp_path / "datalist.json")
    assert [r["moving"] for r in rows] == ["m0.nii.gz", "m1.nii.gz"]
    assert rows[0]["error_mm"] == pytest.approx(5.0, abs=1e-9) and rows[0]["success"] is False
    assert rows[1]["error_mm"] == pytest.approx(0.0, abs=1e-9) and rows[1]["success"] is True
    assert rows[0]["dice"] == pytest.approx(0.75) and rows[1]["dice"] == pytest.approx(1.0)
    table = format_scores(rows)
    assert "1 of 2 pairs registered within 2 mm" in table and "5.00" in table


def _about_matrix():
    """A rotation of 40 degrees about an oblique axis through (10, -5, 20) mm with a shift: a truth that is not the
    identity."""
    from custom_nets.data import rotation_matrix

    m = torch.eye(4, dtype=torch.float64).numpy()
    r = rotation_matrix((1.0, 2.0, -0.5), 40.0)
    c = torch.tensor([10.0, -5.0, 20.0], dtype=torch.float64).numpy()
    m[:3, :3], m[:3, 3] = r, c - r @ c + [2.0, -1.0, 3.0]
    return m


def test_registration_metrics_of_known_transforms():
    """RegistrationMetricsd: the true matrix scores 0 mm and Dice 1 on equal labels; the truth shifted by (0, 6, 8) mm
    scores 10 mm (no success) and, with the 8-voxel boxes then overlapping over 8 x 5 x 4 voxels (2 mm voxels), Dice
    2 * 160 / 1024."""
    shape = (16, 16, 16)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))[None]
    box = torch.zeros(1, 1, *shape)
    box[:, :, 4:12, 4:12, 4:12] = 1.0
    truth = torch.eye(4, dtype=torch.float64)[None]
    targets = {"fixed_image": box.clone(), "fixed_affine": affine, "moving_affine": affine, "fixed_label": box,
               "moving_label": box.clone(), "fixed_to_moving": truth}  # fmt: skip
    kp = torch.zeros(1, 4, 3, dtype=torch.float64)
    ones = torch.ones(1, 4, dtype=torch.float64)
    exact = RegistrationMetricsd(num_classes=2)({"pred": _output(box, truth.clone(), kp, None, ones), "label": targets})
    assert float(exact["error_mm"][0]) == pytest.approx(0.0, abs=1e-9) and float(exact["success"][0]) == 1.0
    assert float(exact["dice"][0]) == pytest.approx(1.0)
    off = truth.clone()
    off[0, 1, 3], off[0, 2, 3] = 6.0, 8.0  # fixed point -> moving point 6 mm and 8 mm further (3 and 4 voxels)
    moved = RegistrationMetricsd(num_classes=2)({"pred": _output(box, off, kp, None, ones), "label": targets})
    assert float(moved["error_mm"][0]) == pytest.approx(10.0, abs=1e-9) and float(moved["success"][0]) == 0.0
    assert float(moved["dice"][0]) == pytest.approx(2 * (8 * 5 * 4) / (2 * 512))
