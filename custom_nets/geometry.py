"""The one coordinate convention of ``custom_nets``: voxel indices, world millimetres and resampling.

Everything else in the package goes through the functions of this module, so the convention is written once:

* **Image tensors** are channel-first, ``(B, C, I, J, K)`` (3D) with spatial dimension ``d`` holding voxel axis ``d``
  of the image array, exactly as ``nibabel`` / MONAI ``LoadImage`` (with ``EnsureChannelFirst``) give them.
* **Voxel coordinates** ``(i, j, k)`` are array indices with voxel *centres* at integers ``0 .. n-1``.
* **World coordinates** are millimetres in the frame of the image's 4 x 4 affine: ``x = A @ [i, j, k, 1]``. For NIfTI
  read by nibabel or MONAI that frame is RAS+ (the NIfTI scanner / MNI frame).
* **Transforms** are 4 x 4 matrices acting on homogeneous column vectors of world points, or callables that map
  ``(B, N, 3)`` world points. A ``fixed_to_moving`` transform maps a world point of the fixed image to the corresponding
  world point of the moving image: it is the pull-back used to resample the moving image onto the fixed grid.
* **Sampling** uses ``torch.nn.functional.grid_sample`` with ``align_corners=True``: normalised ``-1`` is the centre of
  voxel ``0`` and ``+1`` the centre of voxel ``n-1``, consistent with voxel centres at integers, so the identity
  transform reproduces the image (up to float rounding). ``grid_sample`` orders the normalised coordinates
  ``(x, y, z) = (k, j, i)``, i.e. reversed relative to the tensor's spatial dimensions; that flip happens only here.
* **Heatmap cells** of a detector cover the input field of view: cell ``u`` of an axis with ``m`` cells, for an input
  axis of ``n`` voxels, is centred at input voxel ``(u + 0.5) * n / m - 0.5`` (the convention of non-overlapping
  pooling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .fits import ThinPlateSpline

__all__ = [
    "PointTransform",
    "as_tensor",
    "batch_affine",
    "apply_affine",
    "apply_transform",
    "full_precision",
    "voxel_grid",
    "voxel_to_world",
    "world_to_voxel",
    "heatmap_to_voxel",
    "voxel_to_normalized",
    "world_transform_to_voxel",
    "sample_at_voxels",
    "resample",
    "resample_to_image",
    "LPS_FROM_RAS",
]

#: A transform of world points: a ``(B, 4, 4)`` matrix, or a callable mapping ``(B, N, 3)`` world points.
PointTransform = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

#: ``diag(-1, -1, 1, 1)``: converts RAS+ world points to LPS+ (ITK, DICOM) and back (it is its own inverse).
LPS_FROM_RAS = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


def as_tensor(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a plain ``torch.Tensor`` (drops MONAI ``MetaTensor`` metadata, shares memory)."""
    as_plain = getattr(x, "as_tensor", None)
    return as_plain() if callable(as_plain) else x


def batch_affine(
    affine: torch.Tensor | None, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Normalise a voxel-to-world affine to shape ``(B, 4, 4)``.

    Args:
        affine: ``(4, 4)`` (shared by the batch), ``(B, 4, 4)``, or ``None`` (identity: voxel index = mm).
        batch: the batch size ``B``.
        device: device of the result.
        dtype: dtype of the result (float64 by default: affines compose, so keep them precise).

    Raises:
        ValueError: if the shape is neither ``(4, 4)``, ``(1, 4, 4)`` nor ``(B, 4, 4)``.
    """
    if affine is None:
        return torch.eye(4, device=device, dtype=dtype).expand(batch, 4, 4).clone()
    affine = torch.as_tensor(as_tensor(affine), device=device).to(dtype)
    if affine.shape == (4, 4):
        affine = affine.unsqueeze(0)
    if affine.ndim != 3 or affine.shape[1:] != (4, 4) or affine.shape[0] not in (1, batch):
        raise ValueError(f"expected an affine of shape (4, 4) or ({batch}, 4, 4), got {tuple(affine.shape)}.")
    return affine.expand(batch, 4, 4).clone()


def full_precision(device: torch.device | str) -> AbstractContextManager:
    """A context in which autocast is off on ``device``: coordinates computed inside keep their float32 / float64
    precision when the caller runs under mixed precision (autocast would take a float32 matmul to float16 on CUDA,
    bfloat16 on the CPU: sub-voxel keypoints and world mm would lose their fractions, or overflow float16)."""
    kind = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    supported = available(kind) if available is not None else kind in ("cpu", "cuda")
    return torch.autocast(kind, enabled=False) if supported else nullcontext()


def apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(B, 4, 4)`` homogeneous matrices to ``(B, N, 3)`` points; returns ``(B, N, 3)`` in ``points.dtype``
    (in that precision under autocast too)."""
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"expected points of shape (B, N, 3), got {tuple(points.shape)}.")
    if matrix.ndim != 3 or matrix.shape[1:] != (4, 4) or matrix.shape[0] not in (1, points.shape[0]):
        raise ValueError(f"expected matrices of shape ({points.shape[0]}, 4, 4), got {tuple(matrix.shape)}.")
    m = matrix.to(points.dtype)
    with full_precision(points.device):
        return points @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]


