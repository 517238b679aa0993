"""The KeyMorph training objective (image similarity, Dice on warped labels, keypoint consistency) and the
self-supervised keypoint pretraining loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn

from .fits import ThinPlateSpline
from .geometry import apply_affine, resample
from .keymorph import KeyMorphOutput

__all__ = [
    "KeyMorphLoss",
    "KeypointPretrainLoss",
    "one_hot_labels",
    "reference_keypoints",
    "warp_labels",
    "warp_target_labels",
]


def one_hot_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, ...)`` integer-valued labels to ``(B, num_classes, ...)`` float one-hot; a voxel whose value is outside
    ``0 .. num_classes - 1`` is all zero (dropped, not counted in another class)."""
    lab = labels.round().long()[:, 0]
    inside = (lab >= 0) & (lab < num_classes)
    onehot = torch.nn.functional.one_hot(lab.clamp(0, num_classes - 1), num_classes) * inside.unsqueeze(-1)
    return onehot.movedim(-1, 1).to(torch.float32)


def warp_labels(
    pred: KeyMorphOutput,
    moving_label: torch.Tensor,
    fixed_shape: tuple[int, ...],
    fixed_affine: torch.Tensor,
    moving_affine: torch.Tensor,
    num_classes: int,
    soft: bool = True,
) -> torch.Tensor:
    """Moving labels ``(B, 1, ...)`` warped onto the fixed grid through ``pred.fixed_to_moving``.

    ``soft=True``: one-hot then trilinear (differentiable in the transform, for Dice training); else nearest
    neighbour then one-hot. Returns ``(B, num_classes, *fixed_shape)``.
    """
    t: torch.Tensor | ThinPlateSpline = pred.fixed_to_moving
    if soft:
        return resample(one_hot_labels(moving_label, num_classes), t, fixed_shape, fixed_affine, moving_affine)
    warped = resample(moving_label.float(), t, fixed_shape, fixed_affine, moving_affine, mode="nearest")
    return one_hot_labels(warped, num_classes)


