"""Cohort-scale batch inference (issue 18): disjoint shares per rank, one merged record, resume, through torchrun.

The end-to-end runs use the tiny network with random weights (deterministic, fast) on small synthetic brains, CPU and
gloo, two processes, one thread each (``OMP_NUM_THREADS=1``, as torchrun sets it) so that the one-process and the
two-process runs compute the same floating-point sums.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, TINY, bundle_cli, torchrun_command

from custom_nets import ConvNetDetector, KeyMorph
from custom_nets.cohort_run import PAIR_KEY, CohortRun, shard
from custom_nets.data import BrainSynthesizer
from custom_nets.data.augment import rotation_matrix

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OVERLAY = "['configs/inference.json','configs/multi_gpu_inference.json']"


# ---------------------------------------------------------------------------------------------------------------------
# the plan: shares, clashes, resume


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_complete_and_unpadded(count, world):
    items = list(range(count))
    shares = [shard(items, r, world) for r in range(world)]
    together = sorted(i for s in shares for i in s)
    assert together == items  # every item once: none twice, none dropped
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank 2, world_size 2"):
        shard(items, 2, 2)


def _pairs(folder: Path, n: int) -> list[dict]:
    pairs = []
    for i in range(n):
        for side in ("moving", "fixed"):
            (folder / f"{side}{i}.nii.gz").write_bytes(f"{side} {i}".encode())
        pairs.append(
            {"moving_image": str(folder / f"moving{i}.nii.gz"), "fixed_image": str(folder / f"fixed{i}.nii.gz")}
        )  # noqa: E501
    return pairs


def _complete(run: CohortRun, pair: int, outputs=("warped",)) -> Path:
    """Write what the writer writes for a finished pair: its outputs, then its JSON with the run record."""
    stem = Path(run.pairs[pair]["moving_image"]).name.replace(".nii.gz", "")
    files = {}
    for key in outputs:
        files[key] = str(run.output_dir / f"{stem}_{key}.nii.gz")
        Path(files[key]).write_bytes(b"x")
    record = {"quality": {"verdict": "ok", "nmi": 1.1}, "outputs": files, "run": run.stamp(pair)}
    path = run.output_dir / f"{stem}.json"
    path.write_text(json.dumps(record))
    return path


def test_plan_skips_only_pairs_made_by_the_same_settings_weights_and_inputs(tmp_path, caplog):
    pairs, out = _pairs(tmp_path, 6), tmp_path / "out"
    out.mkdir()
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights A")
    settings = {"refine": True, "pixdim": 4.0}
    first = CohortRun(pairs, out, settings, [weights], rank=0, world_size=1)
    assert [p[PAIR_KEY] for p in first.pending] == list(range(6)) and not first.resumed
    for i in range(6):
        _complete(first, i)
    (out / "moving0_warped.nii.gz").unlink()  # pair 0: an output listed in its JSON is gone
    (out / "moving1.json").write_text("{")  # pair 1: a JSON cut off mid-write by hand
    Path(pairs[2]["fixed_image"]).write_bytes(b"another fixed image")  # pair 2: an input changed since
    os.utime(pairs[2]["fixed_image"], ns=(1, 1))
    record = json.loads((out / "moving3.json").read_text())
    del record["run"]  # pair 3: made before runs recorded what made them
    (out / "moving3.json").write_text(json.dumps(record))
    caplog.set_level("INFO", logger="custom_nets.cohort_run")
    again = CohortRun(pairs, out, settings, [weights], rank=0, world_size=1)
    assert [p[PAIR_KEY] for p in again.pending] == [0, 1, 2, 3]
    assert [p[PAIR_KEY] for p, _ in again.resumed] == [4, 5]
    assert again.resumed[0][1]["quality"]["nmi"] == 1.1
    log = caplog.text
    assert "moving0_warped.nii.gz" in log and "are missing" in log
    assert "moving1.json cannot be read" in log
    assert f"fixed_image: {pairs[2]['fixed_image']} changed since" in log
    assert "does not record what made it" in log
    assert "2 of 6 pairs already done" in log
    # other settings, other weights, resume off: everything again, and the log names the difference
    caplog.clear()
    other = CohortRun(pairs, out, {"refine": False, "pixdim": 4.0}, [weights], rank=0, world_size=1)
    assert len(other.pending) == 6 and "refine: true -> false" in caplog.text
    weights.write_bytes(b"weights B")
    caplog.clear()
    retrained = CohortRun(pairs, out, settings, [weights], rank=0, world_size=1)
    assert len(retrained.pending) == 6 and "weights model.pt:" in caplog.text
    assert retrained.fingerprint != first.fingerprint
    weights.write_bytes(b"weights A")
    assert CohortRun(pairs, out, settings, [weights], rank=0, world_size=1).fingerprint == first.fingerprint
    assert len(CohortRun(pairs, out, settings, [weights], resume=False, rank=0, world_size=1).pending) == 6


def test_plan_shares_out_resumed_pairs_and_name_clashes_by_rank(tmp_path):
    pairs, out = _pairs(tmp_path, 5), tmp_path / "out"
    out.mkdir()
    pairs.append({"moving_image": pairs[1]["moving_image"], "fixed_image": pairs[0]["fixed_image"]})  # pair 5
    runs = [CohortRun(pairs, out, {}, [], rank=r, world_size=2) for r in range(2)]
    _complete(runs[1], 3)
    runs = [CohortRun(pairs, out, {}, [], rank=r, world_size=2) for r in range(2)]
    assert [p[PAIR_KEY] for p in runs[0].pending] == [0, 2, 4] and not runs[0].clashes
    assert [p[PAIR_KEY] for p in runs[1].pending] == [1]
    assert [p[PAIR_KEY] for p, _ in runs[1].resumed] == [3]
    (clash,) = runs[1].clashes  # pair 5 writes moving1's outputs, which pair 1 (rank 1) owns
    assert clash[PAIR_KEY] == 5 and clash["stage"] == "write" and "(pair 1," in clash["error"]
    assert "already wrote outputs named 'moving1'" in clash["error"]


# ---------------------------------------------------------------------------------------------------------------------
# end to end: torchrun, 2 ranks, gloo


def _tiny_net() -> KeyMorph:
    """The network of ``inference.json`` with the TINY overrides."""
    return KeyMorph(ConvNetDetector(num_keypoints=16, channels=(8, 16, 16), pool_after=(0, 1), norm="instance"))


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A fixed brain, seven moving copies under rotated and shifted headers, tiny random weights."""
    folder = tmp_path_factory.mktemp("cohort")
    synth = BrainSynthesizer(spatial_size=(41, 49, 41), pixdim=4.0)
    data = synth.image(synth.subject(5), "t1", 2)[0].numpy()
    fixed = _save(folder / "fixed.nii.gz", data, synth.affine)
    moving = []
    for i in range(7):
        t = np.eye(4)
        t[:3, :3] = rotation_matrix(np.array([1.0, 0.5 * i, 2.0 - i]), 20.0 * i)
        t[:3, 3] = (3.0 * i, -2.0, 1.5 * i)
        moving.append(_save(folder / f"moving{i}.nii.gz", data, t @ synth.affine))
    torch.manual_seed(0)
    weights = folder / "tiny.pt"
    torch.save(_tiny_net().state_dict(), weights)
    return {"folder": folder, "fixed": fixed, "moving": moving, "weights": str(weights)}


