"""Groupwise registration: a cohort of scans into one template space, in time linear in the number of scans.

Each scan's keypoints are detected once (in the 24 views of the orientation search when it is on); the template's
keypoints are the weighted mean of the scans' keypoints mapped into template space, and each scan's transform to the
template is a closed-form fit, iterated a few times. Only the keypoints stay in memory (``24 x K x 3`` numbers per
scan); images are read again, one at a time, for the template image and the optional refinement, so memory does not
grow with the cohort beyond the keypoints and one running template sum.

Template space (the gauge): the mean of the scans' ``template_to_scan`` transforms is the identity
(:func:`~custom_nets.group_mean.mean_affine`: geodesic mean rotation, log-Euclidean mean stretch, mean translation
about the template keypoints' centroid), so the template sits at the group's mean pose and favours no scan. With a
``reference`` image it sits in the reference's world instead (e.g. an MNI atlas).

Several processes (``torchrun`` with ``configs/multi_gpu_inference.json`` listed after ``groupwise.json``): scan ``i``
belongs to rank ``i % world_size``. Each rank detects its scans' keypoints, the keypoints are gathered and the
closed-form fits are made once (by every rank alike: cheap and deterministic), each rank refines and resamples its own
scans, the template's running sums are added over the ranks, and rank 0 writes the files of the whole cohort.

Coordinates: world mm (RAS) of each scan's file; ``template_to_scan`` maps a template-space point to the scan's world
point (the pull-back that resamples the scan into template space); ``scan_to_template`` is its inverse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .cohort_run import all_gather, all_reduce_sum, distributed_rank, shard
from .data.cohort import cohort_images, cohort_labels
from .data.datasets import failure_message
from .geometry import apply_affine, as_tensor, batch_affine, resample, voxel_to_world
from .groupwise_fit import KeypointGroupFit, ScanKeypoints, UnusableScans, inverse
from .keymorph import KeyMorph, check_transform_type
from .quality import QualityThresholds, assess_registration, thresholds_dict, verdict
from .search import OrientationSearch

__all__ = ["GroupwiseRegistration", "KeypointGroupFit", "ScanKeypoints"]

logger = logging.getLogger(__name__)
_F64 = torch.float64


def _corners(shape: Any, affine: torch.Tensor) -> torch.Tensor:
    """World corners ``(8, 3)`` of the voxel-centre box of a grid."""
    n = [int(v) - 1 for v in shape[-3:]]
    idx = torch.tensor([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], dtype=_F64)
    return voxel_to_world(idx[None], affine.to(_F64).reshape(1, 4, 4))[0]


class GroupwiseRegistration:
    """Register every scan of a cohort to a template built from the cohort itself (see the module docstring).

    Args:
        network: the bundle's :class:`~custom_nets.keymorph.KeyMorph` (weights loaded).
        preprocessing: the per-image preprocessing: a callable on ``{"image": path}`` giving ``image`` (the network
            input, a ``MetaTensor`` ``(1, I, J, K)``) and ``refine_image`` (the finer image the template is built on).
        images: the scans (see :func:`~custom_nets.data.cohort.cohort_images`).
        labels: optional label maps, one per scan (see :func:`~custom_nets.data.cohort.cohort_labels`): the
            template then gets a label map too (majority vote of the labels in template space).
        output_dir: where the outputs go (see :meth:`run`).
        transform_type: ``"affine"`` or ``"rigid"``.
        iterations: keypoint iterations (template keypoints <- mean of the aligned keypoints, transforms <- fits).
        orientation_search: pick each scan's view among the 24 axis-aligned ones (any head orientation).
        refiner: optional affine refiner (e.g. :class:`~custom_nets.refine.AffineRefiner`) that polishes each scan's
            transform against the keypoint template image; the template is then rebuilt. Affine only.
        template_pixdim: voxel size (mm) of the template image.
        reference: optional image whose world the template is put in (its keypoints, or with a refiner its image,
            fix the template space instead of the group mean).
        write_aligned: also write each scan resampled into template space (its own intensities).
        png: write ``template.png`` (the template with its keypoints and a few aligned scans).
        device: where the network runs.
        quality_thresholds: the limits of each scan's verdict (see :class:`~custom_nets.quality.QualityThresholds`).
        search_batch: views per detector pass.
    """

    def __init__(
        self,
        network: KeyMorph,
        preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        images: Any,
        output_dir: str,
        labels: Any = None,
        transform_type: str = "affine",
        iterations: int = 5,
        orientation_search: bool = True,
        refiner: torch.nn.Module | None = None,
        template_pixdim: float = 2.0,
        reference: str | None = None,
        write_aligned: bool = False,
        png: bool = True,
        device: torch.device | str = "cpu",
        quality_thresholds: QualityThresholds | dict[str, Any] | None = None,
        search_batch: int = 8,
    ) -> None:
        self.kind = check_transform_type(transform_type)
        if self.kind == "tps":
            raise ValueError("groupwise: expected transform_type 'affine' or 'rigid', got 'tps'.")
        self.network, self.preprocessing = network, preprocessing
        self.images = cohort_images(images)
        self.labels = cohort_labels(images, labels, len(self.images))
        self.output_dir = Path(output_dir)
        self.keypoint_fit = KeypointGroupFit(network, self.kind, iterations)
        self.orientation_search, self.refiner = bool(orientation_search), refiner
        self.template_pixdim, self.reference = float(template_pixdim), reference
        self.write_aligned, self.png, self.device = bool(write_aligned), bool(png), torch.device(device)
        if not isinstance(quality_thresholds, QualityThresholds):
            quality_thresholds = QualityThresholds.from_mapping(quality_thresholds)
        self.thresholds = quality_thresholds
        self.search = OrientationSearch(batch=search_batch)

    # ----------------------------------------------------------------------------------------------- images
    def _load(self, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network input ``(1, 1, ...)`` and the finer image ``(1, 1, ...)`` of a scan, with their ``(1, 4, 4)``
        affines, on :attr:`device`."""
        data = self.preprocessing({"image": path})
        out = []
        for key in ("image", "refine_image"):
            img = data[key]
            affine = batch_affine(getattr(img, "affine", None), 1, self.device).to(_F64)
            out += [as_tensor(img)[None].float().to(self.device), affine]
        return out[0], out[1], out[2], out[3]

    def _detect(self, path: str, stem: str) -> ScanKeypoints:
        image, affine, fine, fine_affine = self._load(path)
        with torch.no_grad():
            if self.orientation_search:
                views = self.search.detect_views(self.network, image, affine)
                points = torch.cat([p for p, _ in views]).to(_F64).cpu()
                mass = torch.cat([m for _, m in views]).to(_F64).cpu()
            else:
                p, m = self.network.detect(image, affine, f"image {path}")
                points, mass = p.to(_F64).cpu(), m.to(_F64).cpu()
        return ScanKeypoints(path, stem, points, mass, _corners(fine.shape, fine_affine[0].cpu()))

    # ------------------------------------------------------------------------------------------- template image
    def template_grid(
        self, scans: list[ScanKeypoints], transforms: torch.Tensor
    ) -> tuple[tuple[int, ...], torch.Tensor]:
        """Shape and ``(4, 4)`` RAS affine of the template image: an axis-aligned grid of :attr:`template_pixdim`
        voxels over the mean (over scans) of each scan's foreground box mapped into template space."""
        lows, highs = [], []
        for scan, a in zip(scans, transforms):
            corners = apply_affine(inverse(a)[None], scan.corners[None])[0]
            lows.append(corners.amin(0))
            highs.append(corners.amax(0))
        low, high = torch.stack(lows).mean(0), torch.stack(highs).mean(0)
        s = self.template_pixdim
        shape = tuple(int(v) for v in torch.ceil((high - low) / s).long() + 1)
        affine = torch.eye(4, dtype=_F64)
        affine[:3, :3] *= s
        affine[:3, 3] = low
        return shape, affine

    def _warp(
        self, fine: torch.Tensor, fine_affine: torch.Tensor, transform: torch.Tensor, shape: tuple[int, ...],
        affine: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A scan's finer image resampled into template space ``(1, 1, *shape)`` through ``template_to_scan``
        ``transform`` ``(4, 4)``, and its field-of-view coverage there (1 inside, 0 outside)."""
        a = transform.to(self.device)[None].float()
        grid_affine = affine.to(self.device)[None]
        warped = resample(fine, a, shape, grid_affine, fine_affine)
        cover = resample(torch.ones_like(fine), a, shape, grid_affine, fine_affine)
        return warped, cover

    def build_template(
        self, scans: list[ScanKeypoints], transforms: torch.Tensor, shape: tuple[int, ...], affine: torch.Tensor,
        refine_to: torch.Tensor | None = None, desc: str = "template",
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The template image ``(1, 1, *shape)``: the mean of the scans' intensity-normalised finer images in
        template space, streamed (one running sum). With ``refine_to`` (a template image), each transform is first
        polished against it by :attr:`refiner`. Returns the template and the (refined) transforms ``(N, 4, 4)``."""
        total = torch.zeros((1, 1, *shape), device=self.device)
        count = torch.zeros_like(total)
        out = torch.zeros_like(transforms)  # each rank fills its scans' rows; the others add theirs below
        grid_affine = affine.to(self.device)[None]
        for n in tqdm(self._mine(len(scans)), desc=self._desc(desc), unit="scan"):
            _, _, fine, fine_affine = self._load(scans[n].path)
            out[n] = transforms[n]
            with torch.no_grad():
                if refine_to is not None and self.refiner is not None:
                    start = out[n].to(self.device)[None].float()
                    out[n] = self.refiner(fine, refine_to, start, fine_affine, grid_affine)[0].to(_F64).cpu()
                warped, cover = self._warp(fine, fine_affine, out[n], shape, affine)
            total += warped
            count += cover
        total, count, out = all_reduce_sum(total), all_reduce_sum(count), all_reduce_sum(out)
        return total / count.clamp(min=1e-6) * (count > 0.5), out

    @staticmethod
    def _mine(count: int) -> list[int]:
        """The indices of this rank's share of ``count`` scans (all of them in one process)."""
        return shard(range(count), *distributed_rank())

    @staticmethod
    def _desc(desc: str) -> str:
        rank, world = distributed_rank()
        return desc if world == 1 else f"{desc} [rank {rank}/{world}]"

    def move_space(
        self, g: torch.Tensor, keypoints: torch.Tensor, transforms: torch.Tensor, image: torch.Tensor,
        shape: tuple[int, ...], affine: torch.Tensor, scans: list[ScanKeypoints],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor]:  # fmt: skip
        """Re-express everything in new template coordinates ``x' = g x``: keypoints, ``template_to_scan``
        transforms, and the template image on a grid recomputed around the scans (resampled once)."""
        keypoints, transforms = apply_affine(g[None], keypoints), transforms @ inverse(g)[None]
        new_shape, new_affine = self.template_grid(scans, transforms)
        back = inverse(g).to(self.device)[None].float()  # new template point -> old template point
        image = resample(image, back, new_shape, new_affine.to(self.device)[None], affine.to(self.device)[None])
        return keypoints, transforms, image, new_shape, new_affine

    def _to_reference(
        self, keypoints: torch.Tensor, mass: torch.Tensor, image: torch.Tensor, affine: torch.Tensor
    ) -> torch.Tensor:
        """``template -> reference world`` ``(4, 4)``: the keypoint fit to the reference's best view, polished by
        :attr:`refiner` against the reference image when there is one."""
        ref = self._detect(str(self.reference), "reference")
        self.keypoint_fit.choose_view(ref, keypoints, mass)
        w = self.keypoint_fit.weights(mass, ref.mass[ref.view : ref.view + 1])
        fitted, _ = self.network.fit(keypoints, ref.points[ref.view : ref.view + 1], w, self.kind)
        fitted = fitted.to(_F64)
        if self.refiner is not None and self.kind == "affine":
            _, _, fine, fine_affine = self._load(str(self.reference))
            with torch.no_grad():
                fitted = (
                    self.refiner(fine, image, fitted.to(self.device).float(), fine_affine, affine.to(self.device)[None])
                    .to(_F64)
                    .cpu()
                )
        return fitted[0]

    def run(self) -> dict[str, Any]:
        """Register the cohort and write, in :attr:`output_dir`: per scan ``<stem>_to_template.json`` (4 x 4 RAS
        ``scan_to_template_ras`` / ``template_to_scan_ras``, keypoints, quality), ``<stem>_to_template.tfm`` (ITK:
        template points to scan points, the direction ITK resamples the scan into template space with) and, with
        ``write_aligned``, ``<stem>_in_template.nii.gz``; once ``template.nii.gz`` (and ``template_label.nii.gz``
        where scans have labels), ``template_keypoints.json``,
        ``groupwise.csv`` (one row per scan: fit residual, similarity, verdict), ``failures.json`` (scans that could
        not be used, with the reason) and ``template.png``. Returns a summary.

        Raises:
            RuntimeError: fewer than two scans could be read (the failures are written first)."""
        from .groupwise_writer import GroupwiseWriter

        writer = GroupwiseWriter(self.output_dir, self.png, self.write_aligned)
        stems = [writer.stem(path) for path in self.images]  # every rank names every scan alike
        found: list[tuple[int, ScanKeypoints | str]] = []
        for i in tqdm(self._mine(len(self.images)), desc=self._desc("detect"), unit="scan"):
            try:
                found.append((i, self._detect(self.images[i], stems[i])))
                found[-1][1].label = self.labels[i]
            except Exception as err:  # recorded; the rest of the cohort goes on
                found.append((i, failure_message(err)))
        scans: list[ScanKeypoints] = []
        for i, scan in sorted((item for part in all_gather(found) for item in part), key=lambda item: item[0]):
            if isinstance(scan, str):
                writer.fail(self.images[i], "load", scan)
            else:
                scans.append(scan)
        if len(scans) < 2:
            writer.finish_failures()
            raise RuntimeError(
                f"groupwise: {len(scans)} of {len(self.images)} scans could be read; a template needs at least two "
                f"(see {self.output_dir / 'failures.json'})."
            )
        while True:
            try:
                keypoints, mass, transforms, weights = self.keypoint_fit.fit_keypoints(scans)
                break
            except UnusableScans as err:  # left out with the reason; the others start again
                for n in sorted(err.reasons, reverse=True):
                    writer.fail(scans[n].path, "keypoints", ValueError(err.reasons[n]))
                    del scans[n]
            if len(scans) < 2:
                writer.finish_failures()
                raise RuntimeError(f"groupwise: fewer than two usable scans (see {self.output_dir / 'failures.json'}).")
        shape, affine = self.template_grid(scans, transforms)
        image, transforms = self.build_template(scans, transforms, shape, affine, desc="template")
        if self.refiner is not None and self.kind == "affine":
            image, transforms = self.build_template(scans, transforms, shape, affine, image, desc="refine")
            g = self.keypoint_fit.gauge(
                keypoints, transforms
            )  # refinement moved the transforms: back to the group mean
            keypoints, transforms, image, shape, affine = self.move_space(g, keypoints, transforms, image, shape,
                                                                          affine, scans)  # fmt: skip
        gauge = "group mean"
        if self.reference:
            g = self._to_reference(keypoints, mass, image, affine)
            keypoints, transforms, image, shape, affine = self.move_space(g, keypoints, transforms, image, shape,
                                                                          affine, scans)  # fmt: skip
            gauge = f"reference {self.reference}"
        residuals = self.keypoint_fit.residuals(scans, keypoints, mass)
        grid_affine = affine.to(self.device)[None]
        total, count = torch.zeros_like(image), torch.zeros_like(image)
        for n in tqdm(self._mine(len(scans)), desc=self._desc("write"), unit="scan"):
            scan = scans[n]
            _, _, fine, fine_affine = self._load(scan.path)
            a = transforms[n]
            with torch.no_grad():
                warped, cover = self._warp(fine, fine_affine, a, shape, affine)
                quality = assess_registration(fine, image, a.to(self.device)[None].float(), fine_affine, grid_affine,
                                              residuals[n : n + 1], weights[n : n + 1])[0]  # fmt: skip
            total += warped
            count += cover
            quality["verdict"], quality["reasons"] = verdict(quality, self.thresholds)
            quality["thresholds"] = thresholds_dict(self.thresholds)
            points = scan.points[scan.view]
            record = (scan.path, scan.stem, a, points, weights[n], scan.view, self.kind, quality)
            writer.scan(*record, warped, shape, affine, scan.label)
        total, count = all_reduce_sum(total), all_reduce_sum(count)
        template = total / count.clamp(min=1e-6) * (count > 0.5)
        return writer.finish(template, affine, keypoints[0], mass[0], len(self.images), self.kind, gauge)
