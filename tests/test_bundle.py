"""The MONAI bundle end to end, through the real ``python -m monai.bundle`` CLI, on tiny settings.

One module-scoped run trains a few iterations; the tests then resume it, evaluate it, run inference with it, and check
the bundle tooling (check_properties, verify_net_in_out, ckpt_export) and the multi-GPU overlay (2 CPU processes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, TINY, bundle_cli

from custom_nets.data import write_demo_data
from custom_nets.fileio import read_itk_affine
from custom_nets.handlers import find_checkpoints

TRAIN = ["--train#epoch_length", "2", "--validate#num_pairs", "2", "--checkpoint_every", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def demo(work):
    return write_demo_data(work / "demo", num_subjects=3, pixdim=4.0, progress=False).parent


@pytest.fixture(scope="module")
def trained(work):
    """Train 2 epochs x 2 iterations on synthetic pairs; returns the run folder."""
    run = work / "run"
    bundle_cli(
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--output_dir",
        str(run),
        "--max_epochs",
        "2",
        *TINY,
        *TRAIN,
    )
    return run


def test_training_writes_checkpoints_weights_and_logs(trained):
    ckpts = find_checkpoints(trained / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint_4.pt", "checkpoint_3.pt"]  # n_saved = 2, newest first
    state = torch.load(ckpts[0], weights_only=True)
    assert set(state) == {"network", "optimizer", "trainer"} and state["trainer"]["iteration"] == 4
    weights = torch.load(trained / "model.pt", weights_only=True)
    assert set(weights) == set(state["network"]) and all(k.startswith("detector.") for k in weights)
    assert (trained / "best_model.pt").is_file()
    assert list(trained.glob("events.out.tfevents.*"))
    assert not list(trained.rglob(".tmp-*"))


def test_resume_continues_from_the_last_checkpoint(trained, work):
    run = work / "resumed"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "checkpoint_4.pt").write_bytes(b"truncated")  # the newest is corrupt: fall back, name it
    res = bundle_cli(
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--output_dir",
        str(run),
        "--max_epochs",
        "3",
        "--learning_rate",
        "0.00005",
        *TINY,
        *TRAIN,
    )
    log = res.stdout + res.stderr
    assert "checkpoint_4.pt is unreadable" in log
    assert re.search(r"resumed from .*checkpoint_3\.pt at iteration 3", log)
    final = torch.load(run / "checkpoints" / "checkpoint_6.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 6 and final["trainer"]["epoch_length"] == 2  # 3 epochs of 2
    # the optimizer state continued too: Adam's step count is the number of iterations actually trained
    steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
    assert steps == {6}
    assert {g["lr"] for g in final["optimizer"]["param_groups"]} == {0.00005}  # the configured rate wins
    # n_saved = 2 across the resume: the checkpoints it continued from were rotated out too
    assert [p.name for p in find_checkpoints(run / "checkpoints")] == ["checkpoint_6.pt", "checkpoint_5.pt"]


def test_evaluation_reports_by_angle(trained, work):
    out = work / "eval"
    bundle_cli(
        "run",
        "evaluating",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(trained / "model.pt"),
        "--pairs_per_angle",
        "1",
        *TINY,
    )
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("pair,seed,rotation_deg") and len(rows) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["by_rotation_deg"], key=float) == ["0.0", "45.0", "90.0", "135.0", "180.0"]
    for stats in summary["by_rotation_deg"].values():
        assert stats["pairs"] == 1 and 0 <= stats["success_rate"] <= 1 and stats["median_error_mm"] >= 0
        assert 0 <= stats["mean_dice"] <= 1


def _translated_copy(src_img: Path, src_lab: Path, dst_img: Path, dst_lab: Path, shift_mm: np.ndarray) -> np.ndarray:
    """The same content moved by ``shift_mm`` in world and stored in LPS voxel order; returns the true
    fixed_to_moving (RAS 4 x 4): a fixed point x corresponds to the moving point x + shift."""
    for src, dst in ((src_img, dst_img), (src_lab, dst_lab)):
        img = nib.load(str(src))
        data = np.asarray(img.dataobj)[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
        affine = img.affine @ flip
        affine[:3, 3] += shift_mm
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine, img.header), str(dst))
    truth = np.eye(4)
    truth[:3, 3] = shift_mm
    return truth


def _infer(trained: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``monai.bundle run inference`` with the module's small trained network, writing to ``out``."""
    return bundle_cli(
        "run",
        "inference",
        "--config_file",
        "configs/inference.json",
        "--ckpt_path",
        str(trained / "model.pt"),
        "--output_dir",
        str(out),
        *args,
        *TINY,
    )


