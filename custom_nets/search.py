"""Orientation search: detect the moving keypoints in each of the 24 axis-aligned orientations of its voxel grid and
keep the view whose keypoints correspond best to the fixed image's (smallest affine-fit residual), or, as an option,
the one whose fit makes the images most similar.

Rotating the voxel array by a signed axis permutation while changing its affine accordingly leaves the image's world
content unchanged, so every candidate is a valid registration of the same pair; only the detector's view differs.
A detector that is accurate within about 45 degrees of upright then covers any rotation. This is an inference-time
option of :class:`~custom_nets.keymorph.KeyMorph` (``orientation_search=True``), not a change of the model.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

__all__ = ["cube_rotations", "rotate_volume"]


@lru_cache(maxsize=1)
def cube_rotations() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]:
    """The 24 proper rotations of the cube as ``(perm, signs)``: new axis ``a`` is old axis ``perm[a]`` times
    ``signs[a]``. The identity comes first."""
    out = []
    for perm in itertools.permutations(range(3)):
        parity = 1 if sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3)) % 2 == 0 else -1
        for signs in itertools.product((1, -1), repeat=3):
            if parity * signs[0] * signs[1] * signs[2] == 1:
                out.append((tuple(perm), tuple(signs)))
    out.sort(key=lambda ps: (ps != ((0, 1, 2), (1, 1, 1)), ps))
    return tuple(out)


def rotate_volume(
    image: torch.Tensor, perm: tuple[int, int, int], signs: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the voxel grid of ``(B, C, I, J, K)`` by a signed axis permutation.

    Returns the rotated image and the ``4 x 4`` float64 voxel map ``V`` (new index = ``V @ old index``). An image
    with affine ``A`` keeps its world content when given the affine ``A @ inv(V)``.
    """
    shape = image.shape[2:]
    out = image.permute(0, 1, *(2 + p for p in perm))
    flips = [2 + a for a in range(3) if signs[a] < 0]
    if flips:
        out = out.flip(flips)
    v = torch.zeros(4, 4, dtype=torch.float64, device=image.device)
    for a in range(3):
        v[a, perm[a]] = signs[a]
        if signs[a] < 0:
            v[a, 3] = shape[perm[a]] - 1
    v[3, 3] = 1.0
    return out, v