def _datalist(cohort, name: str, moving: list[str]) -> str:
    path = cohort["folder"] / f"{name}.json"
    path.write_text(json.dumps({"test_pairs": [{"moving_image": m, "fixed_image": cohort["fixed"]} for m in moving]}))
    return str(path)


def _args(cohort, datalist: str, out: Path, config: str = "configs/inference.json") -> list[str]:
    return [
        "run", "inference", "--config_file", config, "--ckpt_path", cohort["weights"], "--datalist", datalist,
        "--output_dir", str(out), "--write_png", "false", "--amp", "false", "--skull_strip", "false", *TINY,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_give_the_one_process_results_in_one_merged_record(cohort, tmp_path):
    """Five pairs (odd) on two ranks, one of them broken (rank 1's first pair): the same matrices as one process, one
    merged results.csv with each pair once in list order, the failure in the merged failures.json."""
    moving = list(cohort["moving"][:5])
    moving[1] = str(cohort["folder"] / "no_such_scan.nii.gz")
    datalist = _datalist(cohort, "five", moving)
    one = bundle_cli(*_args(cohort, datalist, tmp_path / "one"), check=False, env=ONE_THREAD)
    two = bundle_cli(
        *_args(cohort, datalist, tmp_path / "two", OVERLAY), check=False, env=ONE_THREAD, launcher=torchrun_command(2)
    )
    log = two.stdout + two.stderr
    assert one.returncode != 0 and two.returncode != 0, log[-3000:]  # the broken pair fails the run (after the rest)
    for run in ("one", "two"):
        rows = _rows(tmp_path / run)
        assert [int(r["pair"]) for r in rows] == list(range(5)), rows
        assert [r["moving"] for r in rows] == moving
        assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok", "ok"]
        (failure,) = json.loads((tmp_path / run / "failures.json").read_text())
        assert failure["pair"] == 1 and failure["stage"] == "load" and "no_such_scan.nii.gz" in failure["error"]
    for m in moving[::2] + moving[3:4]:
        stem = Path(m).name.replace(".nii.gz", "")
        a = json.loads((tmp_path / "one" / f"{stem}.json").read_text())
        b = json.loads((tmp_path / "two" / f"{stem}.json").read_text())
        np.testing.assert_allclose(b["fixed_to_moving_ras"], a["fixed_to_moving_ras"], atol=1e-5)
        np.testing.assert_allclose(b["keypoints_moving_ras_mm"], a["keypoints_moving_ras_mm"], atol=1e-5)
        assert a["run"]["fingerprint"] == b["run"]["fingerprint"]  # the same settings and weights
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    # every rank's log lines and progress bar name it; each rank says what its share is
    assert "[rank 0/2] registering 3 pairs" in log and "[rank 1/2] registering 2 pairs" in log
    assert "register [rank 1/2]" in log
    assert "1 of 5 pair(s) failed" in log


def test_pairs_batched_two_at_a_time_give_the_one_at_a_time_results(cohort, tmp_path):
    """``--batch_size 2``: pairs whose images have different grids share a batch (the network inputs are stacked, the
    refinement copies and brain masks stay per pair), a user mask given for one pair only, and a broken pair in a
    batch fails alone; every result is the one of a one-pair-at-a-time run."""
    import nibabel as nib

    src = nib.load(cohort["moving"][4])
    cut = cohort["folder"] / "moving_cut.nii.gz"  # another grid: 6 slices fewer
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, 3:-3], src.affine @ _shift(2, 3)), str(cut))
    mask = cohort["folder"] / "moving2_mask.nii.gz"
    img = nib.load(cohort["moving"][2])
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), str(mask))
    # batches of 2: [pair 0, the cut scan] (two grids), [the masked pair, one without], [the broken pair, a good one]
    moving = [cohort["moving"][0], str(cut), cohort["moving"][2], cohort["moving"][3],
              str(cohort["folder"] / "gone.nii.gz"), cohort["moving"][5]]  # fmt: skip
    pairs = [{"moving_image": m, "fixed_image": cohort["fixed"]} for m in moving]
    pairs[2]["moving_mask"] = str(mask)
    datalist = cohort["folder"] / "batched.json"
    datalist.write_text(json.dumps({"test_pairs": pairs}))
    # without refinement: the MI optimiser of this random tiny detector's poor starts turns the last-digit differences
    # of a batched convolution (5e-5 mm in the keypoints) into up to 1 mm; the refinement of batched items is
    # checked against one-by-one with the same detections in test_refine.py
    # (test_a_batch_of_differently_gridded_pairs_is_refined_and_judged_item_by_item)
    args = ("--refine", "false")
    one = bundle_cli(*_args(cohort, str(datalist), tmp_path / "one"), *args, check=False, env=ONE_THREAD)
    two = bundle_cli(
        *_args(cohort, str(datalist), tmp_path / "two"), *args, "--batch_size", "2", check=False, env=ONE_THREAD
    )
    assert one.returncode != 0 and two.returncode != 0  # the broken pair, after the others
    log = two.stdout + two.stderr
    assert "1 of 6 pair(s) failed" in log and "Traceback" not in log.split("1 of 6 pair(s) failed")[0], log[-3000:]
    for run in ("one", "two"):
        assert [r["status"] for r in _rows(tmp_path / run)] == ["ok", "ok", "ok", "ok", "failed", "ok"]
    for m in moving[:4] + moving[5:]:
        stem = Path(m).name.replace(".nii.gz", "")
        a = json.loads((tmp_path / "one" / f"{stem}.json").read_text())
        b = json.loads((tmp_path / "two" / f"{stem}.json").read_text())
        np.testing.assert_allclose(b["fixed_to_moving_ras"], a["fixed_to_moving_ras"], atol=1e-4)
        np.testing.assert_allclose(b["keypoints_moving_ras_mm"], a["keypoints_moving_ras_mm"], atol=1e-4)
        assert b["quality"]["verdict"] == a["quality"]["verdict"]
        assert b["quality"]["nmi"] == pytest.approx(a["quality"]["nmi"], abs=1e-4)
    assert (tmp_path / "two" / "moving2_brainmask.nii.gz").is_file()  # the user mask of the pair that has one
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