def _assert_reproduces_fixed(warped_path: Path, fixed_path: Path, affine_atol: float = 1e-8) -> None:
    """The warped NIfTI lies on the fixed image's grid and reproduces its voxels (to 1e-3)."""
    warped, fixed_img = nib.load(str(warped_path)), nib.load(str(fixed_path))
    assert warped.shape == fixed_img.shape and np.allclose(warped.affine, fixed_img.affine, atol=affine_atol)
    assert np.abs(warped.get_fdata() - fixed_img.get_fdata()).max() < 1e-3


def test_inference_outputs_agree_with_each_other_and_the_truth(trained, demo, work):
    fixed, fixed_lab = demo / "sub-02_T1.nii.gz", demo / "sub-02_label.nii.gz"
    moving, moving_lab = work / "shifted_T1.nii.gz", work / "shifted_label.nii.gz"
    truth = _translated_copy(fixed, fixed_lab, moving, moving_lab, np.array([12.3, -7.9, 20.6]))
    out = work / "infer"
    _infer(
        trained,
        out,
        *("--moving", str(moving), "--fixed", str(fixed), "--moving_label", str(moving_lab)),
        "--refine",  # the exact keypoint result is checked; refinement moves it by ~0.01 mm (see test_refine.py)
        "False",
    )
    result = json.loads((out / "shifted_T1.json").read_text())
    f2m, m2f = np.array(result["fixed_to_moving_ras"]), np.array(result["moving_to_fixed_ras"])
    # the network sees identical inputs (same content, orientation normalised): the fit is the exact translation
    assert np.abs(f2m - truth).max() < 1e-3
    assert np.allclose(f2m @ m2f, np.eye(4), atol=1e-6)
    assert np.allclose(read_itk_affine(out / "shifted_T1.tfm"), f2m, atol=1e-9)
    assert len(result["keypoints_fixed_ras_mm"]) == 16 and len(result["keypoint_weights"]) == 16
    kp_f, kp_m = np.array(result["keypoints_fixed_ras_mm"]), np.array(result["keypoints_moving_ras_mm"])
    assert np.abs(kp_m - kp_f - truth[:3, 3]).max() < 1e-3
    # the warped NIfTI lies on the fixed grid, with the fixed header, and reproduces the fixed image and labels
    _assert_reproduces_fixed(out / "shifted_T1_warped.nii.gz", fixed)
    warped = nib.load(str(out / "shifted_T1_warped.nii.gz"))
    lab = nib.load(str(out / "shifted_T1_label_warped.nii.gz")).get_fdata()
    assert (lab == nib.load(str(fixed_lab)).get_fdata()).mean() > 0.999
    assert (out / "shifted_T1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sitk = pytest.importorskip("SimpleITK")  # the .tfm applied by ITK gives the same warped image
    res = sitk.Resample(
        sitk.ReadImage(str(moving)),
        sitk.ReadImage(str(fixed)),
        sitk.ReadTransform(str(out / "shifted_T1.tfm")),
        sitk.sitkLinear,
        0.0,
    )
    by_itk = np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0))
    assert np.abs(by_itk - warped.get_fdata()).max() < 1e-3


