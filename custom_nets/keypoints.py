"""Keypoints from heatmaps: the centre-of-mass layer and the heatmap-power keypoint weights."""

from __future__ import annotations

import torch
from torch import nn

from .geometry import full_precision, voxel_grid

__all__ = ["CenterOfMass", "power_weights"]


class CenterOfMass(nn.Module):
    """Differentiable centre of mass of each heatmap channel (sub-voxel keypoints).

    Each heatmap is rectified (ReLU) and its keypoint is the mass-weighted mean of the cell-centre coordinates.
    A heatmap whose rectified mass is not above ``eps`` (all zero or all negative) has no keypoint: it returns the
    centre of the grid *and mass 0*, so a weighted fit ignores it (and :class:`~custom_nets.keymorph.KeyMorph` always
    passes weights). The output never contains NaN, and gradients stay finite.

    Args:
        eps: mass at or below which a heatmap counts as empty.

    Shapes:
        input: ``(B, K, I, J, K')`` heatmaps.
        output: ``(points (B, K, 3), mass (B, K))``; points in heatmap-cell index units ``(i, j, k)`` with cell centres
        at integers (map them to input voxels with :func:`~custom_nets.geometry.heatmap_to_voxel`); mass is the sum
        of the rectified heatmap (0 for empty heatmaps).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if heatmaps.ndim != 5:
            raise ValueError(f"expected heatmaps of shape (B, K, I, J, K'), got {tuple(heatmaps.shape)}.")
        b, k = heatmaps.shape[:2]
        spatial = heatmaps.shape[2:]
        with full_precision(heatmaps.device):  # float32 even under autocast: sub-voxel sums
            h = torch.relu(heatmaps.float()).reshape(b, k, -1)
            mass = h.sum(-1)  # (B, K)
            grid = voxel_grid(spatial, heatmaps.device, h.dtype).reshape(-1, 3)  # (N, 3)
            points = (h @ grid) / mass.clamp_min(self.eps).unsqueeze(-1)
        empty = mass <= self.eps
        centre = torch.tensor([(n - 1) / 2.0 for n in spatial], device=heatmaps.device, dtype=h.dtype)
        points = torch.where(empty.unsqueeze(-1), centre.expand_as(points), points)
        mass = torch.where(empty, torch.zeros_like(mass), mass)
        return points, mass


def power_weights(mass_fixed: torch.Tensor, mass_moving: torch.Tensor) -> torch.Tensor:
    """KeyMorph's keypoint weights: ``w_k ~ mass_fixed_k * mass_moving_k``, normalised to mean 1 per batch item.

    Each mass is first divided by its batch item's total, so the weights do not depend on the overall heatmap scale
    of either image. A keypoint that is empty in either image gets weight 0. An item whose weights are all zero keeps
    zeros (the fit then reports the degenerate case).

    Args:
        mass_fixed: ``(B, K)`` heatmap masses of the fixed image (from :class:`CenterOfMass`).
        mass_moving: ``(B, K)`` heatmap masses of the moving image.

    Returns:
        ``(B, K)`` non-negative weights with mean 1 over ``K`` (or all zero).
    """
    if mass_fixed.shape != mass_moving.shape or mass_fixed.ndim != 2:
        raise ValueError(
            f"expected two (B, K) mass tensors of equal shape, got {tuple(mass_fixed.shape)} and "
            f"{tuple(mass_moving.shape)}."
        )
    tiny = torch.finfo(mass_fixed.dtype).tiny
    pf = mass_fixed / mass_fixed.sum(1, keepdim=True).clamp_min(tiny)
    pm = mass_moving / mass_moving.sum(1, keepdim=True).clamp_min(tiny)
    w = pf * pm
    return w / w.sum(1, keepdim=True).clamp_min(tiny) * w.shape[1]  # K / tiny would overflow float32: 0 * inf
