"""KeyMorph: keypoint detection, closed-form fit and warping, in world coordinates."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fits import DegenerateKeypointsError, ThinPlateSpline, fit_transform
from .geometry import (
    apply_affine,
    apply_transform,
    as_tensor,
    batch_affine,
    heatmap_to_voxel,
    resample,
    sample_at_voxels,
    voxel_to_world,
    world_to_voxel,
)
from .keypoints import CenterOfMass, power_weights
from .quality import QualityThresholds, assess_registration, thresholds_dict, verdict
from .search import cube_rotations, rotate_volume

__all__ = ["KeyMorph", "KeyMorphOutput", "TRANSFORM_TYPES", "amp_supported", "keypoint_residual_mm"]

TRANSFORM_TYPES = ("rigid", "affine", "tps")
AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}  # the detector's autocast type per device type
SEARCH_RANKS = ("residual", "similarity")


def keypoint_residual_mm(
    keypoints_fixed: torch.Tensor, keypoints_moving: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted RMS residual ``(B,)`` (mm) of the weighted least-squares affine fit of ``keypoints_fixed`` onto
    ``keypoints_moving`` (both ``(B, K, 3)`` world mm; ``weights`` ``(B, K)``): how far the two keypoint sets are from
    corresponding through an affine map. Raises :class:`DegenerateKeypointsError` like the fit."""
    a = fit_transform("affine", keypoints_fixed, keypoints_moving, weights).to(torch.float64)
    r2 = (apply_affine(a, keypoints_fixed.to(torch.float64)) - keypoints_moving.to(torch.float64)).square().sum(-1)
    w = weights.to(torch.float64)
    return ((w * r2).sum(-1) / w.sum(-1).clamp(min=1e-12)).sqrt()


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
        quality: at inference (eval mode, ``assess_quality``), one record per batch item saying how sure the result
            is: similarity after registration, keypoint agreement, the orientation search's candidates, and a
            ``verdict`` (``ok`` / ``suspect``) with its ``reasons`` (see :mod:`custom_nets.quality`).
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


