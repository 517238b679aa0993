"""Registration metrics: the mean error (mm) of a transform against the truth over the fixed brain, and the
evaluator's per-pair metrics (error, success, warped labels, Dice)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.metrics import compute_dice
from monai.transforms import Transform

from .fits import ThinPlateSpline
from .geometry import apply_affine, apply_transform, voxel_grid, voxel_to_world
from .keymorph import KeyMorphOutput
from .losses import warp_target_labels

__all__ = ["SUCCESS_MM", "RegistrationMetricsd", "transform_error_mm"]

#: A registration "succeeds" when its mean error over the brain is below this many mm.
SUCCESS_MM = 2.0


def transform_error_mm(
    predicted: torch.Tensor | ThinPlateSpline,
    truth: torch.Tensor,
    fixed_mask: torch.Tensor,
    fixed_affine: torch.Tensor,
    max_points: int | None = 20000,
) -> torch.Tensor:
    """Mean distance (mm) between predicted and true ``fixed_to_moving`` images of the fixed image's masked voxels.

    Args:
        predicted: ``(B, 4, 4)`` world matrices or a spline.
        truth: ``(B, 4, 4)`` ground-truth world matrices.
        fixed_mask: ``(B, 1, I, J, K)``; voxels ``> 0`` count (e.g. the brain labels).
        fixed_affine: ``(B, 4, 4)`` voxel-to-world of the fixed image.
        max_points: voxels used per item (an even subsample beyond that); ``None``: every masked voxel.

    Returns:
        ``(B,)`` float64 errors in mm.
    """
    errors = []
    grid = voxel_grid(fixed_mask.shape[2:], fixed_mask.device, torch.float64)
    for b in range(fixed_mask.shape[0]):
        vox = grid[fixed_mask[b, 0] > 0]
        if vox.shape[0] == 0:
            vox = grid.reshape(-1, 3)
        if max_points is not None:
            vox = vox[:: max(1, vox.shape[0] // max_points)]
        world = voxel_to_world(vox.unsqueeze(0), fixed_affine[b : b + 1].to(torch.float64))
        item = predicted[b : b + 1] if isinstance(predicted, torch.Tensor) else predicted.select(b)
        moved = apply_transform(item, world)
        true = apply_affine(truth[b : b + 1].to(torch.float64), world)
        errors.append((moved.to(torch.float64) - true).norm(dim=-1).mean())
    return torch.stack(errors)


class RegistrationMetricsd(Transform):
    """Evaluator ``postprocessing``: per-pair metrics from the engine output ``pred`` (a :class:`KeyMorphOutput`).

    Adds to the output: ``error_mm`` ``(B,)`` (mean error over the fixed brain against ``fixed_to_moving`` ground
    truth, when the batch has one), ``success`` ``(B,)`` (error below :data:`SUCCESS_MM`), ``pred_label`` /
    ``label_onehot`` ``(B, C, ...)`` (nearest-neighbour warped moving labels and fixed labels, one-hot, for MONAI's
    ``MeanDice``) and ``dice`` ``(B,)`` (mean over foreground classes), when the batch has labels.
    """

    def __init__(self, num_classes: int = 4) -> None:
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred: KeyMorphOutput = d["pred"]
        targets: Mapping[str, Any] = d["label"]
        fixed = targets["fixed_image"]
        with torch.no_grad():
            mask = targets.get("fixed_label", fixed)
            if targets.get("fixed_to_moving") is not None:
                err = transform_error_mm(
                    pred.fixed_to_moving, targets["fixed_to_moving"], mask, targets["fixed_affine"]
                )
                d["error_mm"] = err
                d["success"] = (err < SUCCESS_MM).to(torch.float32)
            if targets.get("moving_label") is not None and targets.get("fixed_label") is not None:
                warped, onehot = warp_target_labels(pred, targets, self.num_classes, soft=False)
                d["pred_label"], d["label_onehot"] = warped, onehot
                d["dice"] = compute_dice(warped, onehot, include_background=False, ignore_empty=True).nanmean(1)
        return d
