"""Score inference outputs against known ground truth (the demo set's test pairs, or any pair list that has it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .data.datalists import load_pair_list
from .fits import ThinPlateSpline, fit_tps
from .metrics import SUCCESS_MM, transform_error_mm
from .volumes import output_stem

__all__ = ["score_results", "format_scores", "result_transform", "summary_markdown"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for c in np.unique(b[b > 0]):
        inter = np.sum((a == c) & (b == c))
        scores.append(2.0 * inter / max(1, np.sum(a == c) + np.sum(b == c)))
    return float(np.mean(scores)) if scores else float("nan")


def result_transform(result: dict[str, Any], source: str | Path = "result") -> torch.Tensor | ThinPlateSpline:
    """The ``fixed_to_moving`` transform (RAS mm) of a result JSON: a ``(1, 4, 4)`` float64 matrix, or a spline.

    Affine and rigid results carry the matrix ``fixed_to_moving_ras``; a spline result (``transform_type`` ``tps``) is
    refitted from its keypoints, weights and ``tps_lambda``: the fit the registration made (same inputs, same closed
    form), so splines are scored like matrices.

    Raises:
        ValueError: the JSON holds neither (the message names ``source``).
    """
    if "fixed_to_moving_ras" in result:
        return torch.as_tensor(result["fixed_to_moving_ras"], dtype=torch.float64).reshape(1, 4, 4)
    needed = ("keypoints_fixed_ras_mm", "keypoints_moving_ras_mm", "keypoint_weights", "tps_lambda")
    if result.get("transform_type") == "tps" and all(k in result for k in needed):
        kp_f, kp_m, w = (torch.as_tensor(result[k], dtype=torch.float64)[None] for k in needed[:3])
        return fit_tps(kp_f, kp_m, float(result["tps_lambda"]), w)
    raise ValueError(
        f"{source}: expected 'fixed_to_moving_ras', or a tps result with {', '.join(needed)}; found {sorted(result)}."
    )


def score_results(results_dir: str | Path, datalist: str | Path, key: str = "test_pairs") -> list[dict[str, Any]]:
    """Per pair: mean error (mm) over the fixed brain (:func:`~custom_nets.metrics.transform_error_mm` over every
    brain voxel) between the result's ``fixed_to_moving`` transform (matrix or spline, see :func:`result_transform`)
    and the truth, success (below 2 mm), and tissue Dice of the warped labels when they were written.

    Raises:
        FileNotFoundError: a pair's result JSON is missing (the message names it).
        KeyError: a pair has no ground truth ``fixed_to_moving_ras``.
        ValueError: a result JSON holds no transform (see :func:`result_transform`).
    """
    rows = []
    for pair in load_pair_list(datalist, key):
        stem = output_stem(pair["moving_image"])
        result_path = Path(results_dir) / f"{stem}.json"
        if not result_path.is_file():
            raise FileNotFoundError(f"{result_path}: no result for {pair['moving_image']}.")
        if "fixed_to_moving_ras" not in pair:
            raise KeyError(f"{datalist}: the pair of {pair['moving_image']} has no ground truth 'fixed_to_moving_ras'.")
        result = json.loads(result_path.read_text())
        truth = torch.as_tensor(pair["fixed_to_moving_ras"], dtype=torch.float64).reshape(1, 4, 4)
        fixed_label = nib.load(pair["fixed_label"]) if pair.get("fixed_label") else nib.load(pair["fixed_image"])
        data = np.asarray(fixed_label.dataobj)
        mask = torch.from_numpy(np.ascontiguousarray(data > 0))[None, None]
        affine = torch.as_tensor(fixed_label.affine, dtype=torch.float64)[None]
        predicted = result_transform(result, result_path)
        # the metric of training and evaluation, here over every brain voxel
        error = float(transform_error_mm(predicted, truth, mask, affine, max_points=None)[0])
        row = {
            "moving": Path(pair["moving_image"]).name,
            "fixed": Path(pair["fixed_image"]).name,
            "rotation_deg": pair.get("rotation_deg"),
            "error_mm": error,
            "success": error < SUCCESS_MM,
        }
        warped_label = Path(results_dir) / f"{stem}_label_warped.nii.gz"
        if warped_label.is_file() and pair.get("fixed_label"):
            row["dice"] = _dice(np.asarray(nib.load(str(warped_label)).dataobj), data)
        rows.append(row)
    return rows


def format_scores(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`score_results` rows."""
    lines = [f"{'moving':<28} {'fixed':<18} {'rotation':>8} {'error mm':>9} {'success':>8} {'dice':>6}"]
    for r in rows:
        rot = "" if r["rotation_deg"] is None else f"{r['rotation_deg']:.0f}"
        dice = f"{r['dice']:.3f}" if "dice" in r else ""
        lines.append(
            f"{r['moving']:<28} {r['fixed']:<18} {rot:>8} {r['error_mm']:>9.2f} {str(r['success']):>8} {dice:>6}"
        )
    ok = sum(r["success"] for r in rows)
    lines.append(f"{ok} of {len(rows)} pairs registered within {SUCCESS_MM:g} mm (mean error over the fixed brain).")
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table (one row per rotation angle, then overall) of an evaluation ``summary.json``."""
    head = (
        "| rotation (deg) | pairs | success (< 2 mm) | median error (mm) | mean error (mm) | 90th pct (mm) "
        "| tissue Dice | s / pair |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def row(label: str, s: dict[str, Any]) -> str:
        def f(key: str, fmt: str) -> str:
            return format(s[key], fmt) if key in s else "-"

        success = f"{100 * s['success_rate']:.0f} %" if "success_rate" in s else "-"
        return (
            f"| {label} | {s.get('pairs', 0)} | {success} | {f('median_error_mm', '.2f')} | {f('mean_error_mm', '.2f')}"
            f" | {f('p90_error_mm', '.2f')} | {f('mean_dice', '.3f')} | {f('seconds_per_pair', '.2f')} |"
        )

    for angle, stats in summary.get("by_rotation_deg", {}).items():
        lines.append(row(f"{float(angle):.0f}" if angle not in ("None", "") else "-", stats))
    lines.append(row("all", summary.get("overall", {})))
    return "\n".join(lines)