def test_spline_inference_writes_its_documented_outputs(trained, demo, work):
    """``--transform_type tps``: the warped image and labels at full resolution, a JSON with ``tps_lambda`` and the
    spline's affine part (here the exact translation), and no ITK affine (a spline is not one)."""
    fixed, fixed_lab = demo / "sub-02_T1.nii.gz", demo / "sub-02_label.nii.gz"
    moving, moving_lab = work / "tps_T1.nii.gz", work / "tps_label.nii.gz"
    truth = _translated_copy(fixed, fixed_lab, moving, moving_lab, np.array([-6.1, 9.4, 3.3]))
    out = work / "infer_tps"
    _infer(
        trained,
        out,
        *("--moving", str(moving), "--fixed", str(fixed), "--moving_label", str(moving_lab)),
        *("--transform_type", "tps", "--write_png", "False"),
    )
    result = json.loads((out / "tps_T1.json").read_text())
    assert result["transform_type"] == "tps" and result["tps_lambda"] == 0.0
    assert "fixed_to_moving_ras" not in result and not (out / "tps_T1.tfm").exists()
    assert np.abs(np.array(result["fixed_to_moving_affine_part_ras"]) - truth).max() < 1e-3
    _assert_reproduces_fixed(out / "tps_T1_warped.nii.gz", fixed)
    lab = nib.load(str(out / "tps_T1_label_warped.nii.gz")).get_fdata()
    assert (lab == nib.load(str(fixed_lab)).get_fdata()).mean() > 0.999
    # scoring refits the spline from the JSON's keypoints, weights and lambda: the translation, everywhere
    from custom_nets.scoring import result_transform

    points = torch.from_numpy(np.random.default_rng(0).uniform(-80.0, 80.0, (1, 500, 3)))
    assert (result_transform(result)(points) - (points + torch.from_numpy(truth[:3, 3]))).abs().max() < 1e-3
    with pytest.raises(ValueError, match=r"x\.json: expected 'fixed_to_moving_ras', or a tps result"):
        result_transform({"transform_type": "tps"}, "x.json")


def test_inference_on_nrrd_images_writes_nifti_on_the_fixed_grid(trained, demo, work):
    """Images nibabel does not read (NRRD here, through MONAI's ITK reader) register and write like NIfTI: the exact
    translation, and the warped NIfTI on the fixed image's grid in RAS reproduces the fixed image."""
    sitk = pytest.importorskip("SimpleITK")
    pytest.importorskip("itk", reason="MONAI reads NRRD through itk (the bench extra installs it)")
    fixed_nii = demo / "sub-02_T1.nii.gz"
    moving_nii = work / "nrrd_src_T1.nii.gz"
    truth = _translated_copy(
        fixed_nii, demo / "sub-02_label.nii.gz", moving_nii, work / "nrrd_src_lab.nii.gz", [5.2, -3.7, 8.1]
    )
    fixed, moving = work / "fixed_T1.nrrd", work / "moving_T1.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(fixed_nii)), str(fixed))
    sitk.WriteImage(sitk.ReadImage(str(moving_nii)), str(moving))
    out = work / "infer_nrrd"
    _infer(trained, out, "--moving", str(moving), "--fixed", str(fixed), "--refine", "False", "--write_png", "False")
    f2m = np.array(json.loads((out / "moving_T1.json").read_text())["fixed_to_moving_ras"])
    assert np.abs(f2m - truth).max() < 1e-3
    _assert_reproduces_fixed(out / "moving_T1_warped.nii.gz", fixed_nii, affine_atol=1e-4)


