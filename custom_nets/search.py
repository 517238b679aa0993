"""Orientation search: detect the moving keypoints in each of the 24 axis-aligned orientations of its voxel grid and
keep the view whose keypoints correspond best to the fixed image's (smallest affine-fit residual), or, as an option,
the one whose fit makes the images most similar.

Rotating the voxel array by a signed axis permutation while changing its affine accordingly leaves the image's world
content unchanged, so every candidate is a valid registration of the same pair; only the detector's view differs.
A detector that is accurate within about 45 degrees of upright then covers any rotation. This is an inference-time
strategy (:class:`OrientationSearch`, run by :class:`~custom_nets.inferers.KeyMorphInferer`), not a change of the
model: it calls the model's ``detect``, ``keypoint_weights`` and ``fit``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from .fits import DegenerateKeypointsError, ThinPlateSpline, keypoint_residual_mm
from .geometry import apply_transform, batch_affine, resample, sample_at_voxels, voxel_to_world, world_to_voxel
from .keymorph import KeyMorphOutput, check_content

if TYPE_CHECKING:
    from .keymorph import KeyMorph

__all__ = ["SEARCH_RANKS", "Candidate", "OrientationSearch", "cube_rotations", "rotate_volume"]

SEARCH_RANKS = ("residual", "similarity")


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


@dataclass
class Candidate:
    """A view of the orientation search: its score (the keypoint-fit residual in mm, or the similarity loss with
    ``rank="similarity"``; lower is better), moving keypoints ``(1, K, 3)`` world mm and weights ``(1, K)``, and its
    index in :func:`cube_rotations`."""

    residual: float
    keypoints_moving: torch.Tensor
    weights: torch.Tensor
    view: int


class OrientationSearch:
    """Register with the moving image seen in each of the 24 views of :func:`cube_rotations`, item by item.

    The views go through the model's detector ``batch`` at a time and are ranked by ``rank``: ``"residual"``
    (default), the weighted RMS residual of an affine fit to the keypoints (:func:`~custom_nets.fits.
    keypoint_residual_mm`): in the right view the two keypoint sets correspond and an affine maps one onto the other;
    in a wrong view the detector's points are not consistent. It needs no intensities, so it does not depend on the
    contrasts. ``"similarity"``: ``similarity`` (lower is better) between the fixed image and the moving image sampled
    through each view's fit, on ``samples`` voxels of the fixed foreground (a fixed random draw); measured to pick a
    wrong view more often between some contrast pairs (e.g. T2 and PD at 4 mm).

    Args:
        rank: ``"residual"`` or ``"similarity"``.
        similarity: the loss of ``rank="similarity"``; default MONAI's ``GlobalMutualInformationLoss`` (any contrast).
        samples: fixed-foreground voxels the views are compared on with ``rank="similarity"``.
        batch: views of the moving image per detector pass.
        candidates: how many of the best views to return per item (best first), for a later check.
    """

    def __init__(
        self,
        rank: str = "residual",
        similarity: nn.Module | None = None,
        samples: int = 20000,
        batch: int = 8,
        candidates: int = 3,
    ) -> None:
        if rank not in SEARCH_RANKS:
            raise ValueError(f"expected search_rank in {SEARCH_RANKS}, got {rank!r}.")
        if int(candidates) < 1:
            raise ValueError(f"expected search_candidates >= 1, got {candidates!r}.")
        if similarity is None:
            from monai.losses import GlobalMutualInformationLoss

            similarity = GlobalMutualInformationLoss(num_bins=32)
        self.rank, self.similarity = rank, similarity
        self.samples, self.batch, self.candidates = int(samples), max(1, int(batch)), int(candidates)

    @torch.no_grad()
    def __call__(
        self,
        network: KeyMorph,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor | None,
        fixed_affine: torch.Tensor | None,
        kind: str,
        tps_lambda: float | None = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
    ) -> tuple[KeyMorphOutput, list[list[Candidate]]]:
        """Register ``moving`` ``(B, C, ...)`` to ``fixed`` ``(B, C, ...)`` (voxel-to-world affines ``(4, 4)`` /
        ``(B, 4, 4)``) with ``network``'s detector and fits, keeping each item's best view; only that view is fitted
        with ``kind`` and warped. Returns the output and, per item, the best ``candidates`` views (best first).

        Raises:
            DegenerateKeypointsError: no view of an item's moving image gave a valid fit (the counts are named).
        """
        check_content(fixed, "fixed image")
        check_content(moving, "moving image")
        b, device = moving.shape[0], moving.device
        a_m, a_f = batch_affine(moving_affine, b, device), batch_affine(fixed_affine, b, device)
        p_fix, m_fix = network.detect(fixed, a_f, "fixed image")
        results: list[KeyMorphOutput] = []
        candidates: list[list[Candidate]] = []
        for i in range(b):
            item = (moving[i : i + 1], fixed[i : i + 1], a_m[i : i + 1], a_f[i : i + 1])
            detected = self.detect_views(network, item[0], item[2])
            ranked = self._rank(network, detected, p_fix[i : i + 1], m_fix[i : i + 1], *item, kind, tps_lambda)
            if not ranked:
                n_fix = int((m_fix[i] > 0).sum())
                n_mov = max(int((m > 0).sum()) for _, m in detected)
                raise DegenerateKeypointsError(
                    f"batch item {i}: no orientation of the moving image gave a valid {kind} fit; keypoints found: "
                    f"{n_fix} of {m_fix.shape[1]} in the fixed image, at most {n_mov} in a view of the moving image "
                    "(too few, or all in a plane)."
                )
            candidates.append(ranked[: self.candidates])
            p_mov, weights = ranked[0].keypoints_moving, ranked[0].weights
            f2m, m2f = network.fit(p_fix[i : i + 1], p_mov, weights, kind, tps_lambda)
            warped = resample(
                moving[i : i + 1], f2m, fixed.shape[2:], a_f[i : i + 1], a_m[i : i + 1], mode, padding_mode
            )
            lam = network.spline_lambda(kind, tps_lambda)
            results.append(KeyMorphOutput(warped, f2m, m2f, p_fix[i : i + 1], p_mov, weights, kind, lam))
        return concat_outputs(results), candidates

    def detect_views(
        self, network: KeyMorph, moving: torch.Tensor, moving_affine: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keypoints ``(1, K, 3)`` world mm and masses ``(1, K)`` of one moving image ``(1, C, ...)`` in each view,
        views of one shape batched ``batch`` at a time."""
        views = [rotate_volume(moving, perm, signs) for perm, signs in cube_rotations()]
        detected: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(views)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for v, (rotated, _) in enumerate(views):
            by_shape.setdefault(tuple(rotated.shape), []).append(v)
        for group in by_shape.values():
            for c in range(0, len(group), self.batch):
                chunk = group[c : c + self.batch]
                images = torch.cat([views[v][0] for v in chunk])
                affines = torch.cat([moving_affine @ torch.linalg.inv(views[v][1]) for v in chunk])
                points, mass = network.detect(images, affines, "moving image")
                for k, v in enumerate(chunk):
                    detected[v] = (points[k : k + 1], mass[k : k + 1])
        return detected  # type: ignore[return-value]

    def _rank(
        self,
        network: KeyMorph,
        detected: list[tuple[torch.Tensor, torch.Tensor]],
        p_fix: torch.Tensor,
        m_fix: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_affine: torch.Tensor,
        fixed_affine: torch.Tensor,
        kind: str,
        tps_lambda: float | None,
    ) -> list[Candidate]:
        """The views of one item that give a fit, best first (see ``rank``)."""
        if self.rank == "similarity":
            world, values = self._sample(fixed, fixed_affine)
        ranked: list[Candidate] = []
        for view, (p_mov, m_mov) in enumerate(detected):
            weights = network.keypoint_weights(m_fix, m_mov)
            try:
                if self.rank == "residual":
                    score = float(keypoint_residual_mm(p_fix, p_mov, weights)[0])
                else:
                    f2m, _ = network.fit(p_fix, p_mov, weights, kind, tps_lambda)
                    sampled = sample_at_voxels(
                        moving.float(), world_to_voxel(apply_transform(f2m, world), moving_affine)
                    )
                    score = float(self.similarity(sampled, values))
            except DegenerateKeypointsError:
                continue  # this view found too few keypoints; others may not
            ranked.append(Candidate(score, p_mov, weights, view))
        ranked.sort(key=lambda c: c.residual)
        return ranked

    def _sample(self, fixed: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points ``(1, N, 3)`` (float64) of up to ``samples`` voxels of the fixed foreground of ``fixed``
        ``(1, C, ...)`` (a draw seeded for reproducibility) and the fixed values there ``(1, 1, N, 1, 1)``."""
        image = fixed[0, 0].float()
        idx = torch.nonzero(image > image.amin())
        if idx.shape[0] == 0:
            idx = torch.nonzero(torch.ones_like(image, dtype=torch.bool))
        if idx.shape[0] > self.samples:
            gen = torch.Generator(device="cpu").manual_seed(0)
            idx = idx[torch.randperm(idx.shape[0], generator=gen)[: self.samples].to(idx.device)]
        values = image[idx[:, 0], idx[:, 1], idx[:, 2]].reshape(1, 1, -1, 1, 1)
        return voxel_to_world(idx.to(torch.float64)[None], affine.to(torch.float64)), values


def concat_outputs(results: list[KeyMorphOutput]) -> KeyMorphOutput:
    """One :class:`~custom_nets.keymorph.KeyMorphOutput` from per-item ones (same transform type)."""
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
        results[0].transform_type,
        results[0].tps_lambda,
    )