def apply_transform(transform: PointTransform, points: torch.Tensor) -> torch.Tensor:
    """Map ``(B, N, 3)`` world points through a :data:`PointTransform`: ``(B, 4, 4)`` matrices (see
    :func:`apply_affine`) or a callable such as a thin-plate spline."""
    return apply_affine(transform, points) if isinstance(transform, torch.Tensor) else transform(points)


def voxel_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel-centre coordinates of a grid: ``(*shape, 3)`` with ``grid[i, j, k] = (i, j, k)``."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def voxel_to_world(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates ``(B, N, 3)`` to world mm with voxel-to-world affines ``(B, 4, 4)``."""
    return apply_affine(affine, points)


def world_to_voxel(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World mm ``(B, N, 3)`` to voxel coordinates of the image whose voxel-to-world affine is ``affine (B, 4, 4)``."""
    return apply_affine(torch.linalg.inv(affine.to(torch.float64)), points)


def heatmap_to_voxel(points: torch.Tensor, heatmap_shape: Sequence[int], image_shape: Sequence[int]) -> torch.Tensor:
    """Map ``(..., 3)`` coordinates in heatmap-cell units to input voxel coordinates (cell-centre convention).

    A heatmap of ``m`` cells along an axis covers the ``n`` input voxels of that axis, so cell ``u`` is centred at
    input voxel ``(u + 0.5) * n / m - 0.5``.
    """
    scale = torch.tensor([n / m for n, m in zip(image_shape, heatmap_shape)], device=points.device, dtype=points.dtype)
    return (points + 0.5) * scale - 0.5


def voxel_to_normalized(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(..., 3)`` in ``(i, j, k)`` order to ``grid_sample`` coordinates (``align_corners=True``).

    Returns ``(..., 3)`` in ``grid_sample``'s ``(x, y, z) = (k, j, i)`` order, with ``-1`` / ``+1`` at the centres of
    the first / last voxel. (An axis of size 1 is degenerate: ``grid_sample`` then samples its only voxel whatever
    the coordinate.)
    """
    size = torch.tensor([max(int(n) - 1, 1) for n in shape], device=points.device, dtype=points.dtype)
    return (2.0 * points / size - 1.0).flip(-1)


def sample_at_voxels(
    image: torch.Tensor, points: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Interpolate ``image`` ``(B, C, I, J, K)`` at voxel coordinates ``points`` ``(B, N, 3)`` (``(i, j, k)``, any
    float dtype): returns ``(B, C, N, 1, 1)`` in the image's dtype (a scattered-point ``grid_sample``)."""
    grid = voxel_to_normalized(points, image.shape[2:]).to(image.dtype)[:, :, None, None]
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def _voxel_to_normalized_matrix(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 4 x 4 matrix of :func:`voxel_to_normalized` (including the axis flip)."""
    scale = torch.tensor([2.0 / max(int(n) - 1, 1) for n in shape], dtype=dtype, device=device)
    m = torch.zeros(4, 4, dtype=dtype, device=device)
    m[:3, :3] = torch.diag(scale).flip(0)  # row r of the result is axis (2 - r) of the voxel point
    m[:3, 3] = -1.0
    m[3, 3] = 1.0
    return m


def world_transform_to_voxel(
    fixed_to_moving: torch.Tensor, fixed_affine: torch.Tensor, moving_affine: torch.Tensor
) -> torch.Tensor:
    """Express a world ``fixed_to_moving`` transform ``(B, 4, 4)`` as fixed-voxel to moving-voxel matrices.

    ``V = inv(A_moving) @ T @ A_fixed``, computed in float64.
    """
    f64 = torch.float64
    return torch.linalg.inv(moving_affine.to(f64)) @ fixed_to_moving.to(f64) @ fixed_affine.to(f64)


def _check_image(image: torch.Tensor, name: str) -> None:
    if image.ndim != 5:
        raise ValueError(f"expected {name} of shape (B, C, I, J, K), got {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise ValueError(f"expected a floating-point {name} tensor, got {image.dtype}.")


def resample(
    moving: torch.Tensor,
    fixed_to_moving: PointTransform,
    fixed_shape: Sequence[int],
    fixed_affine: torch.Tensor | None = None,
    moving_affine: torch.Tensor | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    chunk_size: int = 2**18,
) -> torch.Tensor:
    """Resample ``moving`` onto the fixed grid through a world-space ``fixed_to_moving`` transform.

    For every fixed voxel ``v`` the output is ``moving`` sampled at ``inv(A_moving) T(A_fixed v)``.

    Args:
        moving: ``(B, C, I, J, K)`` floating-point image.
        fixed_to_moving: ``(B, 4, 4)`` world matrices (or ``(4, 4)``), or a callable mapping ``(B, N, 3)`` world
            points of the fixed image to world points of the moving image (e.g. a thin-plate spline).
        fixed_shape: spatial shape ``(I', J', K')`` of the output grid.
        fixed_affine: voxel-to-world affine of the output grid, ``(4, 4)`` or ``(B, 4, 4)``; ``None`` = identity.
        moving_affine: voxel-to-world affine of ``moving``; ``None`` = identity.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (labels).
        padding_mode: ``grid_sample`` padding: ``"zeros"``, ``"border"`` or ``"reflection"``.
        chunk_size: number of output voxels evaluated at once for callable transforms (bounds memory).

    Returns:
        ``(B, C, I', J', K')`` in ``moving.dtype``.
    """
    _check_image(moving, "moving image")
    moving = as_tensor(moving)
    batch, device = moving.shape[0], moving.device
    fixed_shape = tuple(int(n) for n in fixed_shape)
    if len(fixed_shape) != 3:
        raise ValueError(f"expected a 3D fixed_shape, got {fixed_shape}.")
    a_fix = batch_affine(fixed_affine, batch, device)
    a_mov = batch_affine(moving_affine, batch, device)

    if isinstance(fixed_to_moving, torch.Tensor):
        t = batch_affine(fixed_to_moving, batch, device)
        vox = world_transform_to_voxel(t, a_fix, a_mov)
        # fixed normalised -> fixed voxel -> moving voxel -> moving normalised, as one matrix for affine_grid
        n_fix = _voxel_to_normalized_matrix(fixed_shape, torch.float64, device)
        n_mov = _voxel_to_normalized_matrix(moving.shape[2:], torch.float64, device)
        theta = n_mov @ vox @ torch.linalg.inv(n_fix)
        # affine_grid indexes its output as [d, h, w] = (i, j, k) with coordinates in (x, y, z) = (k, j, i) order,
        # the same flip voxel_to_normalized applies, so theta maps normalised fixed to normalised moving directly.
        grid = F.affine_grid(theta[:, :3].to(moving.dtype), [batch, 1, *fixed_shape], align_corners=True)
    else:
        pts_vox = voxel_grid(fixed_shape, device, torch.float64).reshape(1, -1, 3).expand(batch, -1, -1)
        world_fix = voxel_to_world(pts_vox, a_fix)
        out = []
        for start in range(0, world_fix.shape[1], chunk_size):
            world_mov = fixed_to_moving(world_fix[:, start : start + chunk_size].to(moving.dtype))
            vox_mov = world_to_voxel(world_mov.to(torch.float64), a_mov)
            out.append(voxel_to_normalized(vox_mov, moving.shape[2:]).to(moving.dtype))
        grid = torch.cat(out, dim=1).reshape(batch, *fixed_shape, 3)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def resample_to_image(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    fixed_to_moving: torch.Tensor | ThinPlateSpline,
    mode: str = "bilinear",
    device: torch.device | str = "cpu",
    max_voxels: int = 2**22,
) -> np.ndarray:
    """Resample a full-resolution moving volume onto a fixed grid, slab by slab (bounded memory).

    Args:
        moving: ``(I, J, K)`` moving voxels; ``moving_affine``: its ``(4, 4)`` voxel-to-world affine (RAS mm).
        fixed_shape: ``(I', J', K')`` of the output grid; ``fixed_affine``: its ``(4, 4)`` voxel-to-world affine.
        fixed_to_moving: ``(1, 4, 4)`` world matrix or a one-item spline (fixed point -> moving point).
        mode: ``bilinear`` or ``nearest`` (labels); zeros outside the moving field of view.
        device: where the resampling runs.
        max_voxels: output voxels per slab.

    Returns:
        ``(I', J', K')`` float32 array.
    """
    mov = torch.as_tensor(np.asarray(moving, dtype=np.float32), device=device)[None, None]
    a_m = torch.as_tensor(moving_affine, dtype=torch.float64, device=device)
    a_f = torch.as_tensor(fixed_affine, dtype=torch.float64, device=device)
    slab = max(1, max_voxels // max(1, int(np.prod(fixed_shape[1:]))))
    out = np.empty(tuple(int(n) for n in fixed_shape), dtype=np.float32)
    for i0 in range(0, int(fixed_shape[0]), slab):
        i1 = min(int(fixed_shape[0]), i0 + slab)
        shift = torch.eye(4, dtype=torch.float64, device=device)
        shift[0, 3] = i0
        part = resample(mov, fixed_to_moving, (i1 - i0, *fixed_shape[1:]), a_f @ shift, a_m, mode=mode)
        out[i0:i1] = part[0, 0].cpu().numpy()
    return out
