"""Cohort throughput and memory of the bundle's batch inference: one process against ``torchrun`` ranks.

    python benchmarks/bench_cohort.py main [--num 200 --memory_counts "50,200" --nproc 2 --batch_size 2
                                            --refine True --num_workers 2 --work_dir bench_cohort_out]

A synthetic cohort of ``--num`` pairs (2 mm brains, 97 x 113 x 97: a pool of 24 posed moving scans, T1 / T2 / PD,
rotated up to 180 degrees, and 4 fixed T1 scans; pair ``i`` reads moving scan ``i % 24`` through a link of its own
name, so every pair has its own outputs) is registered by exactly what users run:

1. ``python -m monai.bundle run inference --config_file configs/inference.json --datalist cohort.json`` (one process);
2. ``torchrun --standalone --nproc_per_node N -m monai.bundle run inference --config_file
   "['configs/inference.json','configs/multi_gpu_inference.json']" ...`` (N processes; on CPU each gets
   ``OMP_NUM_THREADS = cores / N``, on GPUs one device each);

3. the one-process command with ``--batch_size B`` (pairs per network call; ``--batch_size 1`` skips it);

each into a fresh folder, with the shipped weights and the default settings (``--refine`` to change). It prints pairs
per second of each (wall clock of the whole command, model loading included) and the ratios, how far the matrices of
the ``torchrun`` and the batched runs are from the one-process run's (mean displacement over a 120 mm box about the
brain, mm: largest and median over the pairs), and the peak resident
memory of every process (its ``VmHWM``, recorded by a wrapper around the bundle's entry point) for runs of each of
``--memory_counts`` pairs, which should be flat in the number of pairs. On a machine with GPUs the same runs are made
with 1 and all GPUs, keypoints only and with refinement; without one that part is skipped with a message.

It prints figures and writes ``summary.json``; it is not a test.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np
from bench_memory import _peak_bytes as peak_bytes  # this folder is on sys.path when a script of it runs

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
POOL = 24
MB = 2**20


def make_cohort(work: Path, num: int, seed: int = 0) -> Path:
    """Write the pool of scans (once) and a pair list of ``num`` pairs; returns the pair list's path."""
    from custom_nets.data import BrainSynthesizer, rotation_matrix, save_nifti, subject_seed
    from custom_nets.data.template import BRAIN_CENTRE_MNI

    pool = work / "pool"
    if not (pool / f"moving{POOL - 1:02d}.nii.gz").is_file():
        pool.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        synth = BrainSynthesizer(spatial_size=(97, 113, 97), pixdim=2.0)
        c = np.asarray(BRAIN_CENTRE_MNI, dtype=np.float64)
        for i in range(4):
            image = synth.image(synth.subject(subject_seed("test", 300 + i)), "t1", 2000 + i)[0].numpy()
            save_nifti(image, synth.affine, pool / f"fixed{i}.nii.gz")
        for i in range(POOL):
            pose = np.eye(4)
            pose[:3, :3] = rotation_matrix(rng.normal(size=3), float(rng.uniform(0.0, 180.0)))
            pose[:3, 3] = c - pose[:3, :3] @ c + rng.uniform(-15.0, 15.0, size=3)
            subject = synth.subject(subject_seed("test", 300 + i % 4), pose=pose)
            image = synth.image(subject, ("t1", "t2", "pd")[i % 3], 3000 + i)[0].numpy()
            save_nifti(image, synth.affine, pool / f"moving{i:02d}.nii.gz")
    links = work / f"links{num}"
    links.mkdir(exist_ok=True)
    pairs = []
    for i in range(num):
        link = links / f"scan{i:05d}.nii.gz"
        if not link.is_symlink():
            link.symlink_to(pool / f"moving{i % POOL:02d}.nii.gz")
        pairs.append({"moving_image": str(link), "fixed_image": str(pool / f"fixed{i % 4}.nii.gz")})
    path = work / f"cohort{num}.json"
    path.write_text(json.dumps({"test_pairs": pairs}))
    return path


def wrapper(record: str, *args: str) -> None:
    """Run ``python -m monai.bundle *args`` in this process, then write its peak memory to ``record`` + rank."""
    sys.argv = ["monai.bundle", *args]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
    finally:
        rank = os.environ.get("RANK", "0")
        Path(f"{record}.rank{rank}").write_text(str(peak_bytes()))


