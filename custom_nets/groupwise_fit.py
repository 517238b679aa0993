"""The keypoint stage of groupwise registration: fits only, no image is read.

Each scan's keypoints (in each of its views) are given as :class:`ScanKeypoints`. :class:`KeypointGroupFit` picks
each scan's view, fits its ``template_to_scan`` transform in closed form, averages the aligned keypoints into the
template keypoints, iterates, and fixes template space by the group mean (:func:`~custom_nets.group_mean.mean_affine`).
World coordinates are mm (:mod:`custom_nets.geometry`); ``template_to_scan`` maps template points to scan points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .fits import DegenerateKeypointsError, keypoint_residual_mm
from .geometry import apply_affine
from .group_mean import mean_affine
from .keymorph import KeyMorph

__all__ = ["KeypointGroupFit", "ScanKeypoints", "UnusableScans", "inverse"]

logger = logging.getLogger(__name__)
_F64 = torch.float64


class UnusableScans(ValueError):
    """Scans whose keypoints cannot be fitted to the template: ``reasons`` maps their index to why."""

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__("; ".join(f"scan {n}: {why}" for n, why in reasons.items()))
        self.reasons = reasons


@dataclass
class ScanKeypoints:
    """What stays in memory of one scan: its keypoints ``(V, K, 3)`` world mm and heatmap masses ``(V, K)`` in each
    of its ``V`` views (1 without the orientation search), the world corners ``(8, 3)`` of its foreground box, the
    view the fits use, and its label map's path if it has one."""

    path: str
    stem: str
    points: torch.Tensor
    mass: torch.Tensor
    corners: torch.Tensor
    view: int = 0
    label: str | None = None


def inverse(a: torch.Tensor) -> torch.Tensor:
    """Float64 inverse of ``(..., 4, 4)`` transforms."""
    return torch.linalg.inv(a.to(_F64))


