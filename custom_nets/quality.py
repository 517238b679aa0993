"""How sure a registration is: similarity after registration, keypoint agreement, and a verdict.

Every registration the bundle returns carries a quality record (:func:`assess_registration`), computed on the images
the registration was refined on (or the network's images without refinement), over the fixed image's foreground (the
brain, for skull-stripped or brain-masked input):

* ``nmi``: normalised mutual information ``(H(F) + H(M)) / H(F, M)`` (Studholme) of the fixed image and the warped
  moving image, in ``[1, 2]`` (1: independent, 2: one determines the other); any contrast.
* ``lncc``: mean local squared normalised cross-correlation (MONAI's ``LocalNormalizedCrossCorrelationLoss``, 5-voxel
  windows), in ``[0, 1]``: local structure agreement, insensitive to the sign of the contrast.
* ``foreground_overlap``: Dice of the two foregrounds after registration.
* ``keypoint_residual_mm``: weighted RMS residual of the affine fit to the keypoints (how well the two keypoint sets
  correspond); ``keypoints_used``: effective number of keypoints ``(sum w)^2 / sum w^2``.
* ``views``: with the orientation search, the candidate views that were checked, whether a candidate that ended
  at another solution scored almost as well (``ambiguous``), and how far refinement moved the keypoint fit
  (``refinement_mm``; 0 when it rejected every update).
* ``inverse_consistency_mm`` (optional): the mean distance over the fixed foreground between a point and its image
  through the forward registration composed with an independent backward registration.
* ``mask_agreement`` (where the user gave a brain mask and the brain extractor is at hand): Dice of the given mask
  with the extractor's, the lower of the two sides (:func:`with_mask_agreement`); a mask of the wrong place steers
  the similarity to the wrong anatomy while the similarity measures, computed within it, may look fine.

:func:`verdict` turns them into ``ok`` or ``suspect`` with the reasons, against :class:`QualityThresholds` calibrated on
held-out pairs (figures in the model card). A ``suspect`` registration is not necessarily wrong, and an ``ok`` one is
not guaranteed right; the calibration says how often each happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from .geometry import PointTransform, resample

__all__ = [
    "QualityThresholds",
    "assess_registration",
    "effective_keypoints",
    "foreground_dice",
    "local_ncc",
    "normalized_mutual_information",
    "verdict",
    "with_mask_agreement",
]


@dataclass(frozen=True)
class QualityThresholds:
    """Limits beyond which a registration is ``suspect`` (see :func:`verdict`); calibrated on held-out pairs.

    The similarity limits come from ``benchmarks/calibrate_quality.py`` (40 validation pairs: synthetic same /
    cross-contrast, inter-subject, MNI remapped; 0-180 degrees; 2 mm; 520 transforms of known error): they flag every
    transform more than 10 mm off (212 of 212, wrong views included), 78 % of those 5-10 mm off, 23 % at 3-5 mm,
    3 % at 2-3 mm, and none of the 111 exact-truth transforms below 2 mm (inter-subject: 10 %, whose truth is itself
    only good to ~3 mm). A first choice (``min_lncc 0.27``, overlap 0.80) flagged 23 of 26 good pairs of the stress
    benchmark (independent noise, bias, background): local NCC is lower there, and background noise makes the
    foreground overlap meaningless, so the overlap is reported but not judged (``min_foreground_overlap 0``).

    Attributes:
        min_nmi: lowest normalised mutual information of an accepted result.
        min_lncc: lowest mean local squared NCC.
        min_foreground_overlap: lowest Dice of the two foregrounds after registration.
        max_residual_mm: largest keypoint-fit residual (mm).
        min_keypoints: fewest effective keypoints.
        max_inverse_consistency_mm: largest forward / backward discrepancy (mm), when measured.
        ambiguity_margin: two candidate views that end more than ``disagreement_mm`` apart are ambiguous when their
            scores (negative mutual information) differ by less than this fraction.
        disagreement_mm: mean distance over the fixed foreground beyond which two candidate results differ.
        min_refinement_mm: a refinement that moved the keypoint fit by less than this (mean, mm) rejected its
            every update: the result is the keypoint affine, a few mm off on average.
        joint_nmi, joint_lncc: a result whose NMI is below ``joint_nmi`` *and* local NCC below ``joint_lncc`` is
            suspect although each is within its own limit: weak on both measures. Correct results are weak on one
            at most (benchmarks/calibrate_quality.py, 120 transforms below 2 mm: none has NMI < 1.06 with local NCC
            < 0.258; the stress benchmark's noisy pairs have local NCC 0.19-0.28 with NMI >= 1.24), while a raw head
            registered 92 mm off (a wrong view) had NMI 1.0328 and local NCC 0.175 (model card, Stress benchmark).
        min_mask_agreement: lowest Dice of a brain mask the user gave with the brain extractor's mask of the same
            image (``mask_agreement``, the lower of the two sides; measured only where a mask is given and the
            extractor is at hand). Calibrated by ``benchmarks/bench_brainmask.py`` on 30 held-out synthetic heads
            (table in the model card): right masks (lowest 0.76) and masks 3 mm too generous stay above it, 1 of 30
            masks 2 mm too tight falls below; masks moved 40 mm (30 of 30) and masks of another pose of the head
            (27 of 30) fall below, masks moved 20 mm mostly do not (2 of 30): it catches grossly wrong masks only.
    """

    min_nmi: float = 1.0325
    min_lncc: float = 0.12
    min_foreground_overlap: float = 0.0
    max_residual_mm: float = 12.0
    min_keypoints: float = 8.0
    max_inverse_consistency_mm: float = 2.0
    ambiguity_margin: float = 0.05
    disagreement_mm: float = 5.0
    min_refinement_mm: float = 1e-3
    min_mask_agreement: float = 0.70
    joint_nmi: float = 1.06
    joint_lncc: float = 0.22

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> QualityThresholds:
        """Thresholds from a (config) mapping; unknown keys are refused by name, missing ones keep the defaults."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown quality threshold(s) {unknown}; expected some of {sorted(known)}.")
        return cls(**{k: float(v) for k, v in values.items()})