def _run(work: Path, name: str, datalist: Path, nproc: int, extra: list[str], gpu: bool) -> dict[str, Any]:
    out = work / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    configs = "['configs/inference.json','configs/multi_gpu_inference.json']" if nproc > 1 else "configs/inference.json"
    bundle_args = ["run", "inference", "--config_file", configs, "--datalist", str(datalist), "--output_dir", str(out),
                   "--write_png", "false", *extra]  # fmt: skip
    record = out / "peak"
    script = [str(Path(__file__).resolve()), "wrapper", str(record), *bundle_args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    pairs = json.loads(datalist.read_text())["test_pairs"]
    rows = (out / "results.csv").read_text().strip().splitlines()[1:] if (out / "results.csv").is_file() else []
    peaks = sorted(int(p.read_text()) / MB for p in out.glob("peak.rank*"))
    result = {
        "run": name, "processes": nproc, "pairs": len(pairs), "rows": len(rows), "exit": res.returncode,
        "wall_s": round(wall, 1), "pairs_per_s": round(len(pairs) / wall, 4),
        "peak_mb_per_process": [round(p) for p in peaks],
    }  # fmt: skip
    if res.returncode != 0 or len(rows) != len(pairs):
        result["log_tail"] = (res.stdout + res.stderr)[-3000:]
    print(json.dumps(result), flush=True)
    return result


def _displacement_mm(a: Path, b: Path) -> dict[str, float]:
    """Largest and median mean displacement (mm, over a 120 mm box about the brain) between the matrices two runs
    wrote for the same pairs (``<stem>.json`` in each output folder)."""
    box = np.array([[x, y, z, 1.0] for x in (-60, 60) for y in (-60, 60) for z in (-60, 60)]) + [0.0, -18.0, 18.0, 0]
    found = []
    for path in sorted(a.glob("*.json")):
        other = b / path.name
        ra = json.loads(path.read_text())
        rb = json.loads(other.read_text()) if other.is_file() else {}
        if isinstance(ra, dict) and "fixed_to_moving_ras" in ra and "fixed_to_moving_ras" in rb:
            diff = np.asarray(ra["fixed_to_moving_ras"]) - np.asarray(rb["fixed_to_moving_ras"])
            found.append(float(np.linalg.norm((box @ diff.T)[:, :3], axis=1).mean()))
    if not found:
        return {"pairs": 0}
    return {"pairs": len(found), "max_mm": round(max(found), 4), "median_mm": round(float(np.median(found)), 4)}


def main(
    num: int = 200,
    memory_counts: str | int | tuple = "50,200",
    nproc: int = 2,
    batch_size: int = 2,
    refine: bool = True,
    num_workers: int = 2,
    work_dir: str = "bench_cohort_out",
) -> dict[str, Any]:
    """Throughput with 1 and ``nproc`` processes (and one process with ``batch_size`` pairs per network call) on
    ``num`` pairs, and peak memory per process at each of ``memory_counts`` pairs (one process and ``nproc``); see
    the module docs."""
    import torch

    from custom_nets.options import parse_bool

    refine = parse_bool(refine, "--refine")  # `--refine false` as people type it (fire passes the string)
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if isinstance(memory_counts, str):
        memory_counts = memory_counts.split(",")
    counts = [int(c) for c in (memory_counts if isinstance(memory_counts, (list, tuple)) else [memory_counts])]
    extra = ["--refine", str(bool(refine)).lower(), "--num_workers", str(int(num_workers))]
    summary: dict[str, Any] = {"num": num, "refine": bool(refine), "num_workers": int(num_workers),
                               "cpu_count": os.cpu_count(), "runs": []}  # fmt: skip
    datalist = make_cohort(work, num)
    one = _run(work, f"cpu_1x{num}", datalist, 1, extra, gpu=False)
    many = _run(work, f"cpu_{nproc}x{num}", datalist, nproc, extra, gpu=False)
    summary["runs"] += [one, many]
    summary["cpu_speedup"] = round(many["pairs_per_s"] / one["pairs_per_s"], 3)
    print(f"CPU: {one['pairs_per_s']:.3f} pairs/s with 1 process, {many['pairs_per_s']:.3f} with {nproc} "
          f"(x{summary['cpu_speedup']:.2f}) on {os.cpu_count()} cores", flush=True)  # fmt: skip
    summary["ranks_vs_one_process"] = _displacement_mm(work / one["run"], work / many["run"])
    print(f"matrices, {nproc} processes against 1: {summary['ranks_vs_one_process']}", flush=True)
    if int(batch_size) > 1:
        batched = _run(work, f"cpu_1x{num}_batch{int(batch_size)}", datalist, 1,
                       [*extra, "--batch_size", str(int(batch_size))], gpu=False)  # fmt: skip
        summary["runs"].append(batched)
        summary["batch_speedup"] = round(batched["pairs_per_s"] / one["pairs_per_s"], 3)
        summary["batch_vs_one_at_a_time"] = _displacement_mm(work / one["run"], work / batched["run"])
        print(f"CPU: {batched['pairs_per_s']:.3f} pairs/s with --batch_size {int(batch_size)} "
              f"(x{summary['batch_speedup']:.2f}); matrices against batch 1: {summary['batch_vs_one_at_a_time']}",
              flush=True)  # fmt: skip
    memory = {}
    for count in counts:
        runs = [r for r in (one, many) if r["pairs"] == count]
        if not runs:
            listed = make_cohort(work, count)
            runs = [_run(work, f"cpu_1x{count}", listed, 1, extra, False),
                    _run(work, f"cpu_{nproc}x{count}", listed, nproc, extra, False)]  # fmt: skip
            summary["runs"] += runs
        memory[count] = {r["processes"]: r["peak_mb_per_process"] for r in runs}
    summary["peak_mb_per_process_by_pairs"] = memory
    for count, by_proc in memory.items():
        print(f"peak memory at {count} pairs: " + ", ".join(f"{p} process(es): {m} MB" for p, m in by_proc.items()))
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("GPU: none here; the GPU runs (1 and all GPUs, keypoints only and with refinement) are skipped.")
        summary["gpu"] = "skipped: no GPU"
    else:
        summary["gpu"] = {}
        for label, flag in (("keypoints", "false"), ("refined", "true")):
            gextra = ["--refine", flag, "--num_workers", str(int(num_workers))]
            g1 = _run(work, f"gpu_1_{label}", datalist, 1, gextra, gpu=True)
            gn = _run(work, f"gpu_{gpus}_{label}", datalist, gpus, gextra, gpu=True)
            summary["gpu"][label] = {"1": g1["pairs_per_s"], str(gpus): gn["pairs_per_s"],
                                     "speedup": round(gn["pairs_per_s"] / g1["pairs_per_s"], 3)}  # fmt: skip
            print(f"GPU {label}: {g1['pairs_per_s']:.3f} pairs/s on 1 GPU, {gn['pairs_per_s']:.3f} on {gpus}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["wrapper"]:  # the bundle's own arguments, passed through untouched (not parsed by fire)
        wrapper(sys.argv[2], *sys.argv[3:])
    else:
        fire.Fire({"main": main})
