"""The template-space geometry the synthetic heads are layered on: the distance outside the template's brain and the
lower end of its brainstem.

The distance (mm) is an exact Euclidean distance map, clipped, computed once in torch on a 2 mm cube in template
(MNI RAS mm) space centred on the brain; points are world mm and affines voxel-to-world, as in
:mod:`custom_nets.geometry`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import resample, voxel_to_world
from .template import BRAIN_CENTRE_MNI, cube_affine, load_tissue_template

__all__ = ["clipped_distance_mm", "template_brain_geometry"]

#: Side (mm) and voxel size (mm) of the template-space cube of the brain distance map.
_DIST_BOX_MM = 272.0
_DIST_STEP_MM = 2.0
#: Distances outside the brain are exact up to this (mm) and clipped there (the head layers end before it).
_DIST_MAX_MM = 48.0


def clipped_distance_mm(mask: torch.Tensor, spacing: float, max_mm: float = _DIST_MAX_MM) -> torch.Tensor:
    """Euclidean distance (mm) of every voxel of a 3D bool ``mask`` to its nearest True voxel (0 inside), exact up to
    ``max_mm`` and clipped there.

    Separable squared distances, one windowed brute-force lower envelope per axis: a nearest point within ``max_mm``
    differs by at most ``max_mm`` along every axis, so a window of that half-width is exact below the clip.
    """
    window = int(math.ceil(max_mm / spacing))
    big = float(3 * (window + 1) ** 2)
    f = torch.where(mask, 0.0, big).to(torch.float32)
    for axis in range(3):
        f = f.movedim(axis, 0).contiguous()  # the axis first: every shifted slice below is one contiguous block
        n = f.shape[0]
        padded = F.pad(f.movedim(0, -1), (window, window), value=big).movedim(-1, 0).contiguous()
        out, tmp = f.clone(), torch.empty_like(f)
        for offset in range(-window, window + 1):
            torch.add(padded[window + offset : window + offset + n], float(offset * offset), out=tmp)
            torch.minimum(out, tmp, out=out)
        f = out.movedim(0, axis)
    return (f.sqrt() * spacing).clamp_max(max_mm)


@functools.lru_cache(maxsize=1)
def template_brain_geometry() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Distance (mm, clipped at 48) outside the template brain on a 2 mm template-space cube ``(1, 1, n, n, n)``, its
    affine ``(4, 4)``, and the brainstem's lower end: ``(x, y, z, radius)`` in MNI mm."""
    template = load_tissue_template()
    n = int(round(_DIST_BOX_MM / _DIST_STEP_MM))
    affine = torch.from_numpy(cube_affine(n, _DIST_STEP_MM, BRAIN_CENTRE_MNI))
    brain = torch.from_numpy(1.0 - template.probs[0])[None, None]
    coarse = resample(brain, torch.eye(4, dtype=torch.float64), (n,) * 3, affine, torch.from_numpy(template.affine))
    mask = coarse[0, 0] > 0.5
    dist = clipped_distance_mm(mask, _DIST_STEP_MM)
    # lower end of the brainstem: centroid and radius of the lowest 6 mm of the brain mask
    idx = torch.nonzero(mask).to(torch.float64)
    world = voxel_to_world(idx[None], affine[None])[0]
    low = world[world[:, 2] < world[:, 2].min() + 6.0]
    area = low.shape[0] * _DIST_STEP_MM**2 / 3.0  # mean cross-section over the 3 slices
    stem = np.array([*low[:, :2].mean(0).tolist(), float(world[:, 2].min()), float(np.sqrt(area / np.pi))])
    return dist[None, None], affine, stem
