"""How the bundle registers a pair at inference: :class:`KeyMorphInferer`, a MONAI ``Inferer`` around the model.

Following ``moving`` through inference: data -> :class:`~custom_nets.engines.KeyMorphPrepareBatch` -> this inferer
(orientation search, refinement, quality verdict) -> :class:`~custom_nets.keymorph.KeyMorph` (detect, weight, fit,
warp) -> :class:`~custom_nets.writer.RegistrationWriter`. The model stays the paper's model, the one
``verify_net_in_out`` and TorchScript export see; the strategies that depend on the data (which view, how far to
polish, how sure) live here, as MONAI keeps sliding windows and test-time augmentation in inferers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from .fits import DegenerateKeypointsError, ThinPlateSpline, keypoint_residual_mm
from .geometry import apply_affine, apply_transform, as_tensor, batch_affine, resample, voxel_to_world
from .keymorph import KeyMorph, KeyMorphOutput, check_pair, check_transform_type
from .quality import QualityThresholds, assess_registration, thresholds_dict, verdict
from .search import Candidate, OrientationSearch

__all__ = ["KeyMorphInferer"]

#: ``(moving, fixed, moving_affine, fixed_affine)`` of the finer images refinement and the quality measures use.
RefineImages = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
#: The images refinement and the quality measures work on: ``(moving, fixed, moving_affine, fixed_affine)``, batched
#: ``(B, 1, ...)`` / ``(B, 4, 4)``, or, where the batch items' grids differ, per-item lists of ``(1, 1, ...)`` /
#: ``(1, 4, 4)``.
ItemImages = tuple[Any, Any, Any, Any]


class KeyMorphInferer(Inferer):
    """Register pairs with a :class:`~custom_nets.keymorph.KeyMorph` network the way inference should: any head
    orientation, polished, and with a verdict on how sure the result is.

    Called as MONAI engines call an inferer, ``inferer(moving, network, fixed, moving_affine=..., fixed_affine=...,
    [refine_moving=..., refine_fixed=..., refine_moving_affine=..., refine_fixed_affine=...], **network_kwargs)``
    (what :class:`~custom_nets.engines.KeyMorphPrepareBatch` gives); returns a
    :class:`~custom_nets.keymorph.KeyMorphOutput`. With the network in training mode, or with ``moving_alt`` (a
    training input), the network is called as it is, with none of the strategies below. A network wrapped in
    ``DistributedDataParallel`` / ``DataParallel`` (the multi-GPU validation) is run through its ``module``.

    Args:
        orientation_search: detect the moving keypoints in each of the 24 axis-aligned orientations of its voxel
            grid and keep the best view (:class:`~custom_nets.search.OrientationSearch`): a detector accurate within
            about 45 degrees then covers any rotation, for 24 detector passes instead of one.
        search_rank: how the search ranks its views: ``"residual"`` (the keypoint affine fit's residual, default) or
            ``"similarity"`` (``search_similarity`` after warping).
        search_similarity: the loss of ``search_rank="similarity"`` (lower is better); default MONAI's
            ``GlobalMutualInformationLoss``.
        search_samples: fixed-foreground voxels the views are compared on with ``search_rank="similarity"``.
        search_batch: views of the moving image per detector pass.
        refiner: optional module polishing affine results (rigid and spline results are kept), called as
            ``refiner(moving, fixed, fixed_to_moving, moving_affine, fixed_affine)`` on the finer ``refine_*`` images
            when given, e.g. :class:`~custom_nets.refine.AffineRefiner`; the keypoints stay those of the detector.
        search_candidates: with the search and a refiner that has ``polish`` and more than ``candidate_levels``
            levels, the views with the smallest residuals (up to this many) are each refined on the first
            ``candidate_levels`` levels, and the one whose similarity is best is finished on the other levels: the
            residual alone picked a wrong view on some real pairs, similarity alone on others. A candidate whose
            keypoint fit starts within ``quality_thresholds.disagreement_mm`` of an earlier one's is the same start
            and is skipped. Where a candidate that ends elsewhere scores almost as well, the result's quality says so
            (``views.ambiguous``). ``1``: the residual's choice only.
        candidate_levels: refiner levels (coarse first) each candidate runs before the comparison.
        assess_quality: add a quality record with a verdict to every result (:attr:`KeyMorphOutput.quality`).
        quality_thresholds: the verdict's limits (:class:`~custom_nets.quality.QualityThresholds` or a mapping of
            some of its fields); default: the calibrated ones.
        inverse_consistency: also register every pair the other way round (its own search and refinement) and report
            the mean discrepancy over the fixed foreground (``inverse_consistency_mm``); about doubles the time.
    """

    def __init__(
        self,
        orientation_search: bool = True,
        search_rank: str = "residual",
        search_similarity: nn.Module | None = None,
        search_samples: int = 20000,
        search_batch: int = 8,
        refiner: nn.Module | None = None,
        search_candidates: int = 3,
        candidate_levels: int = 1,
        assess_quality: bool = True,
        quality_thresholds: QualityThresholds | Mapping[str, Any] | None = None,
        inverse_consistency: bool = False,
    ) -> None:
        super().__init__()
        self.orientation_search = bool(orientation_search)
        self.search = OrientationSearch(search_rank, search_similarity, search_samples, search_batch, search_candidates)
        self.refiner = refiner
        self.candidate_levels = max(1, int(candidate_levels))
        self.assess_quality, self.inverse_consistency = bool(assess_quality), bool(inverse_consistency)
        if not isinstance(quality_thresholds, QualityThresholds):
            quality_thresholds = QualityThresholds.from_mapping(quality_thresholds)
        self.quality_thresholds = quality_thresholds

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: KeyMorph,
        fixed: torch.Tensor,
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
    ) -> KeyMorphOutput:
        """Register ``inputs`` (the moving images ``(B, C, I, J, K)``) to ``fixed`` ``(B, C, I', J', K')`` with
        ``network``. ``moving_affine`` / ``fixed_affine``: voxel-to-world ``(4, 4)`` / ``(B, 4, 4)`` (default: the
        ``MetaTensor`` affines, else identity). ``refine_moving`` / ``refine_fixed`` ``(B, 1, ...)``: optional finer
        images of the same pair (any grids) for refinement and the quality measures, with their affines (default:
        their ``MetaTensor`` affines); for a batch whose items have different grids, per-item lists of ``(1, 1, ...)``
        images and ``(1, 4, 4)`` affines. The other arguments go to the network (see :meth:`KeyMorph.forward`)."""
        moving = inputs
        if network.training or moving_alt is not None:
            return network(
                moving, fixed, moving_affine, fixed_affine, transform_type, tps_lambda, mode, padding_mode, moving_alt
            )
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module  # the strategies call the model's detect / fit; no gradients to synchronise
        check_pair(moving, fixed)
        moving_affine = getattr(moving, "affine", None) if moving_affine is None else moving_affine
        fixed_affine = getattr(fixed, "affine", None) if fixed_affine is None else fixed_affine
        refine = None
        if refine_moving is not None and refine_fixed is not None:
            refine = (
                refine_moving,
                refine_fixed,
                _affines_of(refine_moving) if refine_moving_affine is None else refine_moving_affine,
                _affines_of(refine_fixed) if refine_fixed_affine is None else refine_fixed_affine,
            )
        moving, fixed = as_tensor(moving), as_tensor(fixed)
        kind = check_transform_type(transform_type or network.transform_type)
        pair = (moving, fixed, moving_affine, fixed_affine)
        out, views = self._register(network, pair, refine, kind, tps_lambda, mode, padding_mode)
        if self.assess_quality:
            self._assess(network, out, pair, refine, views, tps_lambda)
        return out

    def _register(
        self,
        network: KeyMorph,
        pair: RefineImages,
        refine: RefineImages | None,
        kind: str,
        tps_lambda: float | None,
        mode: str,
        padding_mode: str,
    ) -> tuple[KeyMorphOutput, list[dict[str, Any] | None]]:
        """Search (if on), fit, refine: the output and, per item, what the search decided (``None`` without one)."""
        moving, fixed, moving_affine, fixed_affine = pair
        if not self.orientation_search:
            out = network(moving, fixed, moving_affine, fixed_affine, kind, tps_lambda, mode, padding_mode)
            return self._refine(network, out, pair, mode, padding_mode, refine)
        out, candidates = self.search(network, moving, fixed, moving_affine, fixed_affine, kind, tps_lambda, mode,
                                      padding_mode)  # fmt: skip
        return self._refine(network, out, pair, mode, padding_mode, refine, candidates)

    def _refine(
        self,
        network: KeyMorph,
        out: KeyMorphOutput,
        pair: RefineImages,
        mode: str,
        padding_mode: str,
        refine: RefineImages | None = None,
        candidates: list[list[Candidate]] | None = None,
    ) -> tuple[KeyMorphOutput, list[dict[str, Any] | None]]:
        """Polish an affine result with :attr:`refiner` (rigid and spline results are kept), on the ``refine`` images
        if given, else on the network inputs.

        With the orientation search's ``candidates`` (per item, best residual first), each candidate is refined on
        the coarse levels and the best similarity is finished on the finest level (see ``search_candidates``).
        Returns the output and, per item, what the search decided (``None`` without a search): the views checked,
        the one chosen, and whether the choice was ambiguous.
        """
        moving, fixed, moving_affine, fixed_affine = pair
        b, device = moving.shape[0], moving.device
        views: list[dict[str, Any] | None] = [None] * b
        if candidates is not None:
            views = [_views_record(c, [c[0].view]) for c in candidates]
        if self.refiner is None or out.transform_type != "affine":
            return out, views
        a_m, a_f = batch_affine(moving_affine, b, device), batch_affine(fixed_affine, b, device)
        r_m, r_f, r_am, r_af = _refine_images(pair, refine)
        polish = getattr(self.refiner, "polish", None)
        if candidates is None or polish is None or len(getattr(self.refiner, "factors", ())) <= self.candidate_levels:
            if isinstance(r_m, list):  # one grid per item: refine item by item
                f2m = torch.cat(
                    [self.refiner(m, f, out.fixed_to_moving[i : i + 1], am, af) for i, (m, f, am, af) in
                     enumerate(_items((r_m, r_f, r_am, r_af), b))]
                )  # fmt: skip
            else:
                f2m = self.refiner(r_m, r_f, out.fixed_to_moving, r_am, r_af)
        else:
            rows = []
            for i, item in enumerate(_items((r_m, r_f, r_am, r_af), b)):
                f2m_i, chosen, record = self._check_candidates(
                    network, polish, candidates[i], out.keypoints_fixed[i : i + 1], *item
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
        network: KeyMorph,
        polish: Any,
        candidates: list[Candidate],
        keypoints_fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor,
        fixed_affine: torch.Tensor,
    ) -> tuple[torch.Tensor, Candidate, dict[str, Any]]:
        """Refine each candidate view of one item on the coarse levels, keep the best score, finish it on the other
        levels. Returns the refined ``(1, 4, 4)`` matrix, the chosen candidate and the search record."""
        t = self.quality_thresholds
        sample = _foreground_points(fixed, fixed_affine)
        coarse: list[tuple[float, torch.Tensor, Candidate]] = []
        starts: list[torch.Tensor] = []
        for cand in candidates:
            start, _ = network.fit(keypoints_fixed, cand.keypoints_moving, cand.weights, "affine")
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
        start, _ = network.fit(keypoints_fixed, chosen.keypoints_moving, chosen.weights, "affine")
        moved = (apply_affine(refined.double(), sample) - apply_affine(start.double(), sample)).norm(dim=-1).mean()
        record["refinement_mm"] = float(moved)  # how far refinement moved the keypoint fit (mean, fixed foreground)
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
        network: KeyMorph,
        out: KeyMorphOutput,
        pair: RefineImages,
        refine: RefineImages | None,
        views: list[dict[str, Any] | None],
        tps_lambda: float | None,
    ) -> None:
        """Attach the quality records and verdicts to ``out`` (see ``assess_quality``)."""
        b = pair[0].shape[0]
        r_m, r_f, r_am, r_af = _refine_images(pair, refine)
        try:
            residual = keypoint_residual_mm(out.keypoints_fixed, out.keypoints_moving, out.weights)
        except DegenerateKeypointsError:
            residual = torch.full((b,), float("nan"), dtype=torch.float64)
        items = _items((r_m, r_f, r_am, r_af), b)
        if isinstance(r_m, list):  # one grid per item
            records = [
                rec
                for i, (m, f, am, af) in enumerate(items)
                for rec in assess_registration(
                    m, f, _select(out.fixed_to_moving, i), am, af, residual[i : i + 1], out.weights[i : i + 1]
                )
            ]
        else:
            records = assess_registration(r_m, r_f, out.fixed_to_moving, r_am, r_af, residual, out.weights)
        if self.inverse_consistency:
            backward = self._backward(network, pair, refine, out, tps_lambda)
            for i, record in enumerate(records):
                sample = _foreground_points(items[i][1], items[i][3])
                there_and_back = apply_transform(
                    _select(backward, i), apply_transform(_select(out.fixed_to_moving, i), sample).to(torch.float64)
                )
                record["inverse_consistency_mm"] = float((there_and_back.double() - sample).norm(dim=-1).mean())
        for record, view in zip(records, views):
            if view is not None:
                record["views"] = view
            record["verdict"], record["reasons"] = verdict(record, self.quality_thresholds)
            record["thresholds"] = thresholds_dict(self.quality_thresholds)
        out.quality = records

    def _backward(
        self,
        network: KeyMorph,
        pair: RefineImages,
        refine: RefineImages | None,
        out: KeyMorphOutput,
        tps_lambda: float | None,
    ) -> torch.Tensor | ThinPlateSpline:
        """The independent registration of the pair the other way round (fixed as moving, its own search and
        refinement): its ``fixed_to_moving``, which maps points of the moving image to points of the fixed image."""
        moving, fixed, moving_affine, fixed_affine = pair
        swapped = None if refine is None else (refine[1], refine[0], refine[3], refine[2])
        back, _ = self._register(
            network, (fixed, moving, fixed_affine, moving_affine), swapped, out.transform_type, tps_lambda,
            "bilinear", "zeros",
        )  # fmt: skip
        return back.fixed_to_moving


def _select(transform: torch.Tensor | ThinPlateSpline, i: int) -> torch.Tensor | ThinPlateSpline:
    """Batch item ``i`` of a ``(B, 4, 4)`` matrix or a spline, kept as a batch of one."""
    return transform[i : i + 1] if isinstance(transform, torch.Tensor) else transform.select(i)


def _refine_images(pair: RefineImages, refine: ItemImages | None) -> ItemImages:
    """The images refinement and the quality measures work on: the finer ``refine`` images when given, else the
    network's ``pair``; as float32 tensors with ``(B, 4, 4)`` affines ``(moving, fixed, moving_affine,
    fixed_affine)``, or, for ``refine`` images given per item (lists), as lists of ``(1, 1, ...)`` tensors and
    ``(1, 4, 4)`` affines."""
    b, device = pair[0].shape[0], pair[0].device
    r_m, r_f, r_am, r_af = pair if refine is None else refine
    if isinstance(r_m, (list, tuple)):
        if not (len(r_m) == len(r_f) == len(r_am) == len(r_af) == b):
            raise ValueError(
                f"KeyMorphInferer: expected one refinement image and affine per pair ({b}), got "
                f"{[len(x) for x in (r_m, r_f, r_am, r_af)]}."
            )
        return (
            [as_tensor(x).float() for x in r_m],
            [as_tensor(x).float() for x in r_f],
            [batch_affine(a, 1, device) for a in r_am],
            [batch_affine(a, 1, device) for a in r_af],
        )
    return (
        as_tensor(r_m).float(),
        as_tensor(r_f).float(),
        batch_affine(r_am, b, device),
        batch_affine(r_af, b, device),
    )


def _affines_of(images: Any) -> Any:
    """The ``MetaTensor`` affine of a batch of images, or the list of them for per-item images."""
    if isinstance(images, (list, tuple)):
        return [getattr(x, "affine", None) for x in images]
    return getattr(images, "affine", None)


def _items(images: ItemImages, batch: int) -> list[ItemImages]:
    """Each batch item of :func:`_refine_images`'s images as a batch of one."""
    if isinstance(images[0], list):
        return [tuple(x[i] for x in images) for i in range(batch)]
    return [tuple(x[i : i + 1] for x in images) for i in range(batch)]


def _views_record(candidates: list[Candidate], checked: list[int], chosen: int | None = None) -> dict[str, Any]:
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
