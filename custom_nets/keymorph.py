"""KeyMorph: keypoint detection, closed-form fit and warping, in world coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fits import DegenerateKeypointsError, ThinPlateSpline, fit_transform
from .geometry import as_tensor, batch_affine, heatmap_to_voxel, resample, voxel_to_world
from .keypoints import CenterOfMass, power_weights
from .search import cube_rotations, rotate_volume

__all__ = ["KeyMorph", "KeyMorphOutput", "TRANSFORM_TYPES"]

TRANSFORM_TYPES = ("rigid", "affine", "tps")


@dataclass
class KeyMorphOutput:
    """Everything one KeyMorph registration produces (world coordinates are mm in the images' affine frame).

    Attributes:
        warped: ``(B, C, *fixed_shape)`` moving image resampled onto the fixed grid.
        fixed_to_moving: ``(B, 4, 4)`` world matrices (rigid / affine) or a :class:`ThinPlateSpline` mapping fixed
            world points to moving world points (the pull-back used for ``warped``).
        moving_to_fixed: the opposite direction: the matrix inverse, or for ``tps`` a spline fitted the other way
            (an approximate inverse away from the keypoints).
        keypoints_fixed: ``(B, K, 3)`` keypoints of the fixed image, world mm.
        keypoints_moving: ``(B, K, 3)`` keypoints of the moving image, world mm.
        weights: ``(B, K)`` keypoint weights used by the fit (0 for a keypoint whose heatmap is empty).
        transform_type: ``"rigid"``, ``"affine"`` or ``"tps"``.
        tps_lambda: smoothing used for ``tps`` (``None`` otherwise).
        keypoints_moving_alt: ``(B, K, 3)`` keypoints of ``moving_alt`` when one was given (keypoint consistency).
    """

    warped: torch.Tensor
    fixed_to_moving: torch.Tensor | ThinPlateSpline
    moving_to_fixed: torch.Tensor | ThinPlateSpline
    keypoints_fixed: torch.Tensor
    keypoints_moving: torch.Tensor
    weights: torch.Tensor
    transform_type: str
    tps_lambda: float | None = None
    keypoints_moving_alt: torch.Tensor | None = None


def _check_content(image: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the batch item if an image holds NaN / Inf or is constant."""
    with torch.no_grad():
        flat = image.detach().reshape(image.shape[0], -1)
        finite = torch.isfinite(flat).all(1)
        span = flat.amax(1) - flat.amin(1)
    for b in range(image.shape[0]):
        if not finite[b]:
            raise ValueError(f"batch item {b} of the {name} contains NaN or Inf voxels.")
        if span[b] <= 0:
            raise ValueError(
                f"batch item {b} of the {name} is constant (every voxel is {flat[b, 0].item():g}): "
                "there is nothing to detect keypoints on."
            )


class KeyMorph(nn.Module):
    """Register a moving image to a fixed image through keypoints found by one shared detector.

    ``p_F = CoM(detector(F))`` and ``p_M = CoM(detector(M))`` are mapped to world mm through each image's affine, the
    transform ``T`` with ``T(p_F) ~ p_M`` is fitted in closed form (weighted), and the moving image is resampled onto
    the fixed grid through ``T``. Because fits are done in world mm, images of any shape, spacing and orientation are
    handled, each batch item with its own affines and transform.

    Called with a single 2-channel tensor ``image`` ``(B, 2, I, J, K)`` (the MONAI bundle convention: channel 0 the
    moving image, channel 1 the fixed image, same grid, identity affines), ``forward`` returns only the warped moving
    image ``(B, 1, I, J, K)``: the form ``verify_net_in_out`` and TorchScript export use. Called with ``moving`` and
    ``fixed`` it returns a :class:`KeyMorphOutput`.

    Args:
        detector: a module mapping ``(B, C, *S)`` images to ``(B, K, *S')`` heatmaps, e.g.
            :class:`~custom_nets.detectors.ConvNetDetector`.
        transform_type: default transform: ``"rigid"``, ``"affine"`` or ``"tps"``.
        tps_lambda: default thin-plate-spline smoothing (``>= 0``).
        weighted: use KeyMorph's heatmap-power keypoint weights; if False, every non-empty keypoint weighs 1.
        com_eps: heatmap mass at or below which a keypoint counts as absent (see :class:`CenterOfMass`).
        orientation_search: at inference (eval mode), detect the moving keypoints in each of the 24 axis-aligned
            orientations of its voxel grid and keep the fit whose warped image is most similar to the fixed one
            (see :mod:`custom_nets.search`): a detector accurate within about 45 degrees then covers any rotation,
            for 24 detector passes instead of one.
        search_similarity: the loss that ranks the candidates (lower is better); default MONAI's
            ``GlobalMutualInformationLoss`` (any contrast).
        refiner: optional module polishing affine results at inference (eval mode), called as
            ``refiner(moving, fixed, fixed_to_moving, moving_affine, fixed_affine)``, e.g.
            :class:`~custom_nets.refine.AffineRefiner`; the keypoints stay those of the detector.
    """

    def __init__(
        self,
        detector: nn.Module,
        transform_type: str = "affine",
        tps_lambda: float = 0.0,
        weighted: bool = True,
        com_eps: float = 1e-6,
        orientation_search: bool = False,
        search_similarity: nn.Module | None = None,
        refiner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.transform_type = self._check_type(transform_type)
        self.tps_lambda = float(tps_lambda)
        self.weighted = bool(weighted)
        self.com = CenterOfMass(eps=com_eps)
        self.orientation_search = bool(orientation_search)
        if search_similarity is None:
            from monai.losses import GlobalMutualInformationLoss

            search_similarity = GlobalMutualInformationLoss(num_bins=32)
        self.search_similarity = search_similarity
        self.refiner = refiner

    @staticmethod
    def _check_type(transform_type: str) -> str:
        if transform_type not in TRANSFORM_TYPES:
            raise ValueError(f"expected transform_type in {TRANSFORM_TYPES}, got {transform_type!r}.")
        return transform_type

    def detect(
        self, image: torch.Tensor, affine: torch.Tensor | None = None, name: str = "image"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints of ``image`` ``(B, C, I, J, K)`` in world mm ``(B, K, 3)`` and their heatmap masses ``(B, K)``.

        ``affine``: voxel-to-world ``(4, 4)`` / ``(B, 4, 4)``; if ``None``, the ``MetaTensor`` affine of ``image``
        if present, else identity (voxel index = mm). ``name`` is used in error messages.

        Raises:
            ValueError: an item of ``image`` contains NaN / Inf, or is constant (nothing to detect keypoints on:
                a detector would only see its own zero padding and return plausible-looking but meaningless points).
        """
        affine = getattr(image, "affine", None) if affine is None else affine
        image = as_tensor(image)
        _check_content(image, name)
        heat = self.detector(image)
        points, mass = self.com(heat)
        vox = heatmap_to_voxel(points, heat.shape[2:], image.shape[2:])
        a = batch_affine(affine, image.shape[0], image.device)
        return voxel_to_world(vox, a), mass

    def fit(
        self,
        keypoints_fixed: torch.Tensor,
        keypoints_moving: torch.Tensor,
        weights: torch.Tensor,
        transform_type: str | None = None,
        tps_lambda: float | None = None,
    ) -> tuple[torch.Tensor | ThinPlateSpline, torch.Tensor | ThinPlateSpline]:
        """Fit ``(fixed_to_moving, moving_to_fixed)`` to world keypoints ``(B, K, 3)`` with weights ``(B, K)``."""
        kind = self._check_type(transform_type or self.transform_type)
        lam = self.tps_lambda if tps_lambda is None else float(tps_lambda)
        forward = fit_transform(kind, keypoints_fixed, keypoints_moving, weights, lam)
        if kind == "tps":
            return forward, fit_transform(kind, keypoints_moving, keypoints_fixed, weights, lam)
        return forward, torch.linalg.inv(forward.double()).to(forward.dtype)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor | None = None,
        moving_affine: torch.Tensor | None = None,
        fixed_affine: torch.Tensor | None = None,
        transform_type: str | None = None,
        tps_lambda: float | None = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        moving_alt: torch.Tensor | None = None,
    ) -> KeyMorphOutput | torch.Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``(B, C, I, J, K)`` moving image (tensor or MONAI ``MetaTensor``); or, with ``fixed=None``, the
                2-channel bundle input ``(B, 2, I, J, K)`` (moving, fixed), for which only the warped image returns.
            fixed: ``(B, C, I', J', K')`` fixed image; the spatial shapes may differ from the moving image's.
            moving_affine: voxel-to-world affine of ``moving`` ``(4, 4)`` or ``(B, 4, 4)``; default: the
                ``MetaTensor`` affine, else identity.
            fixed_affine: same for ``fixed``.
            transform_type: overrides the default transform type for this call.
            tps_lambda: overrides the default spline smoothing for this call.
            mode: interpolation for ``warped`` (``"bilinear"`` or ``"nearest"``).
            padding_mode: ``grid_sample`` padding for ``warped``.
            moving_alt: optional second image of the moving subject in the moving pose (another contrast), whose
                keypoints are returned as ``keypoints_moving_alt`` (for a keypoint-consistency loss).

        Returns:
            :class:`KeyMorphOutput`, or the warped moving image for the 2-channel call.
        """
        if fixed is None:
            if moving.ndim != 5 or moving.shape[1] != 2:
                raise ValueError(
                    "called with one tensor, KeyMorph expects the 2-channel bundle input (B, 2, I, J, K) "
                    f"(channel 0 moving, channel 1 fixed), got {tuple(moving.shape)}."
                )
            pair = as_tensor(moving)
            return self.forward(
                pair[:, :1], pair[:, 1:], moving_affine, fixed_affine, transform_type, tps_lambda
            ).warped
        if moving.ndim != 5 or fixed.ndim != 5 or moving.shape[0] != fixed.shape[0]:
            raise ValueError(
                "expected moving and fixed images of shape (B, C, I, J, K) with the same B, got "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        moving_affine = getattr(moving, "affine", None) if moving_affine is None else moving_affine
        fixed_affine = getattr(fixed, "affine", None) if fixed_affine is None else fixed_affine
        moving, fixed = as_tensor(moving), as_tensor(fixed)
        kind = self._check_type(transform_type or self.transform_type)
        if self.orientation_search and not self.training and moving_alt is None:
            out = self._search(moving, fixed, moving_affine, fixed_affine, kind, tps_lambda, mode, padding_mode)
            return self._refine(out, moving, fixed, moving_affine, fixed_affine, mode, padding_mode)
        if moving.shape[1:] == fixed.shape[1:]:  # one detector pass for both images
            _check_content(fixed, "fixed image")
            _check_content(moving, "moving image")
            both_points, both_mass = self.detect(
                torch.cat([fixed, moving]),
                torch.cat(
                    [
                        batch_affine(fixed_affine, fixed.shape[0], fixed.device),
                        batch_affine(moving_affine, moving.shape[0], moving.device),
                    ]
                ),
            )
            p_fix, p_mov = both_points.chunk(2)
            m_fix, m_mov = both_mass.chunk(2)
        else:
            p_fix, m_fix = self.detect(fixed, fixed_affine, "fixed image")
            p_mov, m_mov = self.detect(moving, moving_affine, "moving image")
        weights = self._weights(m_fix, m_mov)
        f2m, m2f = self.fit(p_fix, p_mov, weights, kind, tps_lambda)
        warped = resample(
            moving, f2m, fixed.shape[2:], fixed_affine, moving_affine, mode=mode, padding_mode=padding_mode
        )
        lam = (self.tps_lambda if tps_lambda is None else float(tps_lambda)) if kind == "tps" else None
        p_alt = None
        if moving_alt is not None:
            p_alt = self.detect(moving_alt, moving_affine, "moving_alt image")[0]
        out = KeyMorphOutput(warped, f2m, m2f, p_fix, p_mov, weights, kind, lam, p_alt)
        return self._refine(out, moving, fixed, moving_affine, fixed_affine, mode, padding_mode)

    def _refine(
        self,
        out: KeyMorphOutput,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        mode: str,
        padding_mode: str,
    ) -> KeyMorphOutput:
        """Polish an affine result with :attr:`refiner` (inference only; rigid and spline results are kept)."""
        if self.refiner is None or self.training or out.transform_type != "affine":
            return out
        b, device = moving.shape[0], moving.device
        a_m, a_f = batch_affine(moving_affine, b, device), batch_affine(fixed_affine, b, device)
        f2m = self.refiner(moving, fixed, out.fixed_to_moving, a_m, a_f)
        out.fixed_to_moving = f2m
        out.moving_to_fixed = torch.linalg.inv(f2m.double()).to(f2m.dtype)
        out.warped = resample(moving, f2m, fixed.shape[2:], a_f, a_m, mode=mode, padding_mode=padding_mode)
        return out

    def _weights(self, m_fix: torch.Tensor, m_mov: torch.Tensor) -> torch.Tensor:
        if self.weighted:
            return power_weights(m_fix, m_mov)
        return ((m_fix > 0) & (m_mov > 0)).to(m_fix.dtype)

    @torch.no_grad()
    def _search(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        kind: str,
        tps_lambda: float | None,
        mode: str,
        padding_mode: str,
    ) -> KeyMorphOutput:
        """Registration with orientation search (see ``orientation_search``), item by item."""
        _check_content(fixed, "fixed image")
        _check_content(moving, "moving image")
        b, device = moving.shape[0], moving.device
        a_m = batch_affine(moving_affine, b, device)
        a_f = batch_affine(fixed_affine, b, device)
        p_fix, m_fix = self.detect(fixed, a_f, "fixed image")
        lam = (self.tps_lambda if tps_lambda is None else float(tps_lambda)) if kind == "tps" else None
        results: list[KeyMorphOutput] = []
        for i in range(b):
            best: tuple[float, KeyMorphOutput] | None = None
            for perm, signs in cube_rotations():
                rotated, vox_map = rotate_volume(moving[i : i + 1], perm, signs)
                a_rot = a_m[i : i + 1] @ torch.linalg.inv(vox_map)
                p_mov, m_mov = self.detect(rotated, a_rot, "moving image")
                weights = self._weights(m_fix[i : i + 1], m_mov)
                try:
                    f2m, m2f = self.fit(p_fix[i : i + 1], p_mov, weights, kind, tps_lambda)
                except DegenerateKeypointsError:
                    continue  # this view found too few keypoints; others may not
                warped = resample(
                    moving[i : i + 1], f2m, fixed.shape[2:], a_f[i : i + 1], a_m[i : i + 1], mode, padding_mode
                )
                score = float(self.search_similarity(warped.float(), fixed[i : i + 1].float()))
                if best is None or score < best[0]:
                    out = KeyMorphOutput(warped, f2m, m2f, p_fix[i : i + 1], p_mov, weights, kind, lam)
                    best = (score, out)
            if best is None:
                raise DegenerateKeypointsError(f"batch item {i}: no orientation of the moving image gave a valid fit.")
            results.append(best[1])
        if len(results) == 1:
            return results[0]

        def cat(values: list) -> torch.Tensor | ThinPlateSpline:
            return ThinPlateSpline.cat(values) if isinstance(values[0], ThinPlateSpline) else torch.cat(values)

        return KeyMorphOutput(
            torch.cat([r.warped for r in results]),
            cat([r.fixed_to_moving for r in results]),
            cat([r.moving_to_fixed for r in results]),
            torch.cat([r.keypoints_fixed for r in results]),
            torch.cat([r.keypoints_moving for r in results]),
            torch.cat([r.weights for r in results]),
            kind,
            lam,
        )
