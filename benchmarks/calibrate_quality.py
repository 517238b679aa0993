"""Calibrate the quality verdict's thresholds (``custom_nets.quality.QualityThresholds``) on held-out pairs.

    python benchmarks/calibrate_quality.py main --pairs 40 --out_dir calibration_out

Pairs come from the *validation* seed stream (never the test subjects of the benchmarks, never training subjects):
synthetic subjects in random T1 / T2 / PD / random contrasts, same or different subject, rotated by 0-180 degrees,
and the real MNI T1 against a remapped copy of itself. For every pair the bundle's inference (in process, the
inference config) gives a result with its quality record and its true error; then the same quality measures are
taken for transforms with known errors: the truth composed with small random rigid perturbations (about 1-20 mm
mean error over the brain) and with the wrong views a search can end in (90 / 180 degree turns about the brain
centre). ``samples.csv`` holds one row per (pair, transform); ``summary.json`` the distributions of each measure
for errors below 2 mm and above, and the rates of the thresholds in use.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_registration import _KeyMorph, _remap, score  # noqa: E402


def _pairs(n: int, out: Path, seed: int) -> list[dict[str, Any]]:
    import torch

    from custom_nets.data import BrainSynthesizer, random_affine_matrix, save_nifti, subject_seed
    from custom_nets.data.template import BRAIN_CENTRE_MNI, load_tissue_template
    from custom_nets.geometry import resample

    out.mkdir(parents=True, exist_ok=True)
    synth = BrainSynthesizer(spatial_size=128, pixdim=2.0)
    rng = np.random.default_rng([seed, 31])
    template = load_tissue_template()
    t_aff, grid = torch.as_tensor(template.affine), torch.as_tensor(synth.affine)
    t1 = torch.from_numpy(template.t1)[None, None]
    t_lab = torch.from_numpy(template.probs.argmax(0).astype(np.float32))[None, None]
    pairs = []
    for k in range(n):
        angle = float(rng.choice([0, 30, 60, 90, 120, 150, 180]))
        pose = random_affine_matrix(rng, 0, 0.1, 0.0, 15.0, rotation_angle_deg=angle, centre=BRAIN_CENTRE_MNI)
        kind = ("same", "cross", "inter", "mni")[k % 4]
        if kind == "mni":
            posed = torch.linalg.inv(torch.as_tensor(pose))
            fixed = resample(t1, torch.eye(4, dtype=torch.float64), synth.shape, grid, t_aff)[0, 0].numpy()
            lab_f = resample(t_lab, torch.eye(4, dtype=torch.float64), synth.shape, grid, t_aff, mode="nearest")
            lab_f = lab_f[0, 0].numpy()
            moving = _remap(resample(t1, posed, synth.shape, grid, t_aff)[0, 0].numpy(), rng)
            lab_m = resample(t_lab, posed, synth.shape, grid, t_aff, mode="nearest")[0, 0].numpy()
        else:
            sid = subject_seed("validation", 500 + k)
            sid_m = subject_seed("validation", 900 + k) if kind == "inter" else sid
            probs_f, probs_m = synth.subject(sid), synth.subject(sid_m, pose=pose)
            contrasts = ("t1", "t2", "pd", "random")
            c_f = str(rng.choice(contrasts))
            c_m = c_f if kind == "same" else str(rng.choice([c for c in contrasts if c != c_f]))
            fixed = synth.image(probs_f, c_f, 3 * k + 1)[0].numpy()
            moving = synth.image(probs_m, c_m, 3 * k + 2)[0].numpy()
            lab_f, lab_m = synth.labels(probs_f)[0].numpy(), synth.labels(probs_m)[0].numpy()
        files = {}
        for name, data, dtype in (
            ("fixed_image", fixed, np.float32),
            ("moving_image", moving, np.float32),
            ("fixed_label", lab_f, np.uint8),
            ("moving_label", lab_m, np.uint8),
        ):
            files[name] = str(save_nifti(data, synth.affine, out / f"cal{k:03d}_{name}.nii.gz", dtype=dtype))
        pairs.append({"id": f"cal{k:03d}", "kind": kind, "angle": angle, **files, "fixed_to_moving_ras": pose.tolist()})
    return pairs


def _perturbations(truth: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Wrong transforms of known kind: small rigid perturbations about the brain centre, and wrong views."""
    from custom_nets.data import rotation_matrix
    from custom_nets.data.template import BRAIN_CENTRE_MNI

    c = np.asarray(BRAIN_CENTRE_MNI)
    out = []

    def about_centre(rot: np.ndarray, shift: np.ndarray) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rot, c - rot @ c + shift
        return m

    for size in (1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0):
        rot = rotation_matrix(rng.normal(size=3), size * 0.6)  # degrees; about 1 mm per degree at the cortex
        shift = rng.normal(size=3)
        shift *= 0.6 * size / np.linalg.norm(shift)
        out.append((f"perturbed_{size:g}", truth @ about_centre(rot, shift)))
    for axis in np.eye(3):
        for angle in (90.0, 180.0):
            out.append((f"view_{int(angle)}", truth @ about_centre(rotation_matrix(axis, angle), np.zeros(3))))
    return out