def warp_target_labels(
    pred: KeyMorphOutput, targets: Mapping[str, Any], num_classes: int, soft: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(warped moving labels, fixed labels)``, both one-hot ``(B, num_classes, ...)`` on the fixed grid, from the
    ``targets`` dict of :class:`~custom_nets.engines.KeyMorphPrepareBatch`."""
    if targets.get("moving_label") is None or targets.get("fixed_label") is None:
        raise KeyError("warping labels needs 'fixed_label' and 'moving_label' in the batch.")
    fixed = targets["fixed_image"]
    warped = warp_labels(
        pred,
        targets["moving_label"],
        tuple(fixed.shape[2:]),
        targets["fixed_affine"],
        targets["moving_affine"],
        num_classes,
        soft=soft,
    )
    return warped, one_hot_labels(targets["fixed_label"], num_classes)


class KeyMorphLoss(nn.Module):
    """``image_weight * image_loss(warped, fixed) + dice_weight * Dice(warped moving labels, fixed labels)
    + consistency_weight * keypoint consistency``.

    Used as the ``loss_function`` of a MONAI ``SupervisedTrainer`` with
    :class:`~custom_nets.engines.KeyMorphPrepareBatch`: ``pred`` is the :class:`KeyMorphOutput`, ``targets`` the dict
    that prepare-batch builds (``fixed_image``, ``fixed_affine``, ``moving_affine``, optional ``fixed_label``,
    ``moving_label``).

    Args:
        image_loss: a loss on ``(warped, fixed)`` images, e.g. ``torch.nn.MSELoss()`` (same contrast),
            ``monai.losses.GlobalMutualInformationLoss()`` or ``monai.losses.LocalNormalizedCrossCorrelationLoss()``
            (cross contrast); ``None`` for none.
        image_weight: its weight.
        dice_weight: weight of the soft Dice loss on warped one-hot labels (needs labels in the batch).
        num_classes: label classes including background (4 for the tissue maps).
        consistency_weight: weight of the mean squared distance (in units of ``consistency_scale_mm``) between the
            keypoints of the moving image and of its other contrast ``moving_image_alt`` (needs that key).
        consistency_scale_mm: distance unit of the consistency term.
    """

    def __init__(
        self,
        image_loss: nn.Module | None = None,
        image_weight: float = 1.0,
        dice_weight: float = 0.0,
        num_classes: int = 4,
        consistency_weight: float = 0.0,
        consistency_scale_mm: float = 4.0,
    ) -> None:
        super().__init__()
        self.image_loss = image_loss
        self.image_weight, self.dice_weight = float(image_weight), float(dice_weight)
        self.consistency_weight, self.consistency_scale_mm = float(consistency_weight), float(consistency_scale_mm)
        self.num_classes = int(num_classes)
        self.dice = DiceLoss(include_background=False, reduction="mean")
        if image_loss is None and self.dice_weight <= 0 and self.consistency_weight <= 0:
            raise ValueError(
                "KeyMorphLoss: every term is off; give an image_loss or a positive dice/consistency weight."
            )
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: KeyMorphOutput, targets: Mapping[str, Any]) -> torch.Tensor:
        """The weighted sum of the terms that are on (a scalar); each term's value is kept in :attr:`last_terms`.

        Args:
            pred: the network output (``warped`` ``(B, 1, ...)`` on the fixed grid, transforms, keypoints).
            targets: :class:`~custom_nets.engines.KeyMorphPrepareBatch` targets: ``fixed_image`` ``(B, 1, ...)``,
                affines, and ``fixed_label`` / ``moving_label`` ``(B, 1, ...)`` for the Dice term.
        """
        fixed = targets["fixed_image"]
        total = fixed.new_zeros(())
        terms: dict[str, float] = {}
        if self.image_loss is not None and self.image_weight:
            sim = self.image_loss(pred.warped.float(), fixed.float())
            total = total + self.image_weight * sim
            terms["image"] = float(sim.detach())
        if self.dice_weight:
            warped, fixed_onehot = warp_target_labels(pred, targets, self.num_classes, soft=True)
            dice = self.dice(warped, fixed_onehot)
            total = total + self.dice_weight * dice
            terms["dice"] = float(dice.detach())
        if self.consistency_weight:
            if pred.keypoints_moving_alt is None:
                raise KeyError("KeyMorphLoss: consistency_weight > 0 needs 'moving_image_alt' in the batch.")
            d2 = ((pred.keypoints_moving - pred.keypoints_moving_alt) ** 2).sum(-1) / self.consistency_scale_mm**2
            cons = (pred.weights.detach() * d2).mean()
            total = total + self.consistency_weight * cons
            terms["consistency"] = float(cons.detach())
        self.last_terms = terms
        return total


def reference_keypoints(num_keypoints: int, seed: int = 0, tissue_threshold: float = 0.5) -> torch.Tensor:
    """``(K, 3)`` random points (MNI world mm) inside the template brain (GM + WM probability above the threshold).

    The targets of the self-supervised keypoint pretraining: the same anatomical points in every training image.
    """
    from .data.template import load_tissue_template

    template = load_tissue_template()
    inside = np.argwhere(template.probs[2] + template.probs[3] > tissue_threshold)
    rng = np.random.default_rng([int(seed), 13])
    vox = inside[rng.choice(len(inside), size=int(num_keypoints), replace=False)].astype(np.float64)
    return torch.from_numpy(vox @ template.affine[:3, :3].T + template.affine[:3, 3])


class KeypointPretrainLoss(nn.Module):
    """Self-supervised keypoint pretraining: regress ``K`` fixed anatomical points under random affines.

    The fixed image is in template alignment and ``targets["fixed_to_moving"]`` is the random affine applied to the
    moving image, so keypoint ``k`` should sit at ``ref_k`` in the fixed image and at ``fixed_to_moving(ref_k)`` in
    the moving one. Loss: mean squared distance in units of ``scale_mm``. Where the batch says that an image's field
    of view was cut (``targets["fixed_fov"]`` / ``targets["moving_fov"]``: ``(B, 4)`` world planes ``(n, d)``, a
    point ``x`` cut away when ``n . x > d``; see :class:`~custom_nets.data.RandFieldOfViewCutd`), the points cut
    away from an image are left out of its term: the detector is asked to place what it can see.

    Args:
        num_keypoints: ``K`` (must match the detector).
        seed: seed of :func:`reference_keypoints`.
        scale_mm: distance unit.
    """

    def __init__(self, num_keypoints: int, seed: int = 0, scale_mm: float = 8.0) -> None:
        super().__init__()
        self.register_buffer("reference", reference_keypoints(num_keypoints, seed).to(torch.float32))
        self.scale_mm = float(scale_mm)

    def forward(self, pred: KeyMorphOutput, targets: Mapping[str, Any]) -> torch.Tensor:
        if targets.get("fixed_to_moving") is None:
            raise KeyError("KeypointPretrainLoss needs the ground truth 'fixed_to_moving' in the batch.")
        b, k = pred.keypoints_fixed.shape[:2]
        if k != self.reference.shape[0]:
            raise ValueError(f"KeypointPretrainLoss: {self.reference.shape[0]} reference points, detector gives {k}.")
        ref = self.reference.to(pred.keypoints_fixed.device).expand(b, -1, -1)
        ref_moving = apply_affine(targets["fixed_to_moving"].to(torch.float32), ref)
        terms = []
        for pred_k, true_k, key in ((pred.keypoints_fixed, ref, "fixed_fov"),
                                    (pred.keypoints_moving, ref_moving, "moving_fov")):  # fmt: skip
            d2 = ((pred_k - true_k) ** 2).sum(-1)
            plane = targets.get(key)
            seen = torch.ones_like(d2)
            if plane is not None:
                plane = plane.to(true_k)
                seen = ((true_k * plane[:, None, :3]).sum(-1) <= plane[:, None, 3]).to(d2.dtype)
            terms.append((d2 * seen, seen))
        total = sum(t[0].sum() for t in terms)
        count = sum(t[1].sum() for t in terms)
        return total / count.clamp_min(1.0) / self.scale_mm**2
