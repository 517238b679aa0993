"""KeyMorph against ANTs and elastix on the same held-out pairs, on this machine, in one run.

    python benchmarks/bench_registration.py main --mode quick --out_dir bench_out   # a few minutes (CI)
    python benchmarks/bench_registration.py main --mode full --out_dir bench_out    # the model card's table
    # the shipped weights: 10 pairs per angle bin and contrast setting
    python benchmarks/bench_registration.py main --mode weights --methods keymorph,keymorph_refine \
        --out_dir bench_weights

Pairs (written as NIfTI under ``out_dir/pairs``, 2 mm voxels, a 256 mm cube so any rotation keeps the head):

* ``synthetic``: held-out synthetic subjects (test seed stream, never used in training), fixed T1, moving T2 / PD /
  random contrast of the same anatomy, posed by a rotation of exactly each angle about a random axis, a random
  translation (+/- 15 mm) and scale (+/- 10 %). Both images are synthesised in their pose (neither is a resampled
  copy of the other), with their own bias field, blur, noise and gamma.
* ``synthetic_same`` (full mode): the same with a T1 moving image (same contrast, another acquisition).
* ``mni``: the real MNI ICBM152 T1 (from the nilearn wheel) as the fixed image; the moving image is the same T1
  posed the same way and put through a random non-monotonic intensity remapping (a different "contrast").

Methods, each in its own process (so that its peak resident memory is its own): ``keymorph`` (the bundle's
inference: orientation search, keypoint affine), ``keymorph_refine`` (the same plus ``refine``), ``ants``
(``antspyx`` ``Affine``, Mattes MI) and ``elastix`` (``itk-elastix`` default affine map, Mattes MI). The baselines
come with ``pip install -e .[bench]``. Every method gets 2 threads.

Reported per method and angle: success rate (mean error over the fixed brain below 2 mm), median error (mm), mean
tissue Dice (moving labels warped onto the fixed grid, CSF / GM / WM), seconds per pair (ratio to ANTs in the same
run), peak resident memory of the method's process. Writes ``results.csv``, ``summary.json``, ``table.md`` and
``robustness.png`` (median error against rotation angle, one line per method).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("keymorph", "keymorph_refine", "ants", "elastix")
MODES = {
    "smoke": {"angles": (0, 90), "per_angle": 1, "sources": ("synthetic",)},  # the test suite's run
    "quick": {"angles": (0, 90, 180), "per_angle": 1, "sources": ("synthetic", "mni")},
    "full": {
        "angles": (0, 30, 45, 60, 90, 135, 180),
        "per_angle": 2,
        "sources": ("synthetic", "synthetic_same", "mni"),
    },
    # the shipped weights' evaluation (model card): 10 held-out synthetic pairs per angle bin and per contrast setting
    "weights": {"angles": (0, 45, 90, 135, 180), "per_angle": 10, "sources": ("synthetic", "synthetic_same")},
}
SUCCESS_MM = 2.0
THREADS = 2
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (ITK's world)


# ----------------------------------------------------------------------------------------------------------- pairs
def _remap(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random non-monotonic intensity remapping of a [0, 1] image (a piecewise-linear curve through 6 knots, zero
    kept at zero): a new contrast for the same anatomy."""
    knots = np.linspace(0.0, 1.0, 6)
    values = np.concatenate([[0.0], rng.uniform(0.1, 1.0, size=5)])
    return np.interp(image, knots, values).astype(np.float32) * (image > 0)


