"""The mean of a group of affine transforms, which fixes where a groupwise template sits.

A groupwise template space is defined only up to one global transform: mapping every scan to it through ``A_i`` or
through ``A_i G`` describes the same alignment. :func:`mean_affine` chooses ``G`` without favouring a scan: the
template sits at the group's mean pose, the pose whose offsets to the scans average to nothing.

Each ``template_to_scan`` transform is written about a centre ``c`` (the template keypoints' centroid) as
``A_i(x) = L_i (x - c) + c + d_i`` and its linear part split by the polar decomposition ``L_i = R_i S_i`` (rotation
times symmetric positive-definite stretch). The mean is then

* rotation: the Karcher (geodesic) mean of the ``R_i`` on SO(3);
* stretch: the log-Euclidean mean ``exp(mean(log S_i))`` (scale averaged geometrically);
* translation: the arithmetic mean of the ``d_i`` (where the template centre lands, on average).

All matrices are ``(..., 4, 4)`` float64 world (mm) transforms acting on column vectors (see
:mod:`custom_nets.geometry`).
"""

from __future__ import annotations

import torch

__all__ = ["mean_affine", "rotation_log", "rotation_exp", "polar"]

_F64 = torch.float64


def rotation_log(r: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors ``(N, 3)`` (radians) of rotations ``(N, 3, 3)``: ``rotation_exp(rotation_log(r)) == r``.

    Near 180 degrees, where the skew part vanishes, the axis comes from the symmetric part,
    ``(R + R^T) / 2 = cos(angle) I + (1 - cos(angle)) a a^T``, and its sign from the skew part."""
    r = r.to(_F64)
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    skew = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], -1)
    sin = skew.norm(dim=-1) / 2.0
    angle = torch.atan2(sin, cos)  # well conditioned at 0 and 180 degrees, unlike arccos
    safe = sin.abs() > 1e-6
    scale = torch.where(safe, angle / (2.0 * torch.where(safe, sin, torch.ones_like(sin))), torch.full_like(sin, 0.5))
    out = skew * scale[:, None]
    near_pi = (angle > torch.pi - 1e-3).nonzero().flatten().tolist()
    for n in near_pi:  # the symmetric part is cos(angle) I + (1 - cos(angle)) a a^T
        outer = ((r[n] + r[n].T) / 2.0 - cos[n] * torch.eye(3, dtype=_F64, device=r.device)) / (1.0 - cos[n])
        col = int(outer.diagonal().argmax())
        axis = outer[:, col] / outer[col, col].clamp(min=1e-12).sqrt()
        axis = axis / axis.norm()
        if skew[n].dot(axis) < 0:  # keep the sign the skew part still carries slightly below 180 degrees
            axis = -axis
        out[n] = axis * angle[n]
    return out


def rotation_exp(v: torch.Tensor) -> torch.Tensor:
    """Rotations ``(N, 3, 3)`` of axis-angle vectors ``(N, 3)`` (radians)."""
    v = v.to(_F64)
    zero = torch.zeros_like(v[:, 0])
    k = torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], -1),
            torch.stack([v[:, 2], zero, -v[:, 0]], -1),
            torch.stack([-v[:, 1], v[:, 0], zero], -1),
        ],
        -2,
    )
    return torch.linalg.matrix_exp(k)


def polar(linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar decomposition ``L = R S`` of ``(N, 3, 3)`` matrices with positive determinant: rotations ``R`` and
    symmetric positive-definite ``S``.

    Raises:
        ValueError: a matrix is singular or reflects (determinant <= 0): it is not a pose of a brain."""
    linear = linear.to(_F64)
    det = torch.linalg.det(linear)
    if (det <= 0).any():
        bad = (det <= 0).nonzero().flatten().tolist()
        raise ValueError(f"expected transforms with a positive determinant, got {det[bad].tolist()} at items {bad}.")
    u, s, vt = torch.linalg.svd(linear)
    r = u @ vt
    stretch = vt.transpose(-1, -2) @ torch.diag_embed(s) @ vt
    return r, stretch


def _spd_log(s: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(s)
    return vectors @ torch.diag_embed(values.log()) @ vectors.transpose(-1, -2)


def _spd_exp(s: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(s)
    return vectors @ torch.diag_embed(values.exp()) @ vectors.transpose(-1, -2)


def _karcher_rotation(r: torch.Tensor, iterations: int = 50, tolerance: float = 1e-12) -> torch.Tensor:
    """Geodesic mean ``(3, 3)`` of rotations ``(N, 3, 3)``, started from the chordal mean's nearest rotation."""
    u, _, vt = torch.linalg.svd(r.mean(0))
    mean = u @ torch.diag(torch.tensor([1.0, 1.0, float(torch.linalg.det(u @ vt).sign())], dtype=_F64)) @ vt
    for _ in range(iterations):
        step = rotation_log(mean.T[None] @ r).mean(0)
        mean = mean @ rotation_exp(step[None])[0]
        if float(step.norm()) < tolerance:
            break
    return mean


def mean_affine(transforms: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The group mean ``(4, 4)`` of affine transforms ``(N, 4, 4)`` about ``centre`` ``(3,)`` (see the module
    docstring). Rigid transforms give a rigid mean."""
    a = transforms.to(_F64)
    c = centre.to(_F64).reshape(3)
    rot, stretch = polar(a[:, :3, :3])
    linear = _karcher_rotation(rot) @ _spd_exp(_spd_log(stretch).mean(0))
    offset = (a[:, :3, :3] @ c + a[:, :3, 3] - c).mean(0)  # d_i = A_i(c) - c
    out = torch.eye(4, dtype=_F64)
    out[:3, :3] = linear
    out[:3, 3] = c + offset - linear @ c
    return out
