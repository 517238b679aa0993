"""KeyMorph, the paper's model: keypoint detection, closed-form fit and warping, in world coordinates.

Inference-time strategies (the orientation search, refinement, the quality verdict) are not part of the model: they
live in :class:`~custom_nets.inferers.KeyMorphInferer`, which calls the model's :meth:`KeyMorph.detect`,
:meth:`KeyMorph.fit` and :meth:`KeyMorph.keypoint_weights`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fits import ThinPlateSpline, fit_transform
from .geometry import as_tensor, batch_affine, heatmap_to_voxel, resample, voxel_to_world
from .keypoints import CenterOfMass, power_weights

__all__ = [
    "KeyMorph",
    "KeyMorphOutput",
    "TRANSFORM_TYPES",
    "amp_supported",
    "check_content",
    "check_pair",
    "check_transform_type",
]

TRANSFORM_TYPES = ("rigid", "affine", "tps")
AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}  # the detector's autocast type per device type


def check_transform_type(transform_type: str) -> str:
    """``transform_type`` if it is one of :data:`TRANSFORM_TYPES`, else ``ValueError`` naming what came."""
    if transform_type not in TRANSFORM_TYPES:
        raise ValueError(f"expected transform_type in {TRANSFORM_TYPES}, got {transform_type!r}.")
    return transform_type


def amp_supported(device: torch.device | str) -> bool:
    """Whether the detector can run under autocast on ``device`` with a gain: CUDA (float16), or a CPU whose oneDNN
    runs bfloat16 convolutions natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported``; on other CPUs bfloat16 is
    emulated and slower than float32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or differently built torch: stay in float32
        return False


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
        quality: one record per batch item saying how sure the result is (similarity after registration, keypoint
            agreement, the orientation search's candidates, a ``verdict`` ``ok`` / ``suspect`` with its ``reasons``;
            see :mod:`custom_nets.quality`), filled in by :class:`~custom_nets.inferers.KeyMorphInferer`; ``None``
            from the model alone.
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
    quality: list[dict[str, Any]] | None = None


def check_content(image: torch.Tensor, name: str) -> None:
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
    ``fixed`` it returns a :class:`KeyMorphOutput`. The orientation search, refinement and the quality verdict are
    inference strategies around the model: :class:`~custom_nets.inferers.KeyMorphInferer`.

    Args:
        detector: a module mapping ``(B, C, *S)`` images to ``(B, K, *S')`` heatmaps, e.g.
            :class:`~custom_nets.detectors.ConvNetDetector`.
        transform_type: default transform: ``"rigid"``, ``"affine"`` or ``"tps"``.
        tps_lambda: default thin-plate-spline smoothing (``>= 0``).
        weighted: use KeyMorph's heatmap-power keypoint weights; if False, every non-empty keypoint weighs 1.
        com_eps: heatmap mass at or below which a keypoint counts as absent (see :class:`CenterOfMass`).
        amp: at inference (eval mode), run the detector under ``torch.autocast`` (float16 on CUDA, bfloat16 on the
            CPU; see :func:`amp_supported`). The heatmaps return to float32 before the centre of mass, and the fits
            stay in float64, so keypoints move by a small fraction of a voxel; with the orientation search the
            detector is most of the inference time. Training precision is the trainer's (``amp`` in train.json).
    """

    def __init__(
        self,
        detector: nn.Module,
        transform_type: str = "affine",
        tps_lambda: float = 0.0,
        weighted: bool = True,
        com_eps: float = 1e-6,
        amp: bool = False,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.transform_type = check_transform_type(transform_type)
        self.tps_lambda = float(tps_lambda)
        self.weighted = bool(weighted)
        self.com = CenterOfMass(eps=com_eps)
        self.amp = bool(amp)

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
        check_content(image, name)
        kind = image.device.type
        if self.amp and not self.training and kind in AMP_DTYPES and not torch.jit.is_tracing():
            with torch.autocast(kind, dtype=AMP_DTYPES[kind]):
                heat = self.detector(image)
            heat = heat.float()
        else:
            heat = self.detector(image)
        points, mass = self.com(heat)
        vox = heatmap_to_voxel(points, heat.shape[2:], image.shape[2:])
        a = batch_affine(affine, image.shape[0], image.device)
        return voxel_to_world(vox, a), mass

    def keypoint_weights(self, mass_fixed: torch.Tensor, mass_moving: torch.Tensor) -> torch.Tensor:
        """Fit weights ``(B, K)`` from the heatmap masses ``(B, K)`` of both images: KeyMorph's power weights
        (``weighted``), else 1 for every keypoint found in both images and 0 for the others."""
        if self.weighted:
            return power_weights(mass_fixed, mass_moving)
        return ((mass_fixed > 0) & (mass_moving > 0)).to(mass_fixed.dtype)

    def spline_lambda(self, transform_type: str, tps_lambda: float | None = None) -> float | None:
        """The smoothing a ``tps`` fit uses (``tps_lambda``, else the default); ``None`` for rigid and affine."""
        if transform_type != "tps":
            return None
        return self.tps_lambda if tps_lambda is None else float(tps_lambda)

    def fit(
        self,
        keypoints_fixed: torch.Tensor,
        keypoints_moving: torch.Tensor,
        weights: torch.Tensor,
        transform_type: str | None = None,
        tps_lambda: float | None = None,
    ) -> tuple[torch.Tensor | ThinPlateSpline, torch.Tensor | ThinPlateSpline]:
        """Fit ``(fixed_to_moving, moving_to_fixed)`` to world keypoints ``(B, K, 3)`` with weights ``(B, K)``."""
        kind = check_transform_type(transform_type or self.transform_type)
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
        check_pair(moving, fixed)
        moving_affine = getattr(moving, "affine", None) if moving_affine is None else moving_affine
        fixed_affine = getattr(fixed, "affine", None) if fixed_affine is None else fixed_affine
        moving, fixed = as_tensor(moving), as_tensor(fixed)
        kind = check_transform_type(transform_type or self.transform_type)
        if moving.shape[1:] == fixed.shape[1:]:  # one detector pass for both images
            check_content(fixed, "fixed image")
            check_content(moving, "moving image")
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
        weights = self.keypoint_weights(m_fix, m_mov)
        f2m, m2f = self.fit(p_fix, p_mov, weights, kind, tps_lambda)
        warped = resample(
            moving, f2m, fixed.shape[2:], fixed_affine, moving_affine, mode=mode, padding_mode=padding_mode
        )
        p_alt = None
        if moving_alt is not None:
            p_alt = self.detect(moving_alt, moving_affine, "moving_alt image")[0]
        lam = self.spline_lambda(kind, tps_lambda)
        return KeyMorphOutput(warped, f2m, m2f, p_fix, p_mov, weights, kind, lam, p_alt)


def check_pair(moving: torch.Tensor, fixed: torch.Tensor) -> None:
    """Raise ``ValueError`` with both shapes unless ``moving`` and ``fixed`` are ``(B, C, I, J, K)`` with one ``B``."""
    if moving.ndim != 5 or fixed.ndim != 5 or moving.shape[0] != fixed.shape[0]:
        raise ValueError(
            "expected moving and fixed images of shape (B, C, I, J, K) with the same B, got "
            f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
        )