def make_pairs(out_dir: str | Path, mode: str = "quick", seed: int = 0) -> list[dict[str, Any]]:
    """Write the benchmark pairs (NIfTI) and ``pairs.json``; returns its entries (see the module docstring)."""
    import torch

    from custom_nets.data import BrainSynthesizer, random_affine_matrix, save_nifti, subject_seed
    from custom_nets.data.template import BRAIN_CENTRE_MNI, load_tissue_template
    from custom_nets.fileio import write_json
    from custom_nets.geometry import resample

    cfg = MODES[mode]
    out = Path(out_dir) / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    synth = BrainSynthesizer(spatial_size=128, pixdim=2.0)
    affine = synth.affine
    rng = np.random.default_rng([seed, 17])
    template = load_tissue_template()
    t_aff = torch.as_tensor(template.affine)
    t1 = torch.from_numpy(template.t1)[None, None]
    t_lab = torch.from_numpy(template.probs.argmax(0).astype(np.float32))[None, None]
    grid = torch.as_tensor(affine)
    mni_fixed = resample(t1, torch.eye(4, dtype=torch.float64), synth.shape, grid, t_aff)[0, 0].numpy()
    mni_lab_f = resample(t_lab, torch.eye(4, dtype=torch.float64), synth.shape, grid, t_aff, mode="nearest")
    pairs: list[dict[str, Any]] = []
    k = 0
    for angle in cfg["angles"]:
        for j in range(cfg["per_angle"]):
            for source in cfg["sources"]:
                pose = random_affine_matrix(
                    rng, 0, 0.1, 0.0, 15.0, rotation_angle_deg=float(angle), centre=BRAIN_CENTRE_MNI
                )
                pid = f"{source}_{int(angle):03d}_{j}"
                if source in ("synthetic", "synthetic_same"):
                    sid = subject_seed("test", 1000 + k)
                    probs_f, probs_m = synth.subject(sid), synth.subject(sid, pose=pose)
                    contrast = ("t2", "pd", "random")[k % 3] if source == "synthetic" else "t1"
                    fixed = synth.image(probs_f, "t1", 2 * k + 1)[0].numpy()
                    moving = synth.image(probs_m, contrast, 2 * k + 2)[0].numpy()
                    lab_f, lab_m = synth.labels(probs_f)[0].numpy(), synth.labels(probs_m)[0].numpy()
                else:
                    contrast = "remapped"
                    posed = torch.linalg.inv(torch.as_tensor(pose))  # moving voxel x shows template point inv(pose) x
                    fixed, lab_f = mni_fixed, mni_lab_f[0, 0].numpy()
                    moving = _remap(resample(t1, posed, synth.shape, grid, t_aff)[0, 0].numpy(), rng)
                    lab_m = resample(t_lab, posed, synth.shape, grid, t_aff, mode="nearest")[0, 0].numpy()
                files = {}
                for name, data, dtype in (
                    ("fixed_image", fixed, np.float32),
                    ("moving_image", moving, np.float32),
                    ("fixed_label", lab_f, np.uint8),
                    ("moving_label", lab_m, np.uint8),
                ):
                    files[name] = str(save_nifti(data, affine, out / f"{pid}_{name}.nii.gz", dtype=dtype))
                pairs.append(
                    {
                        "id": pid,
                        "source": source,
                        "angle": float(angle),
                        "contrast": contrast,
                        **files,
                        "fixed_to_moving_ras": pose.tolist(),
                    }  # fmt: skip
                )
                k += 1
    write_json(Path(out_dir) / "pairs.json", pairs)
    return pairs