def _shift(axis: int, voxels: int) -> np.ndarray:
    """The voxel-to-voxel matrix of dropping the first ``voxels`` slices along ``axis``."""
    t = np.eye(4)
    t[axis, 3] = voxels
    return t


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_killed_two_rank_run_resumes_without_redoing_or_losing_a_pair(cohort, tmp_path):
    datalist = _datalist(cohort, "seven", cohort["moving"])
    out = tmp_path / "out"
    cmd = [*torchrun_command(2), "-m", "monai.bundle", *_args(cohort, datalist, out, OVERLAY)]
    proc = subprocess.Popen(
        cmd, cwd=BUNDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", **ONE_THREAD),
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while not list(out.glob("moving*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:  # torchrun and both ranks (each in its own session), mid-run, as a preempted machine would
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("moving*.json")}
    assert 1 <= len(done) < 7 and not (out / "results.csv").exists(), done  # killed after a pair, before the end
    res = bundle_cli(*_args(cohort, datalist, out, OVERLAY), env=ONE_THREAD, launcher=torchrun_command(2))
    log = res.stdout + res.stderr
    skipped = [int(n) for n in re.findall(r"(\d+) of \d+ pairs already done", log)]
    assert sum(skipped) == len(done), log[-3000:]
    for name, mtime in done.items():  # not redone: the very files of the killed run
        assert (out / name).stat().st_mtime_ns == mtime, name
    rows = _rows(out)
    assert [int(r["pair"]) for r in rows] == list(range(7)) and {r["status"] for r in rows} == {"ok"}
    assert sorted(Path(r["json"]).name for r in rows) == sorted(f"moving{i}.json" for i in range(7))
    for r in rows:
        record = json.loads(Path(r["json"]).read_text())
        assert record["run"]["inputs"]["moving_image"]["path"] == r["moving"]
        assert all((out / Path(p).name).is_file() for p in record["outputs"].values())


def test_rerun_with_other_settings_redoes_the_pairs_and_says_why(cohort, tmp_path):
    """As people type it, from the bundle folder: the second run turns refinement off (``--refine false``), so the
    first run's results must not be passed off as its own."""
    datalist = _datalist(cohort, "two", cohort["moving"][:2])
    out = tmp_path / "out"
    bundle_cli(*_args(cohort, datalist, out))
    first = json.loads((out / "moving1.json").read_text())
    res = bundle_cli(*_args(cohort, datalist, out), "--refine", "false")
    log = res.stdout + res.stderr
    assert log.count("refine: true -> false") == 2 and "already done" not in log
    second = json.loads((out / "moving1.json").read_text())
    assert first["run"]["settings"]["refine"] is True and second["run"]["settings"]["refine"] is False
    assert first["fixed_to_moving_ras"] != second["fixed_to_moving_ras"]  # refinement moved it; now it is not run
    res = bundle_cli(*_args(cohort, datalist, out), "--refine", "false")
    assert "2 of 2 pairs already done" in res.stdout + res.stderr
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"]
    res = bundle_cli(*_args(cohort, datalist, out), "--refine", "false", "--resume", "no")
    assert "already done" not in res.stdout + res.stderr
    assert json.loads((out / "moving1.json").read_text())["fixed_to_moving_ras"] == second["fixed_to_moving_ras"]


def test_evaluation_on_two_ranks_reports_every_pair_once_as_one_process_does(cohort, tmp_path):
    """``multi_gpu_evaluate.json``: five synthetic evaluation pairs (one per angle) shared over two ranks; one report,
    the same per-pair errors and Dice as the one-process evaluation."""
    args = ["--ckpt_path", cohort["weights"], "--pairs_per_angle", "1", "--amp", "false", *TINY]
    configs = "['configs/train.json','configs/evaluate.json']"
    bundle_cli("run", "evaluating", "--config_file", configs, "--output_dir", str(tmp_path / "one"), *args,
               env=ONE_THREAD)  # fmt: skip
    res = bundle_cli(
        "run", "evaluating", "--config_file", configs.replace("]", ",'configs/multi_gpu_evaluate.json']"),
        "--output_dir", str(tmp_path / "two"), *args, env=ONE_THREAD, launcher=torchrun_command(2),
    )  # fmt: skip
    one, two = (list(csv.DictReader(open(tmp_path / r / "metrics.csv", newline=""))) for r in ("one", "two"))
    assert [int(r["pair"]) for r in two] == list(range(5))
    for a, b in zip(one, two):
        for key in ("seed", "rotation_deg", "moving_contrast"):  # the same pair in the same place
            assert a[key] == b[key], (key, a, b)
        assert abs(float(a["error_mm"]) - float(b["error_mm"])) < 1e-4, (a, b)
        assert abs(float(a["dice"]) - float(b["dice"])) < 1e-5, (a, b)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text())["overall"] for r in ("one", "two"))
    assert s2["pairs"] == 5 and abs(s1["median_error_mm"] - s2["median_error_mm"]) < 1e-4
    log = res.stdout + res.stderr
    assert "[rank 1/2]" in log and "evaluate [rank 1/2]" in log


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
