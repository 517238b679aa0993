"""Closed-form, batched, differentiable fits of a transform to point correspondences.

All fits take ``src`` and ``dst`` of shape ``(B, K, 3)`` (``B >= 1`` independent problems, ``K`` corresponding points,
usually world millimetres, see :mod:`custom_nets.geometry`) and optional non-negative ``weights`` of shape ``(B, K)``.
They solve in float64 and return results in the dtype of ``src``. A point with weight 0 does not influence the fit.

If the points with non-zero weight cannot determine the transform (too few, coplanar for affine, collinear for rigid,
coincident for an interpolating spline), a :class:`DegenerateKeypointsError` names the batch item and the reason:
the fits never return NaN or a silently wrong transform.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "DegenerateKeypointsError",
    "ThinPlateSpline",
    "fit_affine",
    "fit_rigid",
    "fit_tps",
    "fit_transform",
    "keypoint_residual_mm",
]

_F64 = torch.float64
#: Relative tolerance on the eigenvalues of the weighted point covariance below which a direction counts as absent.
_RANK_TOL = 1e-9


class DegenerateKeypointsError(ValueError):
    """The keypoints cannot determine the requested transform (too few, coplanar, collinear or coincident)."""


def _check_inputs(
    name: str, src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and values; return float64 copies and weights (ones if ``None``)."""
    if src.ndim != 3 or src.shape[-1] != 3:
        raise ValueError(f"{name}: expected src of shape (B, K, 3), got {tuple(src.shape)}.")
    if dst.shape != src.shape:
        raise ValueError(f"{name}: expected dst of the same shape as src {tuple(src.shape)}, got {tuple(dst.shape)}.")
    b, k, _ = src.shape
    if weights is None:
        weights = torch.ones(b, k, dtype=_F64, device=src.device)
    elif weights.shape != (b, k):
        raise ValueError(f"{name}: expected weights of shape ({b}, {k}), got {tuple(weights.shape)}.")
    for label, t in (("src", src), ("dst", dst), ("weights", weights)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: {label} contains NaN or Inf values.")
    if (weights < 0).any():
        raise ValueError(f"{name}: weights must be non-negative, got a minimum of {weights.min().item():.3g}.")
    return src.to(_F64), dst.to(_F64), weights.to(_F64)


def _weighted_centre(points: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean ``(B, 1, 3)`` of ``(B, K, 3)`` points with weights ``(B, K)`` (sum > 0)."""
    return (w.unsqueeze(-1) * points).sum(1, keepdim=True) / w.sum(1, keepdim=True).unsqueeze(-1)


def _require_rank(name: str, points: torch.Tensor, w: torch.Tensor, rank: int, need: str) -> None:
    """Raise :class:`DegenerateKeypointsError` unless the weighted points span ``rank`` dimensions in every item."""
    total = w.sum(1)
    with torch.no_grad():
        for b in range(points.shape[0]):
            n_eff = int((w[b] > 0).sum())
            if total[b] <= 0 or n_eff < rank + 1:
                raise DegenerateKeypointsError(
                    f"{name}: batch item {b} has {n_eff} keypoints with non-zero weight; {need}."
                )
        c = points - _weighted_centre(points, w)
        cov = (w.unsqueeze(-1) * c).transpose(1, 2) @ c / total.view(-1, 1, 1)
        eig = torch.linalg.eigvalsh(cov)  # ascending
        scale = eig[:, -1].clamp_min(torch.finfo(_F64).tiny)
        for b in range(points.shape[0]):
            if eig[b, 3 - rank] <= _RANK_TOL * scale[b]:
                spread = ", ".join(f"{v:.3g}" for v in eig[b].sqrt().tolist())
                raise DegenerateKeypointsError(
                    f"{name}: batch item {b}: the weighted keypoints span fewer than {rank} dimensions "
                    f"(standard deviations along principal axes: {spread}); {need}."
                )


def fit_affine(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted least-squares affine transform mapping ``src`` onto ``dst``.

    Minimises ``sum_k w_k |A [src_k; 1] - dst_k|^2`` per batch item; closed form ``A = Y W X^T (X W X^T)^-1`` with
    homogeneous ``X`` (4 x K). Solved on centred points (better conditioned), in float64.

    Args:
        src: ``(B, K, 3)`` source points.
        dst: ``(B, K, 3)`` target points.
        weights: optional ``(B, K)`` non-negative weights.

    Returns:
        ``(B, 4, 4)`` matrices ``A`` with ``A @ [src; 1] ~ [dst; 1]``, last row ``(0, 0, 0, 1)``.

    Raises:
        DegenerateKeypointsError: fewer than 4 non-coplanar points with non-zero weight.
    """
    x, y, w = _check_inputs("fit_affine", src, dst, weights)
    _require_rank("fit_affine", x, w, 3, "an affine fit needs at least 4 non-coplanar points")
    cx, cy = _weighted_centre(x, w), _weighted_centre(y, w)
    xc, yc = x - cx, y - cy
    xtw = (w.unsqueeze(-1) * xc).transpose(1, 2)  # (B, 3, K)
    # linear part L solves L (Xc W Xc^T) = Yc W Xc^T; the translation follows from the centres.
    lin = torch.linalg.solve(xtw @ xc, xtw @ yc).transpose(1, 2)  # (B, 3, 3)
    return _homogeneous(lin, cy.squeeze(1) - (lin @ cx.transpose(1, 2)).squeeze(-1)).to(src.dtype)


def fit_rigid(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted rigid (rotation + translation) transform mapping ``src`` onto ``dst`` (weighted Kabsch / Umeyama).

    The rotation comes from the SVD of the weighted cross-covariance with the reflection fix, so it is always proper
    (orthonormal, determinant +1), even when the best orthogonal fit would be a reflection. Exactly symmetric:
    ``fit_rigid(dst, src, w)`` is the inverse of ``fit_rigid(src, dst, w)``.

    Args:
        src: ``(B, K, 3)`` source points.
        dst: ``(B, K, 3)`` target points.
        weights: optional ``(B, K)`` non-negative weights.

    Returns:
        ``(B, 4, 4)`` matrices ``[[R, t], [0, 1]]`` with ``R src_k + t ~ dst_k``.

    Raises:
        DegenerateKeypointsError: fewer than 3 non-collinear points with non-zero weight (in ``src`` or ``dst``).
    """
    x, y, w = _check_inputs("fit_rigid", src, dst, weights)
    need = "a rigid fit needs at least 3 non-collinear points"
    _require_rank("fit_rigid", x, w, 2, need)
    _require_rank("fit_rigid", y, w, 2, need)
    cx, cy = _weighted_centre(x, w), _weighted_centre(y, w)
    h = (w.unsqueeze(-1) * (x - cx)).transpose(1, 2) @ (y - cy)  # (B, 3, 3) cross-covariance
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(1, 2)
    sign = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], dim=-1))
    rot = v @ d @ u.transpose(1, 2)
    return _homogeneous(rot, cy.squeeze(1) - (rot @ cx.transpose(1, 2)).squeeze(-1)).to(src.dtype)


def _homogeneous(lin: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Assemble ``(B, 4, 4)`` from a linear part ``(B, 3, 3)`` and a translation ``(B, 3)``."""
    out = torch.zeros(lin.shape[0], 4, 4, dtype=lin.dtype, device=lin.device)
    out[:, :3, :3] = lin
    out[:, :3, 3] = trans
    out[:, 3, 3] = 1.0
    return out


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``U(r) = r^2 log r`` between ``(B, N, 3)`` and ``(B, K, 3)`` points: ``(B, N, K)``, with ``U(0) = 0``."""
    r2 = ((a.unsqueeze(2) - b.unsqueeze(1)) ** 2).sum(-1)
    return 0.5 * r2 * torch.log(r2.clamp_min(torch.finfo(r2.dtype).tiny))


class ThinPlateSpline:
    """A fitted batch of thin-plate splines ``f(x) = a^T [x'; 1] + sum_k c_k U(|x' - s'_k|)``.

    ``x' = (x - centre) / scale`` is the normalised frame of the control points (see :func:`fit_tps`). Call it with
    ``(B, N, 3)`` points (in the units of the control points) to get ``(B, N, 3)`` mapped points.

    Attributes:
        control: ``(B, K, 3)`` control points in the normalised frame.
        centre: ``(B, 1, 3)`` and ``scale``: ``(B, 1, 1)`` define the normalised frame.
        kernel_coeffs: ``(B, K, 3)`` non-affine coefficients ``c``.
        affine_coeffs: ``(B, 4, 3)`` affine coefficients ``a`` (rows: x', y', z', 1).
        lam: the smoothing parameter used.
    """

    def __init__(
        self,
        control: torch.Tensor,
        centre: torch.Tensor,
        scale: torch.Tensor,
        kernel_coeffs: torch.Tensor,
        affine_coeffs: torch.Tensor,
        lam: float,
        dtype: torch.dtype,
    ) -> None:
        self.control, self.centre, self.scale = control, centre, scale
        self.kernel_coeffs, self.affine_coeffs, self.lam, self.dtype = kernel_coeffs, affine_coeffs, lam, dtype

    @property
    def batch_size(self) -> int:
        """Number of splines ``B``."""
        return self.control.shape[0]

    def __call__(self, points: torch.Tensor, chunk_size: int = 2**16) -> torch.Tensor:
        """Map ``(B, N, 3)`` points; evaluated in chunks of ``chunk_size`` points to bound memory (``N x K``), on the
        spline's device, and returned on the points' device in their dtype."""
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] not in (1, self.batch_size):
            raise ValueError(f"expected points of shape ({self.batch_size}, N, 3), got {tuple(points.shape)}.")
        dtype, device = points.dtype, points.device
        p = (points.to(device=self.centre.device, dtype=_F64) - self.centre) / self.scale
        out = []
        for start in range(0, p.shape[1], chunk_size):
            q = p[:, start : start + chunk_size]
            lin = q @ self.affine_coeffs[:, :3] + self.affine_coeffs[:, 3:4]
            out.append(lin + _tps_kernel(q, self.control) @ self.kernel_coeffs)
        return torch.cat(out, dim=1).to(device=device, dtype=dtype)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ThinPlateSpline:
        return ThinPlateSpline(
            fn(self.control),
            fn(self.centre),
            fn(self.scale),
            fn(self.kernel_coeffs),
            fn(self.affine_coeffs),
            self.lam,
            self.dtype,
        )

    def to(self, device: torch.device | str) -> ThinPlateSpline:
        """The same splines with their tensors on ``device``."""
        return self._map(lambda t: t.to(device))

    def select(self, index: int) -> ThinPlateSpline:
        """Batch item ``index`` as a batch of one spline."""
        return self._map(lambda t: t[index : index + 1])

    @staticmethod
    def cat(splines: list[ThinPlateSpline]) -> ThinPlateSpline:
        """Concatenate splines with the same number of control points along the batch."""
        first = splines[0]
        return ThinPlateSpline(
            torch.cat([s.control for s in splines]),
            torch.cat([s.centre for s in splines]),
            torch.cat([s.scale for s in splines]),
            torch.cat([s.kernel_coeffs for s in splines]),
            torch.cat([s.affine_coeffs for s in splines]),
            first.lam,
            first.dtype,
        )

    def affine_part(self) -> torch.Tensor:
        """The affine part of the spline as ``(B, 4, 4)`` matrices in the original (un-normalised) units."""
        lin = self.affine_coeffs[:, :3].transpose(1, 2) / self.scale  # d f / d x
        trans = self.affine_coeffs[:, 3] - (lin @ self.centre.transpose(1, 2)).squeeze(-1)
        return _homogeneous(lin, trans).to(self.dtype)


def fit_tps(
    src: torch.Tensor, dst: torch.Tensor, lam: float = 0.0, weights: torch.Tensor | None = None
) -> ThinPlateSpline:
    """Thin-plate spline mapping ``src`` onto ``dst`` with smoothing ``lam >= 0``.

    Solves, per batch item and jointly for the 3 output coordinates,
    ``[[W U + lam I, W P], [P^T, 0]] [c; a] = [W y; 0]`` (``U_kl = U(|s_k - s_l|)``, ``U(r) = r^2 log r``,
    ``P = [s, 1]``, ``W = diag(w)``), which is the usual ``[[U + lam W^-1, P], [P^T, 0]]`` system with rows scaled by
    ``W`` so that zero weights are allowed (such a point gets no kernel and does not pull the spline).
    ``lam = 0`` interpolates every control point of non-zero weight exactly (the weights' sizes then play no role);
    points of weight 0 (e.g. empty heatmaps) are ignored at any ``lam``. A large ``lam`` tends to the weighted
    least-squares affine fit.

    To make ``lam`` independent of units and image size, the spline works in a normalised frame: control points
    centred on their mean and divided by their RMS distance from it. Weights are rescaled to mean 1 for the same reason.

    Args:
        src: ``(B, K, 3)`` control points (source).
        dst: ``(B, K, 3)`` target points.
        lam: smoothing parameter ``>= 0``.
        weights: optional ``(B, K)`` non-negative weights.

    Returns:
        A :class:`ThinPlateSpline` mapping ``(B, N, 3)`` points.

    Raises:
        DegenerateKeypointsError: coplanar points, or coincident control points of non-zero weight when
            ``lam == 0``.
    """
    lam = float(lam)
    if not lam >= 0.0:
        raise ValueError(f"fit_tps: expected lam >= 0, got {lam}.")
    x, y, w = _check_inputs("fit_tps", src, dst, weights)
    b, k, _ = x.shape
    if lam == 0.0:
        w = (w > 0).to(w.dtype)  # interpolation: every weighted control point is matched, whatever its weight
    _require_rank("fit_tps", x, w, 3, "a thin-plate spline needs at least 4 non-coplanar points")
    centre = x.mean(1, keepdim=True)
    scale = ((x - centre) ** 2).sum(-1).mean(1).sqrt().view(b, 1, 1)
    xn = (x - centre) / scale
    if lam == 0.0:
        with torch.no_grad():
            d2 = ((xn.unsqueeze(2) - xn.unsqueeze(1)) ** 2).sum(-1) + torch.eye(k, dtype=_F64, device=x.device) * 1e30
            active = w > 0
            d2 = d2.masked_fill(~(active.unsqueeze(2) & active.unsqueeze(1)), 1e30)  # weight-0 points are not matched
            closest = d2.flatten(1).min(1).values.sqrt()
            for i in range(b):
                if closest[i] < 1e-8:
                    raise DegenerateKeypointsError(
                        f"fit_tps: batch item {i} has coincident control points; an interpolating spline (lam = 0) "
                        "needs distinct points (use lam > 0)."
                    )
    else:
        w = w / w.mean(1, keepdim=True)
    p = torch.cat([xn, torch.ones(b, k, 1, dtype=_F64, device=x.device)], dim=-1)  # (B, K, 4)
    wd = w.unsqueeze(-1)
    # a weight-0 row reads c_k = 0 (its diagonal gets 1 more): the point neither pulls nor bends the spline
    diagonal = torch.diag_embed(lam + (w == 0).to(_F64))
    top = torch.cat([wd * _tps_kernel(xn, xn) + diagonal, wd * p], dim=-1)
    bottom = torch.cat([p.transpose(1, 2), torch.zeros(b, 4, 4, dtype=_F64, device=x.device)], dim=-1)
    system = torch.cat([top, bottom], dim=1)  # (B, K + 4, K + 4)
    rhs = torch.cat([wd * y, torch.zeros(b, 4, 3, dtype=_F64, device=x.device)], dim=1)
    coeffs = torch.linalg.solve(system, rhs)
    return ThinPlateSpline(xn, centre, scale, coeffs[:, :k], coeffs[:, k:], lam, src.dtype)


def fit_transform(
    transform_type: str,
    src: torch.Tensor,
    dst: torch.Tensor,
    weights: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor | ThinPlateSpline:
    """Dispatch to :func:`fit_rigid`, :func:`fit_affine` or :func:`fit_tps` by name (``"rigid" | "affine" | "tps"``)."""
    if transform_type == "affine":
        return fit_affine(src, dst, weights)
    if transform_type == "rigid":
        return fit_rigid(src, dst, weights)
    if transform_type == "tps":
        return fit_tps(src, dst, lam=lam, weights=weights)
    raise ValueError(f"expected transform_type 'rigid', 'affine' or 'tps', got {transform_type!r}.")


def keypoint_residual_mm(
    keypoints_fixed: torch.Tensor, keypoints_moving: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted RMS residual ``(B,)`` (mm) of the weighted least-squares affine fit of ``keypoints_fixed`` onto
    ``keypoints_moving`` (both ``(B, K, 3)`` world mm; ``weights`` ``(B, K)``): how far the two keypoint sets are from
    corresponding through an affine map. Raises :class:`DegenerateKeypointsError` like the fit."""
    a = fit_affine(keypoints_fixed, keypoints_moving, weights).to(_F64)
    src = keypoints_fixed.to(_F64)
    mapped = src @ a[:, :3, :3].transpose(1, 2) + a[:, None, :3, 3]
    r2 = (mapped - keypoints_moving.to(_F64)).square().sum(-1)
    w = weights.to(_F64)
    return ((w * r2).sum(-1) / w.sum(-1).clamp(min=1e-12)).sqrt()