def normalized_mutual_information(
    fixed_values: torch.Tensor, moving_values: torch.Tensor, bins: int = 32
) -> torch.Tensor:
    """Studholme's normalised mutual information ``(H(F) + H(M)) / H(F, M)`` of paired samples.

    Args:
        fixed_values, moving_values: ``(B, N)`` intensities (each scaled to [0, 1]; values outside are clipped).
        bins: histogram bins per image.

    Returns:
        ``(B,)`` float64 in ``[1, 2]`` (1 when the joint histogram is the product of the marginals; 2 when each
        intensity determines the other). An item whose histogram holds one bin only gives 1.
    """
    if fixed_values.shape != moving_values.shape or fixed_values.ndim != 2:
        raise ValueError(
            f"expected two (B, N) samples of the same shape, got {tuple(fixed_values.shape)} and "
            f"{tuple(moving_values.shape)}."
        )
    out = []
    for f, m in zip(fixed_values.double(), moving_values.double()):
        fi = (f.clamp(0, 1) * (bins - 1)).round().long()
        mi = (m.clamp(0, 1) * (bins - 1)).round().long()
        joint = torch.bincount(fi * bins + mi, minlength=bins * bins).double().reshape(bins, bins)
        p = joint / joint.sum().clamp(min=1)

        def entropy(q: torch.Tensor) -> torch.Tensor:
            q = q[q > 0]
            return -(q * q.log()).sum()

        h_joint = entropy(p)
        if h_joint <= 0:
            out.append(torch.tensor(1.0, dtype=torch.float64))
            continue
        out.append((entropy(p.sum(1)) + entropy(p.sum(0))) / h_joint)
    return torch.stack(out)


def local_ncc(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """Mean local squared normalised cross-correlation of ``warped`` and ``fixed`` ``(B, 1, I, J, K)`` over ``mask``
    ``(B, 1, I, J, K)`` (bool or > 0): ``(B,)`` in ``[0, 1]`` (MONAI ``LocalNormalizedCrossCorrelationLoss``)."""
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size, reduction="none")
    ncc = -lncc(warped.float(), fixed.float())  # (B, 1, I, J, K) local squared NCC
    weight = (mask > 0).to(ncc.dtype)
    return ((ncc.clamp(0, 1) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)).double()