class KeypointGroupFit:
    """The keypoint iterations of a groupwise registration (see the module docstring).

    Args:
        network: the :class:`~custom_nets.keymorph.KeyMorph` whose ``fit`` and ``keypoint_weights`` are used.
        transform_type: ``"affine"`` or ``"rigid"``.
        iterations: template keypoints <- weighted mean of the aligned keypoints, transforms <- fits, this many times.
    """

    def __init__(self, network: KeyMorph, transform_type: str = "affine", iterations: int = 5) -> None:
        self.network, self.kind, self.iterations = network, transform_type, max(1, int(iterations))

    def weights(self, template_mass: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        return self.network.keypoint_weights(template_mass.expand_as(mass).float(), mass.float()).to(_F64)

    def choose_view(self, scan: ScanKeypoints, template: torch.Tensor, template_mass: torch.Tensor) -> None:
        """Keep the view whose keypoints an affine maps best onto the template's (smallest residual)."""
        if scan.points.shape[0] == 1:
            return
        best, best_view = float("inf"), scan.view
        for v in range(scan.points.shape[0]):
            w = self.weights(template_mass, scan.mass[v : v + 1])
            try:
                r = float(keypoint_residual_mm(template, scan.points[v : v + 1], w)[0])
            except DegenerateKeypointsError:
                continue
            if r < best:
                best, best_view = r, v
        scan.view = best_view

    def _fit(
        self, scans: list[ScanKeypoints], template: torch.Tensor, template_mass: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``template_to_scan`` ``(N, 4, 4)`` of every scan's chosen view, and the weights ``(N, K)``.

        Raises:
            UnusableScans: scans whose keypoints give no fit, or a reflecting / singular one (named, with why)."""
        points = torch.cat([s.points[s.view : s.view + 1] for s in scans])
        weights = torch.cat([self.weights(template_mass, s.mass[s.view : s.view + 1]) for s in scans])
        fitted, bad = [], {}
        for n in range(len(scans)):
            try:
                a = self.network.fit(template, points[n : n + 1], weights[n : n + 1], self.kind)[0].to(_F64)
            except DegenerateKeypointsError as err:
                bad[n], a = str(err), torch.eye(4, dtype=_F64)[None]
            if n not in bad and float(torch.linalg.det(a[0, :3, :3])) <= 0:
                bad[n] = "its keypoints fit the template only by a reflection"
            fitted.append(a)
        if bad:
            raise UnusableScans(bad)
        return torch.cat(fitted), weights

    def _initial_template(self, scans: list[ScanKeypoints]) -> tuple[torch.Tensor, torch.Tensor]:
        """The keypoints ``(1, K, 3)`` and masses ``(1, K)`` the iterations start from: the view of the first scan
        that agrees best with the others (median over up to 8 of them of their best view's residual), since the
        detector is consistent only in views near upright."""
        first, others = scans[0], scans[1:9]
        if first.points.shape[0] == 1:
            return first.points[:1].clone(), first.mass[:1].clone()
        scores = []
        for v in range(first.points.shape[0]):
            start = ScanKeypoints("", "", first.points[v : v + 1], first.mass[v : v + 1], first.corners)
            best = []
            for other in others:
                self.choose_view(other, start.points, start.mass)
                w = self.weights(start.mass, other.mass[other.view : other.view + 1])
                try:
                    best.append(
                        float(keypoint_residual_mm(start.points, other.points[other.view : other.view + 1], w)[0])
                    )
                except DegenerateKeypointsError:
                    best.append(float("inf"))
            scores.append(float(np.median(best)))
        v = int(np.argmin(scores))
        first.view = v
        return first.points[v : v + 1].clone(), first.mass[v : v + 1].clone()

    def fit_keypoints(
        self, scans: list[ScanKeypoints]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The keypoint iterations: template keypoints ``(1, K, 3)`` and masses ``(1, K)``, ``template_to_scan``
        ``(N, 4, 4)`` and the fit weights ``(N, K)``, in the gauge of :meth:`_gauge`."""
        template, template_mass = self._initial_template(scans)
        for it in range(self.iterations):
            for scan in scans:
                self.choose_view(scan, template, template_mass)
            transforms, weights = self._fit(scans, template, template_mass)
            points = torch.cat([s.points[s.view : s.view + 1] for s in scans])
            aligned = apply_affine(inverse(transforms), points)  # each scan's keypoints in template space
            new = (weights[..., None] * aligned).sum(0, keepdim=True) / weights.sum(0)[None, :, None].clamp(min=1e-12)
            template_mass = torch.cat([s.mass[s.view : s.view + 1] for s in scans]).mean(0, keepdim=True)
            moved = float((new - template).norm(dim=-1).mean())
            template = new
            transforms, weights = self._fit(scans, template, template_mass)
            template, transforms = self._gauge(template, transforms)
            logger.info("groupwise keypoint iteration %d: template keypoints moved %.3f mm", it + 1, moved)
        return template, template_mass, transforms, weights

    @staticmethod
    def gauge(template: torch.Tensor, transforms: torch.Tensor, iterations: int = 10) -> torch.Tensor:
        """``G`` ``(4, 4)`` such that in the template coordinates ``x' = G x`` the group mean
        (:func:`~custom_nets.group_mean.mean_affine` about the template keypoints' centroid) of the
        ``template_to_scan`` transforms ``A_i' = A_i G^-1`` is the identity (iterated: the mean of a product is not
        the product of means when the transforms stretch)."""
        g = torch.eye(4, dtype=_F64)
        for _ in range(iterations):
            step = mean_affine(transforms @ inverse(g)[None], apply_affine(g[None], template)[0].mean(0))
            g = step @ g
            if float((step - torch.eye(4, dtype=_F64)).abs().max()) < 1e-10:
                break
        return g

    def _gauge(self, template: torch.Tensor, transforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Template keypoints and transforms in the gauge of :meth:`gauge`."""
        g = self.gauge(template, transforms)
        return apply_affine(g[None], template), transforms @ inverse(g)[None]

    def residuals(self, scans: list[ScanKeypoints], keypoints: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Each scan's keypoint-fit residual (mm) against the template keypoints (NaN where the fit is degenerate)."""
        out = torch.full((len(scans),), float("nan"), dtype=_F64)
        for n, scan in enumerate(scans):
            w = self.weights(mass, scan.mass[scan.view : scan.view + 1])
            try:
                out[n] = keypoint_residual_mm(keypoints, scan.points[scan.view : scan.view + 1], w)[0]
            except DegenerateKeypointsError:
                pass
        return out
