"""The benchmark harness (benchmarks/bench_registration.py): pairs with a known truth, the ITK matrix conversion of
the baselines, the report of known runs, and a smoke run of every method on the same pairs. The quick, full and
weights modes are these sources at more angles (minutes to an hour of runs): they stay in the benchmark."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import benchmark_module

bench = benchmark_module("bench_registration")


def test_itk_matrix_is_the_ras_world_transform():
    """An ITK affine (LPS, centre c) and our RAS world matrix map the same physical points."""
    rng = np.random.default_rng(0)
    a, t, c = rng.normal(size=(3, 3)) + 2 * np.eye(3), rng.normal(size=3) * 10, rng.normal(size=3) * 20
    m = bench._itk_matrix(a, t, c)
    x_ras = rng.normal(size=3) * 50
    x_lps = x_ras * [-1, -1, 1]
    y_lps = a @ (x_lps - c) + t + c
    assert np.allclose((m[:3, :3] @ x_ras + m[:3, 3]) * [-1, -1, 1], y_lps)


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """One pair of each source the modes use (``synthetic``: quick, full, weights; ``synthetic_same``: full,
    weights; ``mni``: quick, full), 120 degrees apart, written by ``make_pairs``."""
    out = tmp_path_factory.mktemp("bench_pairs")
    sources = ("synthetic", "synthetic_same", "mni")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench.MODES, "tiny", {"angles": (120,), "per_angle": 1, "sources": sources})
        pairs = bench.make_pairs(out, "tiny")
    assert [p["source"] for p in pairs] == list(sources)
    return out, pairs


def test_pairs_carry_their_truth(tiny_pairs):
    """Through the true matrix, the moving labels land on the fixed labels (real MNI T1 and synthetic pairs, other
    contrast and same contrast)."""
    _, pairs = tiny_pairs
    assert [p["contrast"] for p in pairs][1:] == ["t1", "remapped"] and pairs[0]["contrast"] in ("t2", "pd", "random")
    for p in pairs:
        truth = np.asarray(p["fixed_to_moving_ras"])
        assert bench.score(p, truth.tolist())["dice"] > 0.8, p["id"]
        assert bench.score(p, np.eye(4).tolist())["dice"] < 0.5  # 120 degrees apart without it
        off = truth.copy()
        off[:3, 3] += [3.0, 0.0, 4.0]  # every fixed point lands 5 mm from where the truth puts it
        assert bench.score(p, off.tolist())["error_mm"] == pytest.approx(5.0, abs=1e-6), p["id"]


def test_report_of_known_runs(tiny_pairs, tmp_path):
    """``report`` (what ``main`` ends with, and ``python benchmarks/bench_registration.py report`` alone) on runs with
    known matrices and times: success rate, medians by angle and by source, the time ratio to ANTs, the table."""
    out, pairs = tiny_pairs
    labelled = [dict(p) for p in pairs]
    for p, angle in zip(labelled, (0.0, 0.0, 90.0)):  # the report groups by the recorded angle
        p["angle"] = angle
    (tmp_path / "pairs.json").write_text(json.dumps(labelled))

    def shifted(p: dict, mm: float) -> list:
        m = np.asarray(p["fixed_to_moving_ras"])
        m[:3, 3] += [0.0, mm, 0.0]
        return m.tolist()

    runs = {  # method: [(matrix, seconds, cpu seconds, error)] per pair
        "keymorph": [(shifted(pairs[0], 0.5), 2.0, 4.0, None), (shifted(pairs[1], 3.0), 4.0, 8.0, None),
                     (None, 6.0, 12.0, "RuntimeError: no keypoints")],
        "ants": [(shifted(pairs[0], 1.0), 8.0, 16.0, None), (shifted(pairs[1], 1.5), 10.0, 20.0, None),
                 (shifted(pairs[2], 40.0), 12.0, 24.0, None)],
    }  # fmt: skip
    for method, results in runs.items():
        records = [
            {"id": p["id"], "matrix": m, "seconds": s, "cpu_seconds": c, "error": e}
            for p, (m, s, c, e) in zip(pairs, results)
        ]
        run = {"method": method, "setup_s": 1.0, "peak_mb": 100.0, "settings": {}, "pairs": records}
        (tmp_path / f"run_{method}.json").write_text(json.dumps(run))
    summary = bench.report(str(tmp_path), "weights", "keymorph,ants")
    km, ants = summary["keymorph"], summary["ants"]
    assert km["success"] == pytest.approx(1 / 3) and ants["success"] == pytest.approx(2 / 3)
    assert km["median_mm"] == pytest.approx(3.0, abs=1e-6) and ants["median_mm"] == pytest.approx(1.5, abs=1e-6)
    assert km["by_angle"]["0"] == {"median_mm": pytest.approx(1.75, abs=1e-6), "success": 0.5, "n": 2}
    assert km["by_angle"]["90"] == {"median_mm": None, "success": 0.0, "n": 1}  # failed: no finite median
    assert ants["by_angle"]["90"]["median_mm"] == pytest.approx(40.0, abs=1e-6)
    assert km["by_source"]["synthetic_same"] == {"median_mm": pytest.approx(3.0, abs=1e-6), "success": 0.0, "n": 1}
    assert km["time_vs_ants"] == pytest.approx(4.0 / 10.0) and km["cpu_vs_ants"] == pytest.approx(8.0 / 20.0)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["failure"] for r in rows if r["method"] == "keymorph"] == ["", "", "RuntimeError: no keypoints"]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("3 pairs (weights mode)")
    assert "| keymorph | 33 % | 3.00 |" in table and "| ants | 67 % | 1.50 |" in table
    assert "| keymorph | 1.75 / 50 % | failed / 0 % |" in table, table
    dice = [bench.score(p, m)["dice"] for p, (m, *_) in zip(pairs[:2], runs["keymorph"])]
    assert km["dice"] == pytest.approx(np.mean(dice)), "the mean Dice of the pairs that gave a matrix"
    assert json.loads((tmp_path / "summary.json").read_text())["keymorph"]["by_angle"]["90"]["median_mm"] is None
    assert (tmp_path / "robustness.png").stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("ants") is None, reason="the [bench] extra (antspyx) is not installed")
def test_smoke_run_against_the_baselines(tmp_path):
    methods = ("keymorph_refine", "ants", "elastix")  # plain keymorph runs the same code without the refiner
    summary = bench.main(mode="smoke", out_dir=str(tmp_path), methods=",".join(methods))
    assert set(summary) == set(methods)
    for name in ("table.md", "robustness.png", "results.csv", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * len(methods)
    err = {(r["method"], float(r["angle"])): float(r["error_mm"]) for r in rows}
    # KeyMorph with refinement is sub-millimetre at both angles; the classical tools only where they start close
    assert err[("keymorph_refine", 0.0)] < 1.0 and err[("keymorph_refine", 90.0)] < 1.0, err
    assert err[("ants", 0.0)] < 1.0 and err[("elastix", 0.0)] < 1.0, err  # their matrices are read correctly
    seconds = {m: float(np.median([float(r["seconds"]) for r in rows if r["method"] == m])) for m in methods}
    for m in methods:  # each method's time as a ratio to ANTs' time in the same run, from the per-pair rows
        assert summary[m]["time_vs_ants"] == pytest.approx(seconds[m] / seconds["ants"], rel=1e-6), m
    assert json.loads((tmp_path / "summary.json").read_text())["keymorph_refine"]["success"] == 1.0


def _run_script(script: str, *args: str, cwd=None) -> str:
    """``python benchmarks/<script> <args>`` as typed from the repository root; its standard output."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=cwd or root,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_bench_data_prints_consistent_figures():
    """``bench_data.py``: the generation rate, the training step time and their ratio (pairs made per step) agree."""
    out = _run_script("bench_data.py", "--spatial_size", "32", "--pairs", "2", "--keypoints", "8", "--steps", "1")
    fig = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    assert fig["grid"] == "32^3 at 2.0 mm", out
    per_s, s_per_pair, step_s, ratio = (
        float(fig[k]) for k in ("data_pairs_per_s", "data_s_per_pair", "train_step_s", "pairs_per_step_one_worker")
    )
    assert s_per_pair > 0 and step_s > 0, out
    assert per_s == pytest.approx(1 / s_per_pair, rel=0.05, abs=0.01), out
    assert ratio == pytest.approx(step_s / s_per_pair, rel=0.05, abs=0.06), out