def foreground_dice(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Dice ``(B,)`` of the foregrounds (``> 0``) of ``warped`` and ``fixed`` ``(B, 1, I, J, K)`` on one grid."""
    a, b = (warped > 0).flatten(1), (fixed > 0).flatten(1)
    inter = (a & b).sum(1).double()
    return 2 * inter / (a.sum(1) + b.sum(1)).double().clamp(min=1)


def effective_keypoints(weights: torch.Tensor) -> torch.Tensor:
    """Effective number of keypoints ``(sum w)^2 / sum w^2`` of weights ``(B, K)``: ``(B,)`` (K for equal weights, 1
    when one keypoint carries all the weight, 0 when none has any)."""
    w = weights.detach().double().clamp(min=0)
    return w.sum(1).square() / w.square().sum(1).clamp(min=1e-300)


def assess_registration(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fixed_to_moving: PointTransform,
    moving_affine: torch.Tensor,
    fixed_affine: torch.Tensor,
    keypoint_residual_mm: torch.Tensor,
    weights: torch.Tensor,
    bins: int = 32,
) -> list[dict[str, Any]]:
    """Similarity and keypoint measures of a registration, one record per batch item (see the module docstring).

    Args:
        moving, fixed: ``(B, 1, ...)`` images scaled to [0, 1] with background 0 (the preprocessed images).
        fixed_to_moving: ``(B, 4, 4)`` world matrices (or a spline).
        moving_affine, fixed_affine: ``(B, 4, 4)`` voxel-to-world affines of ``moving`` / ``fixed``.
        keypoint_residual_mm: ``(B,)`` keypoint-fit residuals.
        weights: ``(B, K)`` keypoint weights of the fit.
        bins: histogram bins of the NMI.

    Returns:
        ``[{"nmi", "lncc", "foreground_overlap", "keypoint_residual_mm", "keypoints_used"}, ...]`` (floats).
    """
    with torch.no_grad():
        warped = resample(moving.float(), fixed_to_moving, fixed.shape[2:], fixed_affine, moving_affine)
        mask = fixed > 0
        nmi = torch.stack(
            [
                normalized_mutual_information(fixed[i][mask[i]][None], warped[i][mask[i]][None], bins)[0]
                for i in range(fixed.shape[0])
            ]
        )
        lncc = local_ncc(warped, fixed, mask)
        overlap = foreground_dice(warped, fixed)
        used = effective_keypoints(weights)
    return [
        {
            "nmi": float(nmi[i]),
            "lncc": float(lncc[i]),
            "foreground_overlap": float(overlap[i]),
            "keypoint_residual_mm": float(keypoint_residual_mm[i]),
            "keypoints_used": float(used[i]),
        }
        for i in range(fixed.shape[0])
    ]


def verdict(quality: Mapping[str, Any], thresholds: QualityThresholds | None = None) -> tuple[str, list[str]]:
    """``("ok", [])`` or ``("suspect", [reasons])`` for a quality record (see :func:`assess_registration`); a measure
    that is missing or ``None`` is not checked, a non-finite one is a reason."""
    t = thresholds or QualityThresholds()
    reasons: list[str] = []

    def check(key: str, limit: float, low: bool, what: str) -> None:
        value = quality.get(key)
        if value is None:
            return
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            reasons.append(f"{key} is not finite")
        elif (value < limit) if low else (value > limit):
            sign = "<" if low else ">"
            reasons.append(f"{what}: {key} {value:.3g} {sign} {limit:.3g}")

    check("nmi", t.min_nmi, True, "low image similarity after registration")
    check("lncc", t.min_lncc, True, "little local structure agreement")
    nmi, lncc = quality.get("nmi"), quality.get("lncc")
    if not reasons and nmi is not None and lncc is not None and nmi < t.joint_nmi and lncc < t.joint_lncc:
        reasons.append(
            f"weak image similarity on both measures: nmi {float(nmi):.3g} < {t.joint_nmi:.3g} and lncc "
            f"{float(lncc):.3g} < {t.joint_lncc:.3g} (each within its own limit; correct results are weak on one at "
            "most)"
        )
    check("foreground_overlap", t.min_foreground_overlap, True, "the foregrounds do not overlap well")
    check("keypoint_residual_mm", t.max_residual_mm, False, "the keypoints do not correspond")
    check("keypoints_used", t.min_keypoints, True, "too few keypoints carry the fit")
    check("inverse_consistency_mm", t.max_inverse_consistency_mm, False, "forward and backward registrations disagree")
    check("mask_agreement", t.min_mask_agreement, True, "a given brain mask disagrees with the brain extractor's")
    views = quality.get("views") or {}
    if views.get("refinement_mm") is not None and float(views["refinement_mm"]) < t.min_refinement_mm:
        reasons.append(
            "refinement kept the keypoint fit unchanged (it found no better alignment), so the result is only as "
            "precise as the keypoints (a few mm)"
        )
    if views.get("ambiguous"):
        reasons.append(
            "candidate views disagree: view {runner_up} ends {distance_mm:.1f} mm from the chosen one with a score "
            "within {margin:.1%}".format(**views)
        )
    return ("suspect" if reasons else "ok"), reasons


def with_mask_agreement(quality: Mapping[str, Any], agreements: Sequence[float | None]) -> dict[str, Any]:
    """``quality`` (a record with its verdict and ``thresholds``) with ``mask_agreement``, the lowest finite value of
    ``agreements`` (Dice of each user-given brain mask with the extractor's; ``None`` / ``NaN`` where not measured),
    and its verdict judged again against the same thresholds. Unchanged (a copy) when nothing was measured."""
    record = dict(quality)
    values = [float(a) for a in agreements if a is not None and math.isfinite(float(a))]
    if not values:
        return record
    record["mask_agreement"] = min(values)
    thresholds = QualityThresholds.from_mapping(record.get("thresholds"))
    record["verdict"], record["reasons"] = verdict(record, thresholds)
    return record


def thresholds_dict(thresholds: QualityThresholds) -> dict[str, float]:
    """The thresholds as a plain dict (written next to the verdict, so a result says what it was judged against)."""
    return asdict(thresholds)
