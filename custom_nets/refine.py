"""Intensity-based polishing of an affine registration (mutual information, multi-resolution, in torch).

KeyMorph brings any misalignment into the capture range of intensity-based optimisation; :class:`AffineRefiner`
then polishes the affine by gradient descent on MONAI's ``GlobalMutualInformationLoss`` between the warped moving
image and the fixed image, coarse to fine. It runs on the CPU or the GPU like the rest of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss
from torch import nn

from .geometry import apply_affine, batch_affine, voxel_to_normalized, world_to_voxel

__all__ = ["AffineRefiner"]


def _downsample(image: torch.Tensor, affine: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool by ``factor`` and return the pooled grid's affine (pooled voxel u is centred at old
    ``factor * u + (factor - 1) / 2``)."""
    if factor == 1:
        return image, affine
    pooled = F.avg_pool3d(image, factor, stride=factor, ceil_mode=False)
    m = torch.eye(4, dtype=affine.dtype, device=affine.device)
    m[:3, :3] *= factor
    m[:3, 3] = (factor - 1) / 2.0
    return pooled, affine @ m


class AffineRefiner(nn.Module):
    """Refine ``fixed_to_moving`` affines by maximising mutual information, coarse to fine.

    The correction is parametrised about the centre of the fixed image, with translations in units of
    ``translation_scale_mm``, so rotations and translations take comparable steps:
    ``T = T0 @ C(I + L, s t) C^-1``, ``L`` (3 x 3) and ``t`` (3) starting at zero.

    Args:
        factors: downsampling factor of each level, coarse first.
        iterations: Adam steps per level.
        lr: Adam learning rate.
        num_bins: histogram bins of the mutual information.
        translation_scale_mm: unit of the translation parameters.
        samples: voxels of the fixed image (inside its foreground) drawn once per level to evaluate the mutual
            information on, as in Mattes' MI; ``None`` uses every voxel (slower, hardly more precise).
        seed: seed of that draw (the refinement is deterministic).

    Shapes:
        ``moving`` ``(B, 1, ...)``, ``fixed`` ``(B, 1, ...)``, ``fixed_to_moving`` ``(B, 4, 4)`` world matrices,
        affines ``(B, 4, 4)`` or ``(4, 4)``; returns refined ``(B, 4, 4)`` (no gradient).
    """

    def __init__(
        self,
        factors: Sequence[int] = (4, 2, 1),
        iterations: Sequence[int] = (60, 40, 20),
        lr: float = 0.01,
        num_bins: int = 32,
        translation_scale_mm: float = 20.0,
        samples: int | None = 20000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(factors) != len(iterations):
            raise ValueError(f"expected one iteration count per level, got {factors} and {iterations}.")
        self.factors, self.iterations = tuple(int(f) for f in factors), tuple(int(n) for n in iterations)
        self.lr, self.scale = float(lr), float(translation_scale_mm)
        self.similarity = GlobalMutualInformationLoss(num_bins=num_bins)
        self.samples, self.seed = samples, int(seed)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        fixed_to_moving: torch.Tensor,
        moving_affine: torch.Tensor | None = None,
        fixed_affine: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, device = fixed.shape[0], fixed.device
        a_m = batch_affine(moving_affine, b, device)
        a_f = batch_affine(fixed_affine, b, device)
        start = fixed_to_moving.detach().to(torch.float64)
        size = torch.tensor(fixed.shape[2:], dtype=torch.float64, device=device)
        centre = a_f[:, :3, :3] @ ((size - 1) / 2) + a_f[:, :3, 3]  # (B, 3) world centre of the fixed grid
        lin = torch.zeros(b, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        shift = torch.zeros(b, 3, dtype=torch.float64, device=device, requires_grad=True)
        opt = torch.optim.Adam([lin, shift], lr=self.lr)

        def current() -> torch.Tensor:
            m = torch.eye(4, dtype=torch.float64, device=device).repeat(b, 1, 1)
            a = torch.eye(3, dtype=torch.float64, device=device) + lin
            m[:, :3, :3] = a
            m[:, :3, 3] = centre - (a @ centre.unsqueeze(-1)).squeeze(-1) + self.scale * shift
            return start @ m

        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        with torch.enable_grad():
            for factor, steps in zip(self.factors, self.iterations):
                mov, a_mov = _downsample(moving.float(), a_m, factor)
                fix, a_fix = _downsample(fixed.float(), a_f, factor)
                vox, fix_values = self._sample(fix, gen)  # (B, N, 3) fixed voxels and their intensities
                world = apply_affine(a_fix, vox)
                for _ in range(steps):
                    opt.zero_grad()
                    moved = world_to_voxel(apply_affine(current(), world), a_mov)
                    grid = voxel_to_normalized(moved, mov.shape[2:]).to(mov.dtype)[:, :, None, None]
                    values = F.grid_sample(mov, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                    loss = self.similarity(values, fix_values)
                    loss.backward()
                    opt.step()
        return current().detach().to(fixed_to_moving.dtype)

    def _sample(self, fixed: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel coordinates ``(B, N, 3)`` (float64) drawn in the fixed foreground and the fixed values there
        ``(B, 1, N, 1, 1)``; every voxel when ``samples`` is None or exceeds the foreground."""
        coords, values = [], []
        for b in range(fixed.shape[0]):
            fg = torch.nonzero(fixed[b, 0] > 0)
            if fg.shape[0] == 0:
                fg = torch.nonzero(torch.ones_like(fixed[b, 0], dtype=torch.bool))
            n = fg.shape[0] if self.samples is None else min(int(self.samples), fg.shape[0])
            pick = torch.randperm(fg.shape[0], generator=gen)[:n].to(fg.device)
            idx = fg[pick]
            coords.append(idx.to(torch.float64))
            values.append(fixed[b, 0][idx[:, 0], idx[:, 1], idx[:, 2]])
        n = min(c.shape[0] for c in coords)
        vox = torch.stack([c[:n] for c in coords])
        vals = torch.stack([v[:n] for v in values]).reshape(fixed.shape[0], 1, n, 1, 1)
        return vox, vals