def test_bench_memory_runs_the_bundle_and_reports_every_pair(tmp_path):
    """``bench_memory.py`` on small inputs (2 pairs, a 64^3 1 mm pair, no search, no refinement): both workloads run
    the bundle's inference (outputs written for every pair), and the figures it prints hold together (a peak is at
    least every resident size sampled before it; one RSS sample per pair)."""
    work = tmp_path / "work"
    out = _run_script(
        "bench_memory.py", "--pairs", "2", "--size", "64", "--work_dir", str(work),
        "--orientation_search", "false", "--refine", "false", "--png", "false", "--trim", "false",
    )  # fmt: skip
    assert "1. one 64^3 1 mm pair (search false, refine false, png false)" in out, out
    assert "2. 2 consecutive pairs of 2 mm brains (search false, refine false, png false):" in out, out  # no trim
    peak_1, setup_1 = (
        float(x) for x in re.search(r"peak RSS (\d+) MB \(imports and setup alone (\d+) MB", out).groups()
    )
    assert 0 < setup_1 <= peak_1, out
    first, last, most, peak = (
        float(x)
        for x in re.search(
            r"RSS after pair 1 (\d+) MB, after the last (\d+) MB, max (\d+) MB, peak (\d+) MB", out
        ).groups()
    )
    assert max(first, last) <= most <= peak, out
    assert (work / "out_1mm" / "moving_1mm.json").is_file()
    pairs = json.loads((work / "pairs.json").read_text())["test_pairs"]
    assert len(pairs) == 2
    for item in pairs:
        record = json.loads(
            (work / "out_pairs" / f"{Path(item['moving_image']).name[: -len('.nii.gz')]}.json").read_text()
        )
        settings = record["run"]["settings"]
        assert (settings["refine"], settings["orientation_search"], settings["write_png"]) == (False, False, False)
        assert record["quality"]["verdict"] in ("ok", "suspect", "failed")  # a registration was made and judged