@dataclass
class _Candidate:
    """A view of the orientation search: its keypoint-fit residual (mm), moving keypoints ``(1, K, 3)`` and weights
    ``(1, K)``, and its index in :func:`~custom_nets.search.cube_rotations`."""

    residual: float
    keypoints_moving: torch.Tensor
    weights: torch.Tensor
    view: int


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
            orientations of its voxel grid and keep the best view (``search_rank``; see :mod:`custom_nets.search`):
            a detector accurate within about 45 degrees then covers any rotation, for 24 detector passes instead of
            one. Not part of a TorchScript trace (the chosen view depends on the data, so a trace would fix the view
            of its example input): a traced model registers without the search, as with ``orientation_search=False``.
        search_similarity: the loss that ranks the candidates with ``search_rank="similarity"`` (lower is better);
            default MONAI's ``GlobalMutualInformationLoss`` (any contrast).
        search_samples: fixed-foreground voxels the candidates are ranked on (``search_rank="similarity"``).
        search_batch: views of the moving image per detector pass during the search.
        refiner: optional module polishing affine results at inference (eval mode), called as
            ``refiner(moving, fixed, fixed_to_moving, moving_affine, fixed_affine)``, e.g.
            :class:`~custom_nets.refine.AffineRefiner`; the keypoints stay those of the detector.
        search_rank: how the orientation search picks its view. ``"residual"`` (default): the smallest weighted RMS
            residual of an affine fit to the keypoints (:func:`keypoint_residual_mm`): in the right view the two
            keypoint sets correspond and an affine maps one onto the other; in a wrong view the detector's points are
            not consistent. It needs no intensities, so it does not depend on the contrasts. ``"similarity"``: the
            best :attr:`search_similarity` after warping (measured to pick a wrong view more often between some
            contrast pairs, e.g. T2 and PD at 4 mm).
        amp: at inference (eval mode), run the detector under ``torch.autocast`` (float16 on CUDA, bfloat16 on the
            CPU; see :func:`amp_supported`). The heatmaps return to float32 before the centre of mass, and the fits
            stay in float64, so keypoints move by a small fraction of a voxel; with the orientation search the
            detector is most of the inference time. Training precision is the trainer's (``amp`` in train.json).
        search_candidates: with the orientation search and a :attr:`refiner`, the views with the smallest residuals
            (up to this many) are each refined on the first ``candidate_levels`` levels of the refiner, and the one
            whose mutual information is best is finished on the other levels: the residual alone picked a wrong view
            on some real pairs, similarity alone on others. A candidate whose keypoint fit starts within
            ``quality_thresholds.disagreement_mm`` of an earlier one's is the same start and is skipped. Where a
            candidate that ends elsewhere scores almost as well, the result's quality says so (``views.ambiguous``).
            ``1``: the residual's choice only.
        candidate_levels: refiner levels (coarse first) each candidate runs before the comparison.
        assess_quality: at inference, add a quality record with a verdict to every result (:attr:`KeyMorphOutput.
            quality`).
        quality_thresholds: the verdict's limits (:class:`~custom_nets.quality.QualityThresholds` or a mapping of
            some of its fields); default: the calibrated ones.
        inverse_consistency: at inference, also register every pair the other way round (its own orientation search
            and refinement) and report the mean discrepancy over the fixed foreground (``inverse_consistency_mm``);
            about doubles the time.
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
        search_samples: int = 20000,
        search_batch: int = 8,
        amp: bool = False,
        search_rank: str = "residual",
        search_candidates: int = 3,
        candidate_levels: int = 1,
        assess_quality: bool = True,
        quality_thresholds: QualityThresholds | Mapping[str, Any] | None = None,
        inverse_consistency: bool = False,
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
        self.search_samples, self.search_batch = int(search_samples), max(1, int(search_batch))
        self.refiner = refiner
        self.amp = bool(amp)
        if search_rank not in SEARCH_RANKS:
            raise ValueError(f"expected search_rank in {SEARCH_RANKS}, got {search_rank!r}.")
        self.search_rank = search_rank
        if int(search_candidates) < 1:
            raise ValueError(f"expected search_candidates >= 1, got {search_candidates!r}.")
        self.search_candidates, self.candidate_levels = int(search_candidates), max(1, int(candidate_levels))
        self.assess_quality, self.inverse_consistency = bool(assess_quality), bool(inverse_consistency)
        if not isinstance(quality_thresholds, QualityThresholds):
            quality_thresholds = QualityThresholds.from_mapping(quality_thresholds)
        self.quality_thresholds = quality_thresholds

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
        refine_moving: torch.Tensor | None = None,
        refine_fixed: torch.Tensor | None = None,
        refine_moving_affine: torch.Tensor | None = None,
        refine_fixed_affine: torch.Tensor | None = None,
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
            refine_moving, refine_fixed: optional finer images of the same pair ``(B, 1, ...)`` (any grids, e.g. 2 mm
                voxels where the detector sees 4 mm) for the :attr:`refiner` to polish on; default: ``moving`` and
                ``fixed``. ``refine_moving_affine`` / ``refine_fixed_affine``: their voxel-to-world affines
                (default: their ``MetaTensor`` affines).

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
        refine = None
        if refine_moving is not None and refine_fixed is not None:
            refine = (
                refine_moving,
                refine_fixed,
                getattr(refine_moving, "affine", None) if refine_moving_affine is None else refine_moving_affine,
                getattr(refine_fixed, "affine", None) if refine_fixed_affine is None else refine_fixed_affine,
            )
        search = self.orientation_search and not self.training and moving_alt is None
        if search and torch.jit.is_tracing():  # a data-dependent choice of view cannot be traced
            warnings.warn(
                "KeyMorph: the orientation search is not part of a TorchScript trace; the traced model registers "
                "without it (as orientation_search=False).",
                stacklevel=2,
            )
            search = False
        if search:
            out, candidates = self._search(
                moving, fixed, moving_affine, fixed_affine, kind, tps_lambda, mode, padding_mode
            )
            out, views = self._refine(
                out, moving, fixed, moving_affine, fixed_affine, mode, padding_mode, refine, candidates
            )
            return self._assess(out, moving, fixed, moving_affine, fixed_affine, refine, views, tps_lambda)
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
        out, views = self._refine(out, moving, fixed, moving_affine, fixed_affine, mode, padding_mode, refine)
        return self._assess(out, moving, fixed, moving_affine, fixed_affine, refine, views, tps_lambda)

    def _refine(
        self,
        out: KeyMorphOutput,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        mode: str,
        padding_mode: str,
        refine: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
        candidates: list[list[_Candidate]] | None = None,
    ) -> tuple[KeyMorphOutput, list[dict[str, Any] | None]]:
        """Polish an affine result with :attr:`refiner` (inference only; rigid and spline results are kept), on the
        ``refine`` images ``(moving, fixed, moving_affine, fixed_affine)`` if given, else on the network inputs.

        With the orientation search's ``candidates`` (per item, best residual first), each candidate is refined on
        the coarse levels and the best mutual information is finished on the finest level (see
        ``search_candidates``). Returns the output and, per item, what the search decided (``None`` without a
        search): the views checked, the one chosen, and whether the choice was ambiguous.
        """
        b, device = moving.shape[0], moving.device
        views: list[dict[str, Any] | None] = [None] * b
        if candidates is not None:
            views = [_views_record(c, [c[0].view]) for c in candidates]
        if self.refiner is None or self.training or out.transform_type != "affine":
            return out, views
        if torch.jit.is_tracing() or torch.jit.is_scripting():  # an optimisation loop is not part of an export
            return out, views
        a_m, a_f = batch_affine(moving_affine, b, device), batch_affine(fixed_affine, b, device)
        r_m, r_f, r_am, r_af = _refine_images(moving, fixed, moving_affine, fixed_affine, refine)
        polish = getattr(self.refiner, "polish", None)
        if candidates is None or polish is None or len(getattr(self.refiner, "factors", ())) <= self.candidate_levels:
            f2m = self.refiner(r_m, r_f, out.fixed_to_moving, r_am, r_af)
        else:
            rows = []
            for i in range(b):
                item = (r_m[i : i + 1], r_f[i : i + 1])
                f2m_i, chosen, record = self._check_candidates(
                    polish, candidates[i], out.keypoints_fixed[i : i + 1], *item, r_am[i : i + 1], r_af[i : i + 1]
                )
                rows.append(f2m_i)
                views[i] = record
                if chosen is not candidates[i][0]:
                    out.keypoints_moving[i : i + 1] = chosen.keypoints_moving
                    out.weights[i : i + 1] = chosen.weights
            f2m = torch.cat(rows).to(out.fixed_to_moving.dtype)
        out.fixed_to_moving = f2m
        out.moving_to_fixed = torch.linalg.inv(f2m.double()).to(f2m.dtype)
        out.warped = resample(moving, f2m, fixed.shape[2:], a_f, a_m, mode=mode, padding_mode=padding_mode)
        return out, views

    def _check_candidates(
        self,
        polish: Any,
        candidates: list[_Candidate],
        keypoints_fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor,
        fixed_affine: torch.Tensor,
    ) -> tuple[torch.Tensor, _Candidate, dict[str, Any]]:
        """Refine each candidate view of one item on the coarse levels, keep the best score, finish it on the other
        levels. Returns the refined ``(1, 4, 4)`` matrix, the chosen candidate and the search record."""
        t = self.quality_thresholds
        sample = _foreground_points(fixed, fixed_affine)
        coarse: list[tuple[float, torch.Tensor, _Candidate]] = []
        starts: list[torch.Tensor] = []
        for cand in candidates:
            start, _ = self.fit(keypoints_fixed, cand.keypoints_moving, cand.weights, "affine")
            moved = apply_affine(start.double(), sample)
            if any((moved - other).norm(dim=-1).mean() < t.disagreement_mm for other in starts):
                continue  # the same start as a better-ranked view: nothing new to check
            starts.append(moved)
            polished, score = polish(
                moving, fixed, start, moving_affine, fixed_affine, levels=slice(0, self.candidate_levels)
            )
            coarse.append((float(score[0]), polished, cand))
        order = sorted(range(len(coarse)), key=lambda k: coarse[k][0])
        best_score, best, chosen = coarse[order[0]]
        refined, _ = polish(moving, fixed, best, moving_affine, fixed_affine, levels=slice(self.candidate_levels, None))
        record = _views_record(candidates, [c.view for _, _, c in coarse], chosen.view)
        record["scores"] = [round(score, 5) for score, _, _ in coarse]
        start, _ = self.fit(keypoints_fixed, chosen.keypoints_moving, chosen.weights, "affine")
        moved = (apply_affine(refined.double(), sample) - apply_affine(start.double(), sample)).norm(dim=-1).mean()
        record["refinement_mm"] = float(moved)  # how far refinement moved the keypoint fit (mean, fixed foreground)
        if len(order) > 1:
            for k in order[1:]:  # the best-scoring candidate that ended at another solution
                score, other, cand = coarse[k]
                distance = float((apply_affine(other, sample) - apply_affine(best, sample)).norm(dim=-1).mean())
                if distance > t.disagreement_mm:
                    margin = (score - best_score) / max(abs(best_score), 1e-12)
                    record.update(runner_up=cand.view, distance_mm=distance, margin=margin)
                    record["ambiguous"] = bool(margin < t.ambiguity_margin)
                    break
        return refined, chosen, record

    def _assess(
        self,
        out: KeyMorphOutput,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        refine: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
        views: list[dict[str, Any] | None],
        tps_lambda: float | None,
    ) -> KeyMorphOutput:
        """Attach the quality records and verdicts (see ``assess_quality``) to ``out``, at inference only."""
        if not self.assess_quality or self.training or torch.jit.is_tracing() or torch.jit.is_scripting():
            return out
        b = moving.shape[0]
        r_m, r_f, r_am, r_af = _refine_images(moving, fixed, moving_affine, fixed_affine, refine)
        try:
            residual = keypoint_residual_mm(out.keypoints_fixed, out.keypoints_moving, out.weights)
        except DegenerateKeypointsError:
            residual = torch.full((b,), float("nan"), dtype=torch.float64)
        records = assess_registration(r_m, r_f, out.fixed_to_moving, r_am, r_af, residual, out.weights)
        if self.inverse_consistency:
            backward = self._backward(moving, fixed, moving_affine, fixed_affine, refine, out, tps_lambda)
            for i, record in enumerate(records):
                sample = _foreground_points(r_f[i : i + 1], r_af[i : i + 1])
                f2m = out.fixed_to_moving
                item = f2m[i : i + 1] if isinstance(f2m, torch.Tensor) else f2m.select(i)
                back = backward[i : i + 1] if isinstance(backward, torch.Tensor) else backward.select(i)
                there_and_back = apply_transform(back, apply_transform(item, sample).to(torch.float64))
                record["inverse_consistency_mm"] = float((there_and_back.double() - sample).norm(dim=-1).mean())
        for record, view in zip(records, views):
            if view is not None:
                record["views"] = view
            record["verdict"], record["reasons"] = verdict(record, self.quality_thresholds)
            record["thresholds"] = thresholds_dict(self.quality_thresholds)
        out.quality = records
        return out

    def _backward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        refine: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
        out: KeyMorphOutput,
        tps_lambda: float | None,
    ) -> torch.Tensor | ThinPlateSpline:
        """The independent registration of the pair the other way round (fixed as moving): its ``fixed_to_moving``,
        which maps points of the moving image to points of the fixed image."""
        kwargs: dict[str, Any] = {}
        if refine is not None:
            kwargs = dict(
                refine_moving=refine[1], refine_fixed=refine[0], refine_moving_affine=refine[3],
                refine_fixed_affine=refine[2],
            )  # fmt: skip
        saved = self.assess_quality, self.inverse_consistency
        self.assess_quality = self.inverse_consistency = False
        try:
            back = self.forward(fixed, moving, fixed_affine, moving_affine, out.transform_type, tps_lambda, **kwargs)
        finally:
            self.assess_quality, self.inverse_consistency = saved
        return back.fixed_to_moving

    def _weights(self, m_fix: torch.Tensor, m_mov: torch.Tensor) -> torch.Tensor:
        if self.weighted:
            return power_weights(m_fix, m_mov)
        return ((m_fix > 0) & (m_mov > 0)).to(m_fix.dtype)

    def _search_sample(self, fixed: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points ``(1, N, 3)`` (float64) of up to :attr:`search_samples` voxels of the fixed foreground of
        ``fixed`` ``(1, C, ...)`` (a draw seeded for reproducibility) and the fixed values there ``(1, 1, N, 1, 1)``."""
        image = fixed[0, 0].float()
        idx = torch.nonzero(image > image.amin())
        if idx.shape[0] == 0:
            idx = torch.nonzero(torch.ones_like(image, dtype=torch.bool))
        if idx.shape[0] > self.search_samples:
            gen = torch.Generator(device="cpu").manual_seed(0)
            idx = idx[torch.randperm(idx.shape[0], generator=gen)[: self.search_samples].to(idx.device)]
        values = image[idx[:, 0], idx[:, 1], idx[:, 2]].reshape(1, 1, -1, 1, 1)
        return voxel_to_world(idx.to(torch.float64)[None], affine.to(torch.float64)), values

    def _similarity_score(
        self,
        f2m: torch.Tensor | ThinPlateSpline,
        world: torch.Tensor,
        values: torch.Tensor,
        moving: torch.Tensor,
        moving_affine: torch.Tensor,
    ) -> float:
        """:attr:`search_similarity` between the fixed ``values`` at ``world`` (see :meth:`_search_sample`) and
        ``moving`` ``(1, C, ...)`` sampled through ``f2m`` (lower is better)."""
        sampled = sample_at_voxels(moving.float(), world_to_voxel(apply_transform(f2m, world), moving_affine))
        return float(self.search_similarity(sampled, values))

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
    ) -> tuple[KeyMorphOutput, list[list[_Candidate]]]:
        """Registration with orientation search (see ``orientation_search``), item by item.

        The views of the moving image go through the detector :attr:`search_batch` at a time. The views are ranked
        by :attr:`search_rank`: the residual of an affine fit to the keypoints (:func:`keypoint_residual_mm`), or
        :attr:`search_similarity` between the fixed image and the moving image sampled through each view's fit on
        :attr:`search_samples` voxels of the fixed foreground (a fixed random draw). Only the best view is fitted
        with ``kind`` and warped. Also returns, per item, the best :attr:`search_candidates` views (best first).
        """
        _check_content(fixed, "fixed image")
        _check_content(moving, "moving image")
        b, device = moving.shape[0], moving.device
        a_m = batch_affine(moving_affine, b, device)
        a_f = batch_affine(fixed_affine, b, device)
        p_fix, m_fix = self.detect(fixed, a_f, "fixed image")
        lam = (self.tps_lambda if tps_lambda is None else float(tps_lambda)) if kind == "tps" else None
        results: list[KeyMorphOutput] = []
        candidates: list[list[_Candidate]] = []
        for i in range(b):
            views = [rotate_volume(moving[i : i + 1], perm, signs) for perm, signs in cube_rotations()]
            detected: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(views)
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for v, (rotated, _) in enumerate(views):
                by_shape.setdefault(tuple(rotated.shape), []).append(v)
            for group in by_shape.values():
                for c in range(0, len(group), self.search_batch):
                    chunk = group[c : c + self.search_batch]
                    images = torch.cat([views[v][0] for v in chunk])
                    affines = torch.cat([a_m[i : i + 1] @ torch.linalg.inv(views[v][1]) for v in chunk])
                    points, mass = self.detect(images, affines, "moving image")
                    for k, v in enumerate(chunk):
                        detected[v] = (points[k : k + 1], mass[k : k + 1])
            if self.search_rank == "similarity":
                world, values = self._search_sample(fixed[i : i + 1], a_f[i : i + 1])
            ranked: list[_Candidate] = []
            for view, (p_mov, m_mov) in enumerate(detected):  # type: ignore[misc]
                weights = self._weights(m_fix[i : i + 1], m_mov)
                try:
                    if self.search_rank == "residual":
                        score = float(keypoint_residual_mm(p_fix[i : i + 1], p_mov, weights)[0])
                    else:
                        f2m, _ = self.fit(p_fix[i : i + 1], p_mov, weights, kind, tps_lambda)
                        score = self._similarity_score(f2m, world, values, moving[i : i + 1], a_m[i : i + 1])
                except DegenerateKeypointsError:
                    continue  # this view found too few keypoints; others may not
                ranked.append(_Candidate(score, p_mov, weights, view))
            if not ranked:
                n_fix = int((m_fix[i] > 0).sum())
                n_mov = max(int((m > 0).sum()) for _, m in detected)  # type: ignore[misc]
                raise DegenerateKeypointsError(
                    f"batch item {i}: no orientation of the moving image gave a valid {kind} fit; keypoints found: "
                    f"{n_fix} of {m_fix.shape[1]} in the fixed image, at most {n_mov} in a view of the moving image "
                    "(too few, or all in a plane)."
                )
            ranked.sort(key=lambda c: c.residual)
            candidates.append(ranked[: self.search_candidates])
            p_mov, weights = ranked[0].keypoints_moving, ranked[0].weights
            f2m, m2f = self.fit(p_fix[i : i + 1], p_mov, weights, kind, tps_lambda)
            warped = resample(
                moving[i : i + 1], f2m, fixed.shape[2:], a_f[i : i + 1], a_m[i : i + 1], mode, padding_mode
            )
            results.append(KeyMorphOutput(warped, f2m, m2f, p_fix[i : i + 1], p_mov, weights, kind, lam))
        if len(results) == 1:
            return results[0], candidates

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
        ), candidates


def _refine_images(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    moving_affine: torch.Tensor | None,
    fixed_affine: torch.Tensor | None,
    refine: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images refinement and the quality measures work on: the finer ``refine`` images when given, else the
    network's; as float32 tensors with ``(B, 4, 4)`` affines ``(moving, fixed, moving_affine, fixed_affine)``."""
    b, device = moving.shape[0], moving.device
    r_m, r_f, r_am, r_af = (moving, fixed, moving_affine, fixed_affine) if refine is None else refine
    return (
        as_tensor(r_m).float(),
        as_tensor(r_f).float(),
        batch_affine(r_am, b, device),
        batch_affine(r_af, b, device),
    )


def _views_record(candidates: list[_Candidate], checked: list[int], chosen: int | None = None) -> dict[str, Any]:
    """What the orientation search decided for one item: the views checked (indices into
    :func:`~custom_nets.search.cube_rotations`), their keypoint residuals (mm), the view chosen and its rank by
    residual."""
    chosen = candidates[0].view if chosen is None else chosen
    return {
        "checked": checked,
        "residuals_mm": [round(c.residual, 4) for c in candidates if c.view in checked],
        "chosen": chosen,
        "residual_rank": 1 + next(k for k, c in enumerate(candidates) if c.view == chosen),
        "ambiguous": False,
    }


def _foreground_points(image: torch.Tensor, affine: torch.Tensor, count: int = 20000) -> torch.Tensor:
    """World points ``(1, N, 3)`` (float64) of up to ``count`` voxels of the foreground (``> 0``) of ``image``
    ``(1, C, ...)`` with voxel-to-world ``affine`` ``(1, 4, 4)``, evenly strided (deterministic)."""
    idx = torch.nonzero(image[0, 0] > 0)
    if idx.shape[0] == 0:
        idx = torch.nonzero(torch.ones_like(image[0, 0], dtype=torch.bool))
    idx = idx[:: max(1, idx.shape[0] // count)]
    return voxel_to_world(idx.to(torch.float64)[None], affine.to(torch.float64))