def main(
    pairs: int = 40, out_dir: str = "calibration_out", seed: int = 0, skull_strip: bool = True, inference: bool = True
) -> dict[str, Any]:
    """Run the calibration (see the module docstring); prints the summary. ``skull_strip``: the inference config's
    option of that name (the pairs are brains). ``inference=False``: only the transforms of known error (and the
    truth itself), not the bundle's results (minutes instead of about 10 s per pair)."""
    import torch

    from custom_nets.fileio import write_csv, write_json
    from custom_nets.options import parse_bool
    from custom_nets.quality import QualityThresholds, assess_registration, verdict

    skull_strip = parse_bool(skull_strip, "--skull_strip")  # `--inference false` as people type it (fire passes
    inference = parse_bool(inference, "--inference")  # the string, which is true)
    out = Path(out_dir)
    items = _pairs(int(pairs), out / "pairs", seed)
    km = _KeyMorph(refine=True, overrides={"skull_strip": skull_strip})
    km.inferer.assess_quality = True
    rng = np.random.default_rng([seed, 5])
    rows: list[dict[str, Any]] = []
    for pair in items:
        data = km.preprocessing({"fixed_image": pair["fixed_image"], "moving_image": pair["moving_image"]})
        moving, _, args, kwargs = km.prepare(km.collate([data]), km.device)
        weights = torch.ones(1, 16)
        if inference:
            t = time.perf_counter()
            res = km.register(moving, args, kwargs)
            seconds = time.perf_counter() - t
            matrix, weights = res.fixed_to_moving[0].double().numpy(), res.weights
            q = dict(res.quality[0])
            err = score(pair, matrix.tolist())["error_mm"]
            views = q.pop("views", {}) or {}
            rows.append(
                {
                    "id": pair["id"], "kind": pair["kind"], "angle": pair["angle"], "transform": "result",
                    "error_mm": err, "seconds": seconds, "ambiguous": views.get("ambiguous"),
                    "residual_rank": views.get("residual_rank"), "refinement_mm": views.get("refinement_mm"),
                    **{k: v for k, v in q.items() if k not in ("thresholds", "reasons")},
                }
            )  # fmt: skip
            print(f"{pair['id']} {pair['kind']:5s} {pair['angle']:5.0f}: {err:6.2f} mm {q['verdict']} "
                  f"nmi {q['nmi']:.3f} lncc {q['lncc']:.3f} overlap {q['foreground_overlap']:.3f} {seconds:.1f} s",
                  flush=True)  # fmt: skip
        r_m, r_f = kwargs["refine_moving"], kwargs["refine_fixed"]
        a_m, a_f = kwargs["refine_moving_affine"], kwargs["refine_fixed_affine"]
        truth = np.asarray(pair["fixed_to_moving_ras"])
        for name, wrong in [("truth", truth), *_perturbations(truth, rng)]:
            m = torch.as_tensor(wrong)[None]
            qq = assess_registration(r_m, r_f, m, a_m, a_f, torch.zeros(1), weights)[0]
            qq.pop("keypoint_residual_mm"), qq.pop("keypoints_used")
            rows.append(
                {"id": pair["id"], "kind": pair["kind"], "angle": pair["angle"], "transform": name,
                 "error_mm": score(pair, wrong.tolist())["error_mm"], **qq}
            )  # fmt: skip
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("id", "kind", "transform"), k))
    write_csv(out / "samples.csv", rows, columns)
    summary: dict[str, Any] = {"pairs": len(items), "measures": {}}
    for key in ("nmi", "lncc", "foreground_overlap"):
        good = np.array([r[key] for r in rows if r["error_mm"] < 2.0])
        bad = np.array([r[key] for r in rows if r["error_mm"] >= 2.0])
        gross = np.array([r[key] for r in rows if r["error_mm"] >= 10.0])
        summary["measures"][key] = {
            "below_2mm_percentiles_1_5_50": np.percentile(good, [1, 5, 50]).tolist() if len(good) else None,
            "above_2mm_percentiles_50_95_99": np.percentile(bad, [50, 95, 99]).tolist() if len(bad) else None,
            "above_10mm_percentiles_50_95_99": np.percentile(gross, [50, 95, 99]).tolist() if len(gross) else None,
        }
    t = QualityThresholds()
    flagged = [(r["error_mm"], verdict(r, t)[0] == "suspect") for r in rows]
    above = [f for e, f in flagged if e >= 2.0]
    below = [f for e, f in flagged if e < 2.0]
    gross_rows = [f for e, f in flagged if e >= 10.0]
    summary["current_thresholds"] = {
        "flagged_above_2mm": float(np.mean(above)) if above else None,
        "flagged_above_10mm": float(np.mean(gross_rows)) if gross_rows else None,
        "false_flags_below_2mm": float(np.mean(below)) if below else None,
    }
    results = [r for r in rows if r["transform"] == "result"]
    if results:
        summary["results"] = {
            "success": float(np.mean([r["error_mm"] < 2 for r in results])),
            "median_mm": float(np.median([r["error_mm"] for r in results])),
            "seconds_per_pair": float(np.mean([r["seconds"] for r in results])),
        }
    write_json(out / "summary.json", summary)
    print(summary)
    return summary


if __name__ == "__main__":
    fire.Fire({"main": main})
