"""The stress benchmark (benchmarks/bench_stress.py): every smoke pair's truth is exact (thick slices stored LPS, a
field of view with slabs removed from the grid, two subjects, a heavily corrupted image), the scoring of known wrong
matrices, and the report's reading of bundle outputs (errors, failures and how the quality verdict sorts them)."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import benchmark_module

from custom_nets.geometry import resample

bench = benchmark_module("bench_stress")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("stress")
    pairs = bench.make_pairs(out, "smoke", seed=0)
    return out, pairs


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _warp(labels, matrix, fixed_shape, fixed_affine, moving_affine):
    """Moving labels (or a ones volume: the moving field of view) on the fixed grid through ``matrix``."""
    out = resample(
        torch.as_tensor(np.asarray(labels, dtype=np.float32))[None, None],
        torch.as_tensor(np.asarray(matrix, dtype=np.float64))[None],
        fixed_shape,
        torch.as_tensor(fixed_affine),
        torch.as_tensor(moving_affine),
        mode="nearest",
    )
    return out[0, 0].numpy()


def _world(mask, affine):
    idx = np.argwhere(mask).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _shift(d):
    m = np.eye(4)
    m[:3, 3] = d
    return m


def _dice(a, b):
    return 2.0 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b))


def test_plans_hold_the_promised_pairs():
    smoke = bench.pair_plan("smoke")
    assert [k for k, _ in smoke] == ["thick_axial", "fov_top", "inter_subject", "all_corruptions"]
    quick, full = bench.pair_plan("quick"), bench.pair_plan("full")
    brain_only = [k for k, _ in full if bench.KINDS[k][0] not in ("raw", "twin")]
    assert len(brain_only) >= 300 and 28 <= len(bench.pair_plan("quick")) <= 40
    assert {k for k, _ in full} == set(bench.KINDS)  # every kind, raw heads and their twins included
    for raw in bench.RAW_KINDS:  # each raw pair has its brain-only twin
        assert sum(k == raw for k, _ in full) == sum(k == raw.replace("raw", "twin") for k, _ in full) > 0
    # held-out subjects: indices 5000+ (bench_registration uses 1000-1099), one subject per pair and image
    idx = [bench._subject_index(0, k, j, s) for k, j in full + quick if not k.startswith("twin") for s in (0, 1)]
    assert min(idx) >= 5000
    assert len(set(idx)) == len({(k, j, s) for k, j in full + quick if not k.startswith("twin") for s in (0, 1)})


def test_every_smoke_pair_reproduces_its_fixed_labels_through_the_truth(smoke):
    """The moving truth labels, resampled onto the fixed grid through the truth matrix, land on the fixed labels
    (brain Dice over the part of the fixed grid that the moving field of view covers), and better than through a
    matrix 3 mm off."""
    _, pairs = smoke
    for p in pairs:
        lab_f, a_f = _load(p["fixed_label"])
        lab_m, a_m = _load(p["moving_label"])
        truth = np.asarray(p["fixed_to_moving_ras"])
        seen = _warp(np.ones(lab_m.shape), truth, lab_f.shape, a_f, a_m) > 0
        assert seen.sum() > 0.5 * seen.size, p["id"]
        warped = _warp(lab_m, truth, lab_f.shape, a_f, a_m)
        dice = _dice((warped > 0) & seen, (lab_f > 0) & seen)
        same_subject = p["subject_fixed"] == p["subject_moving"]
        assert dice > (0.9 if same_subject else 0.85), (p["id"], dice)
        tissue = np.mean([_dice((warped == c) & seen, (lab_f == c) & seen) for c in (2, 3)])
        off = _warp(lab_m, _shift([1.7, -1.7, 1.7]) @ truth, lab_f.shape, a_f, a_m)  # 2.9 mm off
        tissue_off = np.mean([_dice((off == c) & seen, (lab_f == c) & seen) for c in (2, 3)])
        # (two subjects differ by their own ~3 mm deformation: their optimum is flatter)
        assert tissue > tissue_off + (0.05 if same_subject else 0.0), (p["id"], tissue, tissue_off)
        wrong = _warp(lab_m, np.eye(4), lab_f.shape, a_f, a_m)  # the pose is large: identity is far off
        assert _dice(wrong > 0, lab_f > 0) < dice - 0.2, p["id"]
        # images and labels share their grids
        # the brain is whole in its field of view, except where the record says it was cut
        for side, lab in (("fixed", lab_f), ("moving", lab_m)):
            edge = max(np.take(lab, [0, -1], axis=a).max() for a in range(3))
            assert (edge > 0) == (p.get("cut", {}).get("image") == side and p["cut"]["removed_slabs"]), (p["id"], side)
        img_m, img_f = nib.load(p["moving_image"]), nib.load(p["fixed_image"])
        assert np.allclose(img_m.affine, a_m) and np.allclose(img_f.affine, a_f)
        assert img_m.shape == lab_m.shape and img_f.shape == lab_f.shape


def test_thick_slices_are_stored_on_an_exact_anisotropic_lps_grid(smoke):
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "thick_axial")
    lab_m, a_m = _load(p["moving_label"])
    lab_f, a_f = _load(p["fixed_label"])
    assert nib.aff2axcodes(a_m) == ("L", "P", "S") and p["storage"]["orientation"] == "LPS"
    assert np.allclose(np.linalg.norm(a_m[:3, :3], axis=0), [1.0, 1.0, 5.0])
    assert np.allclose(a_m[:3, :3], np.diag([-1.0, -1.0, 5.0]))  # axial slabs, 1 mm in plane, reversed in-plane axes
    assert nib.load(p["moving_image"]).get_data_dtype() == np.int16
    # the same subject, full field of view: the brain's centre maps onto the fixed brain's centre through the truth
    # (a slab placed half a slab off, or an axis flipped in the header, would move it by 2.5 mm or more)
    truth = np.asarray(p["fixed_to_moving_ras"])
    moved = (np.linalg.inv(truth) @ np.c_[_world(lab_m > 0, a_m), np.ones(int((lab_m > 0).sum()))].T)[:3].T
    assert np.linalg.norm(moved.mean(0) - _world(lab_f > 0, a_f).mean(0)) < 0.5
    # slab averaging: partial-volume labels along the thick axis, i.e. fewer slices than a 1 mm grid of the same extent
    assert lab_m.shape[2] * 5 >= 120 and lab_m.shape[2] < 60


def test_cut_field_of_view_removes_slabs_from_the_grid(smoke):
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "fov_top")
    cut = p["cut"]
    assert cut["image"] == "moving" and cut["removed_slabs"] and cut["part"] == "top"
    lab_m, a_m = _load(p["moving_label"])
    lab_f, a_f = _load(p["fixed_label"])
    axis = cut["axis"]
    # the brain reaches the grid's edge along the cut axis: slabs were removed, not zeroed
    profile = (lab_m > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    assert profile[0] > 0 or profile[-1] > 0
    assert cut["keep"] == [0, lab_m.shape[axis] - 1]
    assert 0.02 < cut["brain_fraction_removed"] < 0.3
    # the fixed brain that maps outside the stored moving grid is the part the record says was cut away
    truth = np.asarray(p["fixed_to_moving_ras"])
    seen = _warp(np.ones(lab_m.shape), truth, lab_f.shape, a_f, a_m) > 0
    outside = 1.0 - np.sum(seen & (lab_f > 0)) / np.sum(lab_f > 0)
    assert abs(outside - cut["brain_fraction_removed"]) < 0.03, (outside, cut)
    # the cut is along the grid axis nearest the moving head's superior direction, on its superior side
    up = np.linalg.inv(a_m[:3, :3]) @ (np.asarray(p["pose_moving"])[:3, :3] @ [0.0, 0.0, 1.0])
    assert axis == int(np.abs(up).argmax())
    assert (profile[-1] > 0) if up[axis] > 0 else (profile[0] > 0)


@pytest.mark.parametrize("remove", [True, False])
def test_cuts_keep_the_right_side(smoke, remove):
    """On an upright head: ``top`` removes the brain above a level (about 15 % of its height from the vertex),
    ``cerebellum`` the brain below template z -30 ... -20 mm; removed slabs leave a smaller grid whose affine still
    places every kept voxel where it was, zeroed slabs the same grid."""
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "fov_top")
    lab, aff = _load(p["fixed_label"])  # near upright, uncut
    image = lab.astype(np.int16) * 10
    pose = np.asarray(p["pose_fixed"])
    z = _world(lab > 0, aff)[:, 2]
    for part in ("top", "cerebellum"):
        img2, lab2, aff2, info = bench._cut(image, lab, aff, pose, part, remove, np.random.default_rng(0))
        kept = _world(lab2 > 0, aff2)
        assert info["part"] == part and info["axis"] == 2 and info["removed_slabs"] == remove
        assert (lab2.shape[2] < lab.shape[2]) == remove and np.array_equal(img2 > 0, lab2 > 0)
        if part == "top":
            assert kept[:, 2].max() < z.max() - 0.1 * (z.max() - z.min()) and kept[:, 2].min() == z.min()
        else:
            level = (pose @ [0.0, -17.0, info["template_z_mm"], 1.0])[2]
            assert abs(kept[:, 2].min() - level) < 6.0 and kept[:, 2].max() == z.max()
            assert -30.0 <= info["template_z_mm"] <= -20.0
        assert 0.02 < info["brain_fraction_removed"] < 0.3
        assert len(kept) == pytest.approx((1 - info["brain_fraction_removed"]) * len(z), abs=1)
        # kept voxels keep their world positions and labels
        back = np.rint(np.c_[kept, np.ones(len(kept))] @ np.linalg.inv(aff).T)[:, :3].astype(int)
        assert np.all(lab[tuple(back.T)] > 0)


def test_inter_subject_pairs_are_two_subjects_composed_through_template_space(smoke):
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "inter_subject")
    assert p["subject_fixed"] != p["subject_moving"]
    pose_f, pose_m = np.asarray(p["pose_fixed"]), np.asarray(p["pose_moving"])
    assert np.allclose(p["fixed_to_moving_ras"], pose_m @ np.linalg.inv(pose_f))
    assert abs(p["angle"] - bench._rotation_angle(pose_m @ np.linalg.inv(pose_f))) < 1e-9


def test_scoring_gives_the_error_of_a_known_wrong_matrix(smoke):
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "all_corruptions")
    truth = np.asarray(p["fixed_to_moving_ras"])
    assert bench.score(p, truth)["error_mm"] < 1e-9
    assert bench.score(p, _shift([3.0, -4.0, 12.0]) @ truth)["error_mm"] == pytest.approx(13.0, abs=1e-6)
    # 10 degrees about z through the fixed brain's centroid, before the truth: |L (R - I)(x - c)| over the brain
    lab_f, a_f = _load(p["fixed_label"])
    x = _world(lab_f > 0, a_f)
    c = x.mean(0)
    t = np.radians(10.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    pred = truth @ _shift(c) @ rot @ _shift(-c)
    expected = np.linalg.norm((x - c) @ (rot[:3, :3] - np.eye(3)).T @ truth[:3, :3].T, axis=1).mean()
    assert expected > 5.0
    assert bench.score(p, pred)["error_mm"] == pytest.approx(expected, rel=1e-6)


def test_pairs_are_deterministic_in_the_seed(smoke):
    _, pairs = smoke
    p = next(p for p in pairs if p["kind"] == "all_corruptions")
    again = bench._build_brain_pair(bench._Factory(), "all_corruptions", 0, 1, 0)
    moving, _ = _load(p["moving_image"])
    assert np.array_equal(again["arrays"][1], moving)
    assert np.allclose(again["record"]["fixed_to_moving_ras"], p["fixed_to_moving_ras"])


def _fake_run(out: Path, pairs, outcomes, variant="keymorph_refine"):
    """Bundle outputs as RegistrationWriter leaves them: a JSON per registered pair, results.csv, the run record."""
    folder = out / variant
    folder.mkdir(exist_ok=True)
    start = time.time()
    rows = []
    for i, (p, (offset, verdict)) in enumerate(zip(pairs, outcomes)):
        stem = bench._stem(p["moving_image"])
        if offset is None:
            (folder / f"{stem}.json").unlink(missing_ok=True)
            rows.append({"pair": i, "moving": p["moving_image"], "fixed": p["fixed_image"], "status": "failed",
                         "stage": "register", "error": "boom", "json": ""})  # fmt: skip
            continue
        rec = {"fixed_to_moving_ras": (_shift(offset) @ np.asarray(p["fixed_to_moving_ras"])).tolist()}
        if verdict is not None:
            rec["quality"] = {"verdict": verdict, "reasons": ["low nmi"] if verdict == "suspect" else [], "nmi": 1.2}
        (folder / f"{stem}.json").write_text(json.dumps(rec))
        done = start + 2.0 * (i + 1)  # completed 2 s after the previous pair
        os.utime(folder / f"{stem}.json", (done, done))
        rows.append({"pair": i, "moving": p["moving_image"], "fixed": p["fixed_image"], "status": "ok",
                     "stage": "", "error": "", "json": str(folder / f"{stem}.json")})  # fmt: skip
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["pair", "moving", "fixed", "status", "stage", "error", "json"])
        writer.writeheader()
        writer.writerows(rows)
    (out / f"run_{variant}.json").write_text(
        json.dumps(
            {
                "method": variant,
                "start_epoch": start,
                "wall_s": 8.0,
                "pairs": len(pairs),
                "s_per_pair_process": 8.0 / len(pairs),
                "returncode": 0,
            }
        )  # fmt: skip
    )


def test_report_sorts_the_pairs_by_error_and_verdict(smoke):
    out, pairs = smoke
    # right and ok; 5 mm off and suspect (caught); 5 mm off and ok (a silent wrong answer); failed (no result)
    _fake_run(out, pairs, [([0, 0, 0], "ok"), ([3, 4, 0], "suspect"), ([0, 0, 5], "ok"), (None, None)])
    summary = bench.report(str(out), "smoke", "keymorph_refine")
    s = summary["methods"]["keymorph_refine"]["by_group"]["all pairs"]
    assert (s["n"], s["success"], s["no_result"], s["gross"]) == (4, 0.25, 1, 1)
    assert (s["wrong"], s["wrong_suspect"], s["silent_wrong"], s["right"], s["right_suspect"]) == (2, 1, 1, 1, 0)
    assert s["median_mm"] == pytest.approx(5.0, abs=1e-6) and s["p95_mm"] == float("inf")
    by_kind = summary["methods"]["keymorph_refine"]["by_kind"]
    assert by_kind["fov_top"]["median_mm"] == pytest.approx(5.0) and by_kind["thick_axial"]["success"] == 1.0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["verdict"] for r in rows] == ["ok", "suspect", "ok", ""]
    assert rows[3]["status"] == "failed" and "boom" in rows[3]["failure"]
    assert [float(r["seconds"]) for r in rows[:3]] == pytest.approx([2.0, 2.0, 2.0]) and rows[3]["seconds"] == ""
    for name in ("table.md", "summary.json", "error_vs_angle.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "truth is only good to the subjects' own deformation" in table and "| 1 / 2 |" in table
    # a result without a quality block is counted as such, not as ok
    _fake_run(out, pairs, [([0, 0, 0], None), ([3, 4, 0], "suspect"), ([0, 0, 5], "ok"), (None, None)])
    s = bench.report(str(out), "smoke", "keymorph_refine")["methods"]["keymorph_refine"]["by_group"]["all pairs"]
    assert (s["verdict_missing"], s["right"], s["wrong"], s["silent_wrong"]) == (1, 0, 2, 1)