# --------------------------------------------------------------------------------------------------------- methods
class _KeyMorph:
    """The bundle's inference pipeline (configs/inference.json: preprocessing, network, weights, the KeyMorph
    inferer) in process."""

    def __init__(self, refine: bool, overrides: dict[str, Any] | None = None) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.data import list_data_collate

        from custom_nets.weights import VerifiedCheckpointLoader

        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundle" / "configs" / "inference.json"))
        parser["bundle_root"] = str(ROOT / "bundle")
        parser["refine"] = bool(refine)
        parser["num_workers"] = 0  # the preprocessing runs here, in this process: the brain extractor on its device
        for key, value in (overrides or {}).items():
            parser[key] = value
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network").eval()
        self.settings = {"device": str(self.device), "amp": bool(self.network.amp)}
        large_files = str(ROOT / "bundle" / "large_files.yml")
        ckpt = parser.get_parsed_content("ckpt_path")
        VerifiedCheckpointLoader(
            ckpt, {"model": self.network}, large_files=large_files, map_location=self.device
        ).load()
        self.inferer = parser.get_parsed_content("keymorph_inferer")
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.prepare = parser.get_parsed_content("prepare_batch")
        self.collate, self.torch = list_data_collate, torch

    def register(self, moving: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The inferer's :class:`~custom_nets.keymorph.KeyMorphOutput` for a prepared batch."""
        with self.torch.no_grad():
            return self.inferer(moving, self.network, *args, **kwargs)

    def __call__(self, pair: dict[str, Any]) -> np.ndarray:
        data = self.preprocessing({"fixed_image": pair["fixed_image"], "moving_image": pair["moving_image"]})
        moving, _, args, kwargs = self.prepare(self.collate([data]), self.device)
        return self.register(moving, args, kwargs).fixed_to_moving[0].double().cpu().numpy()


def _itk_matrix(matrix: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """World RAS 4 x 4 of an ITK affine (LPS, ``y = A (x - c) + t + c``, fixed points to moving points)."""
    m = np.eye(4)
    m[:3, :3] = matrix
    m[:3, 3] = translation + centre - matrix @ centre
    return LPS @ m @ LPS


class _Ants:
    def __init__(self) -> None:
        import ants

        self.ants = ants

    def __call__(self, pair: dict[str, Any]) -> np.ndarray:
        ants = self.ants
        fixed, moving = ants.image_read(pair["fixed_image"]), ants.image_read(pair["moving_image"])
        reg = ants.registration(fixed, moving, type_of_transform="Affine", aff_metric="mattes")
        tx = ants.read_transform(reg["fwdtransforms"][0])
        p, c = np.asarray(tx.parameters, dtype=np.float64), np.asarray(tx.fixed_parameters, dtype=np.float64)
        return _itk_matrix(p[:9].reshape(3, 3), p[9:12], c)


class _Elastix:
    def __init__(self) -> None:
        import itk

        self.itk = itk
        self.params = itk.ParameterObject.New()
        self.params.AddParameterMap(self.params.GetDefaultParameterMap("affine"))

    def __call__(self, pair: dict[str, Any]) -> np.ndarray:
        itk = self.itk
        fixed = itk.imread(pair["fixed_image"], itk.F)
        moving = itk.imread(pair["moving_image"], itk.F)
        _, result = itk.elastix_registration_method(fixed, moving, parameter_object=self.params, log_to_console=False)
        m = result.GetParameterMap(0)
        p = np.asarray([float(v) for v in m["TransformParameters"]])
        c = np.asarray([float(v) for v in m["CenterOfRotationPoint"]])
        return _itk_matrix(p[:9].reshape(3, 3), p[9:12], c)


def _make_method(name: str) -> Any:
    if name == "keymorph":
        return _KeyMorph(refine=False)
    if name == "keymorph_refine":
        return _KeyMorph(refine=True)
    if name == "ants":
        return _Ants()
    if name == "elastix":
        return _Elastix()
    raise ValueError(f"expected a method in {METHODS}, got {name!r}.")


def run_method(method: str, pairs_json: str, out_json: str) -> None:
    """Worker: register every pair of ``pairs_json`` with ``method``; writes matrices, seconds and peak memory."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
    import torch

    torch.set_num_threads(THREADS)
    pairs = json.loads(Path(pairs_json).read_text())
    t0 = time.perf_counter()
    reg = _make_method(method)
    setup = time.perf_counter() - t0
    results = []
    for pair in pairs:
        t, cpu = time.perf_counter(), time.process_time()
        try:
            matrix, error = reg(pair).tolist(), None
        except Exception as err:  # noqa: BLE001 - a failed pair is a result of the benchmark, not its end
            matrix, error = None, f"{type(err).__name__}: {err}"
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        results.append(
            {"id": pair["id"], "matrix": matrix, "seconds": seconds, "cpu_seconds": cpu_seconds, "error": error}
        )
        print(f"{method} {pair['id']}: {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    peak_mb = _peak_rss_mb()
    run = {"method": method, "setup_s": setup, "peak_mb": peak_mb, "settings": getattr(reg, "settings", {})}
    tmp = Path(f"{out_json}.tmp")  # not custom_nets.fileio: the baselines' processes must not load MONAI (peak memory)
    tmp.write_text(json.dumps({**run, "pairs": results}))
    os.replace(tmp, out_json)


def _cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` (reset by ``exec``, unlike ``ru_maxrss``, which a child
    inherits from the parent that forked it), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------------------- scoring
def score(pair: dict[str, Any], matrix: list | None) -> dict[str, float]:
    """Mean error over the fixed brain (mm) and mean CSF / GM / WM Dice of the warped moving labels."""
    import nibabel as nib
    import torch

    from custom_nets.geometry import resample
    from custom_nets.metrics import transform_error_mm

    if matrix is None:
        return {"error_mm": float("nan"), "dice": float("nan")}
    lab_f = nib.load(pair["fixed_label"])
    lab_m = nib.load(pair["moving_label"])
    a_f, a_m = torch.as_tensor(lab_f.affine), torch.as_tensor(lab_m.affine)
    fixed = torch.as_tensor(np.asarray(lab_f.dataobj, dtype=np.float32))[None, None]
    moving = torch.as_tensor(np.asarray(lab_m.dataobj, dtype=np.float32))[None, None]
    pred = torch.as_tensor(matrix, dtype=torch.float64)[None]
    truth = torch.as_tensor(pair["fixed_to_moving_ras"], dtype=torch.float64)[None]
    error = float(transform_error_mm(pred, truth, fixed, a_f[None]))
    warped = resample(moving, pred, fixed.shape[2:], a_f, a_m, mode="nearest")
    dice = []
    for c in (1, 2, 3):
        p, t = warped == c, fixed == c
        dice.append(float(2 * (p & t).sum() / max(1, int(p.sum() + t.sum()))))
    return {"error_mm": error, "dice": float(np.mean(dice))}


def _median_mm(errors: list[float] | np.ndarray) -> float | None:
    """Median error (mm) with failed pairs (NaN) counted as infinitely far; ``None`` when that median is infinite
    (more than half failed): JSON has no infinity, and the table prints it as ``failed``."""
    value = float(np.median(np.nan_to_num(np.asarray(errors, dtype=float), nan=np.inf)))
    return value if np.isfinite(value) else None


def _bin(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median error, success rate (< ``SUCCESS_MM``; a failed pair counts as a miss) and count of some rows."""
    e = np.array([r["error_mm"] for r in rows], dtype=float)
    return {
        "median_mm": _median_mm(e),
        "success": float(np.mean(np.nan_to_num(e, nan=np.inf) < SUCCESS_MM)),
        "n": len(e),
    }


def _mm(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "failed"


def _summarise(pairs: list[dict[str, Any]], runs: dict[str, dict[str, Any]]) -> tuple[list[dict], dict[str, Any]]:
    rows = []
    by_id = {p["id"]: p for p in pairs}
    for method, run in runs.items():
        for r in run["pairs"]:
            pair = by_id[r["id"]]
            rows.append({"method": method, "id": r["id"], "source": pair["source"], "angle": pair["angle"],
                         "contrast": pair["contrast"], "seconds": r["seconds"], "failure": r["error"] or "",
                         **score(pair, r["matrix"])})  # fmt: skip
    ants_s = np.median([r["seconds"] for r in rows if r["method"] == "ants"]) if "ants" in runs else None
    cpu = {m: [r.get("cpu_seconds") for r in run["pairs"]] for m, run in runs.items()}
    cpu = {m: float(np.median(v)) for m, v in cpu.items() if v and all(x is not None for x in v)}
    summary: dict[str, Any] = {}
    for method, run in runs.items():
        mine = [r for r in rows if r["method"] == method]
        err = np.array([r["error_mm"] for r in mine])
        ok = np.nan_to_num(err, nan=np.inf) < SUCCESS_MM
        sec = float(np.median([r["seconds"] for r in mine]))
        dice = [r["dice"] for r in mine if np.isfinite(r["dice"])]
        angles = {str(int(a)): _bin([r for r in mine if r["angle"] == a]) for a in sorted({r["angle"] for r in mine})}
        sources = {s: _bin([r for r in mine if r["source"] == s]) for s in sorted({r["source"] for r in mine})}
        summary[method] = {
            "success": float(ok.mean()),
            "median_mm": _median_mm(err),
            "dice": float(np.mean(dice)) if dice else None,  # of the pairs that gave a matrix
            "seconds_per_pair": sec,
            "time_vs_ants": (sec / ants_s) if ants_s else None,
            "cpu_seconds_per_pair": cpu.get(method),
            "cpu_vs_ants": (cpu[method] / cpu["ants"]) if method in cpu and "ants" in cpu else None,
            "setup_s": run["setup_s"],
            "settings": run.get("settings", {}),
            "peak_mb": run["peak_mb"],
            "by_angle": angles,
            "by_source": sources,
        }
    return rows, summary


def _table(summary: dict[str, Any]) -> str:
    methods = list(summary)
    angles = sorted({a for s in summary.values() for a in s["by_angle"]}, key=float)
    lines = [
        "| method | success (< 2 mm) | median error (mm) | tissue Dice | s / pair | time vs ANTs | CPU s / pair "
        "| CPU time vs ANTs | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = summary[m]
        ratio = f"{s['time_vs_ants']:.2f}x" if s["time_vs_ants"] else "-"
        cpu = f"{s['cpu_seconds_per_pair']:.1f}" if s.get("cpu_seconds_per_pair") is not None else "-"
        cpu_ratio = f"{s['cpu_vs_ants']:.2f}x" if s.get("cpu_vs_ants") is not None else "-"
        dice = f"{s['dice']:.3f}" if s["dice"] is not None else "-"
        lines.append(
            f"| {m} | {100 * s['success']:.0f} % | {_mm(s['median_mm'])} | {dice} | "
            f"{s['seconds_per_pair']:.1f} | {ratio} | {cpu} | {cpu_ratio} | {s['peak_mb']:.0f} |"
        )
    lines += ["", "Median error (mm) / success by rotation angle (degrees):", ""]
    lines.append("| method | " + " | ".join(angles) + " |")
    lines.append("|---|" + "---|" * len(angles))
    for m in methods:
        cells = [
            f"{_mm(summary[m]['by_angle'][a]['median_mm'])} / {100 * summary[m]['by_angle'][a]['success']:.0f} %"
            if a in summary[m]["by_angle"]
            else "-"
            for a in angles
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    sources = sorted({k for s in summary.values() for k in s["by_source"]})
    lines += ["", "Median error (mm) / success by pair source:", ""]
    lines.append("| method | " + " | ".join(sources) + " |")
    lines.append("|---|" + "---|" * len(sources))
    for m in methods:
        by = summary[m]["by_source"]
        cells = [f"{_mm(by[k]['median_mm'])} / {100 * by[k]['success']:.0f} %" if k in by else "-" for k in sources]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    from custom_nets.fileio import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        angles = sorted({r["angle"] for r in rows if r["method"] == method})
        med = [np.median([min(r["error_mm"], 1e3) if np.isfinite(r["error_mm"]) else 1e3 for r in rows
                          if r["method"] == method and r["angle"] == a]) for a in angles]  # fmt: skip
        ax.plot(angles, med, marker="o", label=method)
    ax.axhline(SUCCESS_MM, color="grey", linestyle="--", linewidth=1, label=f"success threshold ({SUCCESS_MM:g} mm)")
    ax.set_yscale("log")
    ax.set_xlabel("rotation (degrees, random axis)")
    ax.set_ylabel("median error over the brain (mm)")
    ax.set_title("Robustness to the initial misalignment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def main(mode: str = "quick", out_dir: str = "bench_out", methods: str | tuple = METHODS, seed: int = 0) -> dict:
    """Build the pairs, run every method in its own process, score, and write the table and the plot."""
    if mode not in MODES:
        raise ValueError(f"expected mode in {tuple(MODES)}, got {mode!r}.")
    methods = tuple(methods.split(",")) if isinstance(methods, str) else tuple(methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    pairs = make_pairs(out, mode, seed)
    print(f"{len(pairs)} pairs written in {time.perf_counter() - t:.0f} s", flush=True)
    for method in methods:
        result = out / f"run_{method}.json"
        pairs_json = str(out / "pairs.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "run_method", method, pairs_json, str(result)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return report(str(out), mode, methods)


def report(out_dir: str, mode: str = "quick", methods: str | tuple = METHODS) -> dict:
    """Score the runs saved in ``out_dir`` (``run_<method>.json``) and write the table, the CSV and the plot."""
    from custom_nets.fileio import atomic_write, write_csv, write_json

    methods = tuple(methods.split(",")) if isinstance(methods, str) else tuple(methods)
    out = Path(out_dir)
    pairs = json.loads((out / "pairs.json").read_text())
    runs = {m: json.loads((out / f"run_{m}.json").read_text()) for m in methods}
    rows, summary = _summarise(pairs, runs)
    write_csv(out / "results.csv", rows, list(rows[0]))
    write_json(out / "summary.json", summary)
    table = _table(summary)
    settings = "; ".join(
        f"{m}: {', '.join(f'{k} {v}' for k, v in run['settings'].items())}"
        for m, run in runs.items()
        if run.get("settings")
    )
    header = (
        f"{len(pairs)} pairs ({mode} mode), {os.cpu_count()} CPU cores ({_cpu_name()}), "
        f"{THREADS} threads per method{f' ({settings})' if settings else ''}. CPU s: process CPU time (all threads), "
        "which another load on the machine inflates far less than the wall time.\n\n"
    )
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(header + table))
    _plot(rows, out / "robustness.png")
    print(header + table)
    return summary


if __name__ == "__main__":
    fire.Fire({"main": main, "run_method": run_method, "report": report})