def test_inference_on_the_demo_pair_list(trained, demo, work):
    out = work / "infer_list"
    _infer(trained, out, "--dataset_dir", str(demo), "--write_png", "False")
    pairs = json.loads((demo / "datalist.json").read_text())["test_pairs"]
    for p in pairs:
        stem = Path(p["moving_image"]).name.replace(".nii.gz", "")
        assert (out / f"{stem}.json").is_file() and (out / f"{stem}_label_warped.nii.gz").is_file()
        assert not (out / f"{stem}.png").exists()
    # the demo's scoring reads them back against the ground truth (an untrained model: errors, not successes)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "custom_nets",
            "score",
            "--results",
            str(out),
            "--datalist",
            str(demo / "datalist.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert len(re.findall(r"^pair-\d\d_", res.stdout, flags=re.M)) == len(pairs)
    assert re.search(r"\d of 5 pairs registered within 2 mm", res.stdout)


def _one_pair(demo: Path) -> list[str]:
    return ["--moving", str(demo / "sub-01_T2.nii.gz"), "--fixed", str(demo / "sub-02_T1.nii.gz")]


@pytest.mark.parametrize("typed", ["false", "0", "no"])
def test_boolean_options_mean_what_people_type(trained, demo, work, typed):
    """``--refine false`` (lower case, as people type it) turns refinement off: the search then keeps the residual's
    view only (one view, no candidate check, which refinement runs); ``--write_png`` likewise."""
    out = work / f"bool_{typed}"
    _infer(trained, out, *_one_pair(demo), "--refine", typed, "--write_png", typed)
    record = json.loads((out / "sub-01_T2.json").read_text())
    views = record["quality"]["views"]
    assert len(views["checked"]) == 1 and "scores" not in views
    assert not (out / "sub-01_T2.png").exists()


def test_a_value_that_is_not_a_boolean_is_refused_by_name(trained, demo, work):
    res = bundle_cli(
        "run", "inference", "--config_file", "configs/inference.json", "--ckpt_path", str(trained / "model.pt"),
        "--output_dir", str(work / "bool_bad"), *_one_pair(demo), "--refine", "maybe", *TINY, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    assert "option refine: expected a boolean" in res.stdout + res.stderr


def test_every_result_carries_a_verdict_and_fail_on_suspect_writes_only_the_failure(trained, demo, work):
    strict = ["--quality_thresholds", "{'min_nmi': 1.999}"]  # no registration reaches it: every pair is suspect
    out = work / "suspect"
    res = _infer(trained, out, *_one_pair(demo), *strict, "--write_png", "True")
    record = json.loads((out / "sub-01_T2.json").read_text())
    quality = record["quality"]
    assert quality["verdict"] == "suspect" and any("nmi" in r for r in quality["reasons"])
    assert 1.0 <= quality["nmi"] <= 2.0 and 0.0 <= quality["lncc"] <= 1.0 and quality["thresholds"]["min_nmi"] == 1.999
    assert len(quality["views"]["scores"]) >= 1  # refinement on (the default): the candidate views were checked
    assert "SUSPECT" in res.stdout + res.stderr
    rows = (out / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert rows[1].split(",")[header.index("verdict")] == "suspect"
    default = work / "not_suspect_by_default"
    _infer(trained, default, *_one_pair(demo), "--write_png", "False")
    assert json.loads((default / "sub-01_T2.json").read_text())["quality"]["thresholds"]["min_nmi"] < 1.999

    failed = work / "fail_on_suspect"
    res = bundle_cli(
        "run", "inference", "--config_file", "configs/inference.json", "--ckpt_path", str(trained / "model.pt"),
        "--output_dir", str(failed), *_one_pair(demo), *strict, "--fail_on_suspect", "true", *TINY, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    failures = json.loads((failed / "failures.json").read_text())
    assert len(failures) == 1 and failures[0]["stage"] == "quality"
    assert failures[0]["quality"]["verdict"] == "suspect" and "nmi" in failures[0]["error"]
    assert sorted(p.name for p in failed.iterdir()) == ["failures.json", "results.csv"]  # nothing else written


def test_train_and_inference_configs_agree_on_the_network_and_the_grid():
    """train.json and inference.json each carry the network, its detector and the grid: MONAI Label's stock
    ``monaibundle`` app reads inference.json alone (see test_stock_monaibundle_app_loads_the_bundle), so there is no
    common config to list first. This keeps the two copies from drifting apart."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    infer = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    shared = ["bundle_root", "custom_nets", "ckpt_dir", "dataset_dir", "device", "spatial_size", "pixdim",
              "num_keypoints", "transform_type", "tps_lambda", "search_rank", "detector", "network"]  # fmt: skip
    for key in shared:
        assert infer[key] == train[key], key
    assert {k: v for k, v in infer["network_def"].items() if k != "amp"} == train["network_def"]
    assert set(infer["imports"]) <= set(train["imports"])


def test_bundle_tooling(trained, demo, work):
    from monai.bundle import ConfigWorkflow

    cwd = os.getcwd()
    os.chdir(BUNDLE)
    try:
        for config, kind in ((["configs/train.json"], "train"), ("configs/inference.json", "infer")):
            wf = ConfigWorkflow(
                config_file=config,
                meta_file="configs/metadata.json",
                workflow_type=kind,
                logging_file="configs/logging.conf",
                dataset_dir=str(demo),
            )
            wf.initialize()
            assert wf.check_properties() == [], config
    finally:
        os.chdir(cwd)
    bundle_cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    ts = work / "model.ts"
    res = bundle_cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts),
        "--ckpt_file",
        str(trained / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--use_trace",
        "True",
        "--input_shape",
        "[1, 2, 32, 32, 32]",
        *TINY,
        *("--orientation_search", "False", "--refine", "False", "--amp", "False"),  # as the model card's command
    )
    assert res.returncode == 0
    # the exported model computes what the model computes: the bundle's network, built from the same config and
    # weights, on inputs the trace never saw (a trace that froze a data-dependent branch would differ)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    overrides = dict(zip(TINY[::2], TINY[1::2]))
    overrides.update({"--orientation_search": "False", "--refine": "False", "--amp": "False", "--device": "cpu"})
    for key, value in overrides.items():
        parser[key[2:]] = json.loads(value.lower()) if value in ("False", "True") else _literal(value)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    scripted = torch.jit.load(str(ts))
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        pair = torch.rand(1, 2, 32, 32, 32, generator=gen)
        pair[:, 1] = torch.roll(pair[:, 0], shifts=(2, -1, 3), dims=(-3, -2, -1))  # a moving image that is moved
        with torch.no_grad():
            expected = net(pair)
            expected = expected.warped if hasattr(expected, "warped") else expected
            got = scripted(pair)
        assert got.shape == (1, 1, 32, 32, 32)
        assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def _literal(text: str):
    """A command-line override's value as the bundle CLI reads it: a Python / JSON literal, else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_multi_gpu_overlay_on_two_cpu_processes(work):
    run = work / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        "--output_dir",
        str(run),
        "--max_epochs",
        "1",
        *TINY,
        *TRAIN,
    ]
    res = subprocess.run(
        cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    # 2 pairs per epoch split over 2 processes: one iteration each; only rank 0 writes checkpoints
    state = torch.load(find_checkpoints(run / "checkpoints")[0], weights_only=True)
    assert state["trainer"]["iteration"] == 1
    assert all(not k.startswith("module.") for k in state["network"])
    assert (run / "model.pt").is_file()


def test_pretraining_stage_and_keypoint_consistency_train(work):
    pre = work / "pretrain"
    bundle_cli(
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/pretrain.json']",
        "--output_dir",
        str(pre),
        "--max_epochs",
        "1",
        *TINY,
        *TRAIN,
    )
    assert (pre / "model.pt").is_file()
    # the main stage starts from the pretrained weights, with the keypoint-consistency term on
    run = work / "consistency"
    res = bundle_cli(
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--output_dir",
        str(run),
        "--max_epochs",
        "1",
        "--init_weights",
        str(pre / "model.pt"),
        "--loss_weights#consistency",
        "0.5",
        *TINY,
        *TRAIN,
    )
    assert "Restored all variables from" in res.stdout + res.stderr
    assert find_checkpoints(run / "checkpoints")


def test_spline_training_end_to_end(work):
    """``--transform_type tps --tps_lambda_max 1``: training fits a thin-plate spline per pair with a lambda drawn per
    batch, end to end: every logged loss is finite, and the optimizer took a step per iteration with finite moments
    (gradients flowed through the spline fit into the detector)."""
    run = work / "tps_run"
    res = bundle_cli(
        "run", "training", "--config_file", "configs/train.json", "--output_dir", str(run), "--max_epochs", "1",
        "--transform_type", "tps", "--tps_lambda_max", "1.0", *TINY, *TRAIN,
    )  # fmt: skip
    losses = [float(v) for v in re.findall(r"train_loss: ([-+0-9.eE]+|nan|inf)", res.stdout + res.stderr)]
    assert len(losses) >= 2 and all(np.isfinite(losses)), losses
    state = torch.load(find_checkpoints(run / "checkpoints")[0], weights_only=True)
    assert state["trainer"]["iteration"] == 2
    moments = state["optimizer"]["state"]
    assert moments and all(float(m["step"]) == 2.0 for m in moments.values())
    assert all(torch.isfinite(m["exp_avg"]).all() and m["exp_avg"].abs().sum() > 0 for m in moments.values())
    assert set(torch.load(run / "model.pt", weights_only=True)) == set(state["network"])
