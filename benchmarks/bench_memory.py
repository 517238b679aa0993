"""Memory of the bundle's inference: peak resident memory for a 1 mm 256^3 pair, and resident memory over many pairs.

    python benchmarks/bench_memory.py [--pairs 50 --size 256 --work_dir /tmp/bench_memory --orientation_search True
                                       --refine True --png True --trim False]

Each workload runs in its own child process (``python benchmarks/bench_memory.py worker ...``) through exactly what
``python -m monai.bundle run inference --config_file configs/inference.json`` runs (a ``ConfigWorkflow`` of the
shipped config and weights: load, preprocess, register, write full-resolution NIfTI, JSON, ITK and PNG outputs), with
one extra handler recording the resident set size (RSS) after every pair. The peak is the child's high-water mark
(``VmHWM`` of ``/proc/self/status``; stdlib ``resource.ru_maxrss`` where there is no ``/proc``), which counts
everything the process ever held, Python and torch included. The data are made in a process of their own.

1. one pair of synthetic 1 mm brains on 256^3 grids (the moving one rotated by 20 degrees);
2. ``--pairs`` consecutive pairs of 2 mm brains (97 x 113 x 97, five subjects x contrasts): RSS after each pair,
   printed as first / last / max, the growth from pair 5 to the last (the first pairs allocate the caches) and the
   means of the first and last fifth. ``--trim True`` reads the RSS after glibc's ``malloc_trim(0)``: memory in use,
   without the freed memory the allocator keeps for reuse.

It prints figures; it is not a test (the unit tests never time or measure memory).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
MB = 2**20


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; psutil elsewhere if installed, else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return _peak_bytes()


def _peak_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` of ``/proc/self/status`` on Linux (the high-water mark of
    this program's memory), else ``ru_maxrss`` (KiB on Linux, bytes on macOS). Linux carries ``ru_maxrss`` over
    ``exec`` from the process that forked, hence ``VmHWM`` first, and the data made in a process of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _make_data(work: Path, size: int, pairs: int) -> tuple[Path, Path, Path]:
    """Write the 1 mm pair and the pair list of 2 mm brains (skipped if present); returns (fixed, moving, list)."""
    import torch

    from custom_nets.data import BrainSynthesizer, save_nifti
    from custom_nets.data.augment import rotation_matrix
    from custom_nets.geometry import resample

    work.mkdir(parents=True, exist_ok=True)
    fixed_1mm, moving_1mm, pair_list = work / "fixed_1mm.nii.gz", work / "moving_1mm.nii.gz", work / "pairs.json"
    if not (fixed_1mm.is_file() and moving_1mm.is_file()):
        synth = BrainSynthesizer(spatial_size=size // 2, pixdim=2.0)
        img = synth.image(synth.subject(7), "t1", 1)[None]
        a2 = torch.as_tensor(synth.affine)
        a1 = a2.clone()
        a1[:3, :3] = a2[:3, :3] / 2
        a1[:3, 3] = a2[:3, 3] - 0.5  # the same 256 mm box, 1 mm voxels
        centre = a2[:3, :3] @ torch.full((3,), (size // 2 - 1) / 2, dtype=torch.float64) + a2[:3, 3]
        motion = torch.eye(4, dtype=torch.float64)
        motion[:3, :3] = torch.as_tensor(rotation_matrix(np.array([1.0, 0.3, 0.2]), 20.0))
        motion[:3, 3] = centre - motion[:3, :3] @ centre + torch.tensor([5.0, -3.0, 4.0], dtype=torch.float64)
        for path, t in ((fixed_1mm, torch.eye(4, dtype=torch.float64)), (moving_1mm, motion)):
            out = resample(img.float(), t, (size,) * 3, a1, a2)[0, 0]
            save_nifti(out.numpy(), a1.numpy(), path)
    images = [(subject, contrast) for subject in range(5) for contrast in ("t1", "t2")]
    rng = np.random.default_rng(0)
    chosen = [rng.choice(len(images), size=2, replace=False) for _ in range(int(pairs))]
    used = {int(i) for pair in chosen for i in pair}  # only the images the pairs use are written
    synth = BrainSynthesizer(spatial_size=(97, 113, 97), pixdim=2.0)
    paths = [str(work / f"sub-{subject}_{contrast}.nii.gz") for subject, contrast in images]
    for i in sorted(used):
        (subject, contrast), path = images[i], Path(paths[i])
        if not path.is_file():
            save_nifti(synth.image(synth.subject(100 + subject), contrast, subject)[0].numpy(), synth.affine, path)
    items = []
    for i, (f, m) in enumerate(chosen):
        moving = work / f"pair-{i:03d}.nii.gz"  # a distinct name per pair: outputs are named after the moving image
        if not moving.exists():
            moving.symlink_to(paths[m])
        items.append({"fixed_image": paths[f], "moving_image": str(moving)})
    pair_list.write_text(json.dumps({"test_pairs": items}))
    return fixed_1mm, moving_1mm, pair_list


def _malloc_trim() -> bool:
    """Ask glibc to return freed heap memory to the system (``malloc_trim(0)``); False where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def worker(out_dir: str, trim: bool = False, **overrides: object) -> None:
    """Run the bundle's inference workflow in this process and print one JSON line of memory figures.

    ``trim``: call glibc's ``malloc_trim(0)`` after each pair before reading the RSS, which separates memory still in
    use from freed memory the allocator keeps (a diagnostic: the bundle itself never calls it)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from custom_nets.options import parse_bool

    baseline = _rss_bytes()
    trim = parse_bool(trim, "--trim")  # `--trim false` as people type it (fire passes the string)
    os.chdir(BUNDLE)
    workflow = ConfigWorkflow(
        config_file="configs/inference.json",
        meta_file="configs/metadata.json",
        logging_file="configs/logging.conf",
        workflow_type="infer",
        output_dir=out_dir,
        resume=False,  # measured: every pair registered, even into a folder of an earlier run
        **overrides,
    )
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    samples: list[int] = []
    peaks: list[int] = []
    times: list[float] = []

    def record(engine: Any) -> None:
        if trim:
            _malloc_trim()
        samples.append(_rss_bytes())
        peaks.append(_peak_bytes())
        times.append(time.perf_counter())
        print(f"PAIR {len(samples)} rss_mb {samples[-1] / MB:.1f} peak_mb {peaks[-1] / MB:.1f}", flush=True)

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, record)
    ready = _rss_bytes()
    start = time.perf_counter()
    workflow.run()
    workflow.finalize()
    print(
        "RESULT "
        + json.dumps(
            {
                "baseline_mb": baseline / MB,
                "after_setup_mb": ready / MB,
                "peak_mb": _peak_bytes() / MB,
                "rss_after_pair_mb": [s / MB for s in samples],
                "peak_after_pair_mb": [s / MB for s in peaks],
                "seconds": time.perf_counter() - start,
                "seconds_per_pair": [b - a for a, b in zip([start, *times], times)],
            }
        )
    )


def _run_worker(out_dir: Path, **overrides: object) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "worker", "--out_dir", str(out_dir)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    res = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(
    pairs: int = 50,
    size: int = 256,
    work_dir: str | None = None,
    orientation_search: bool = True,
    refine: bool = True,
    png: bool = True,
    trim: bool = False,
) -> None:
    """Make the data, run both workloads in child processes and print the figures (MB = 2^20 bytes).

    ``trim``: in the many-pairs run, release the allocator's free memory after each pair before measuring (glibc
    ``malloc_trim``), so that the series shows memory in use rather than memory the allocator keeps for reuse."""
    from custom_nets.options import parse_bool

    trim = parse_bool(trim, "--trim")  # the bundle options below are parsed by the bundle config itself
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    script = str(Path(__file__).resolve())
    subprocess.run([sys.executable, script, "data", str(work), str(size), str(pairs)], check=True)
    fixed, moving, pair_list = work / "fixed_1mm.nii.gz", work / "moving_1mm.nii.gz", work / "pairs.json"
    common = {"orientation_search": orientation_search, "refine": refine, "write_png": png}

    one = _run_worker(work / "out_1mm", moving=moving, fixed=fixed, **common)
    settings = f"search {orientation_search}, refine {refine}, png {png}"
    print(f"1. one {size}^3 1 mm pair ({settings}), full bundle inference path:")
    print(
        f"   peak RSS {one['peak_mb']:.0f} MB (imports and setup alone {one['after_setup_mb']:.0f} MB), "
        f"{one['seconds']:.1f} s"
    )

    many = _run_worker(work / "out_pairs", datalist=pair_list, trim=trim, **common)
    rss = np.asarray(many["rss_after_pair_mb"])
    late = rss[min(4, len(rss) - 1) :]
    slope = float(np.polyfit(np.arange(late.size), late, 1)[0]) if late.size > 2 else float("nan")
    trimmed = ", RSS read after malloc_trim" if trim else ""
    print(f"2. {len(rss)} consecutive pairs of 2 mm brains ({settings}{trimmed}):")
    print(
        f"   RSS after pair 1 {rss[0]:.0f} MB, after the last {rss[-1]:.0f} MB, max {rss.max():.0f} MB, "
        f"peak {many['peak_mb']:.0f} MB"
    )
    tenth = max(1, len(rss) // 5)
    print(
        f"   growth from pair {min(5, len(rss))} to the last: {late[-1] - late[0]:+.1f} MB "
        f"(linear fit {slope:+.2f} MB per pair; mean of the first {tenth} pairs {rss[:tenth].mean():.0f} MB, of the "
        f"last {tenth} {rss[-tenth:].mean():.0f} MB), {many['seconds'] / max(len(rss), 1):.1f} s per pair"
    )
    print(f"   data and outputs in {work}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        fire.Fire(worker, command=sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "data":
        _make_data(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        fire.Fire(main)
