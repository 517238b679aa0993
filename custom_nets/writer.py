"""The inference writer of the bundle: every registered pair's matrices, keypoints, quality verdict, resampled images
and PNG at the original images' full resolution, and a record of every pair that could not be registered."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from .cohort_run import PAIR_KEY, CohortRun, failed_row, ok_row, write_results
from .data.datasets import FAILURE_KEY, FAILURES_KEY
from .data.transforms import mask_agreement_key
from .engines import RegistrationFailure
from .figures import save_registration_png
from .fileio import write_itk_affine, write_json
from .geometry import resample_to_image
from .quality import with_mask_agreement
from .volumes import load_volume, output_stem, read_volume, save_like

__all__ = ["RegistrationFailuresError", "RegistrationWriter"]

logger = logging.getLogger(__name__)


class RegistrationFailuresError(RuntimeError):
    """Some pairs of an inference run could not be registered (the others were written); see ``failures.json``."""


class RegistrationWriter:
    """Write every registered pair of an inference run, at the original images' full resolution, and account for
    every pair that could not be registered.

    For each pair, named after the moving image ``<stem>``, in ``output_dir``:

    * ``<stem>_warped.nii.gz``: the moving image resampled onto the fixed image's grid (fixed header);
    * ``<stem>_label_warped.nii.gz``: the moving labels resampled with nearest neighbour (when given);
    * ``<stem>.json``: ``fixed_to_moving_ras`` and ``moving_to_fixed_ras`` (4 x 4, RAS mm), transform type, keypoints
      of both images (RAS mm) and their weights, and ``quality``: how sure the result is, with a ``verdict`` (``ok``
      / ``suspect``) and its ``reasons`` (see :mod:`custom_nets.quality`);
    * ``<stem>.tfm``: ITK transform (LPS) that SimpleITK / ANTs / 3D Slicer apply to the original images;
    * ``<stem>.png``: keypoints over orthogonal slices of both images and the overlay after registration; the title
      gives the verdict;
    * ``<stem>_brainmask.nii.gz`` and ``<stem>_fixed_brainmask.nii.gz``: the brain masks the registration used (the
      brain extractor's or the user's; see :class:`~custom_nets.data.BrainMaskd`), on the moving and the fixed
      image's own grids (when the batch carries them).

    Every file is written atomically, and ``<stem>.json`` last: a pair whose JSON exists is complete. The engine
    output ``pred`` is a :class:`~custom_nets.keymorph.KeyMorphOutput` computed on the preprocessed images; as its
    transforms are in world mm, they apply to the originals exactly.

    Failures are isolated per pair: a pair that could not be loaded (a failure record of
    :class:`~custom_nets.data.FailSafeDataset` in the batch's ``failures``), registered (a
    :class:`~custom_nets.engines.RegistrationFailure` from :class:`~custom_nets.engines.FailSafeInferer`) or written
    (any error while writing, e.g. a non-finite warped image or an unreadable label file) is logged as an error naming
    its files and the problem; outputs under its stem are removed, so no partial or stale result is left that could
    be taken for this run's. The others are written as usual. A registered pair whose verdict is ``suspect`` is logged
    as a warning with the reasons; with ``fail_on_suspect`` it is a failure instead (stage ``quality``, its quality
    record in ``failures.json``, no outputs written). At the end of the run ``results.csv`` (one row per pair:
    ``pair`` (its position in the pair list), ``moving``, ``fixed``, ``status`` ``ok`` / ``failed``, ``stage``,
    ``error``, ``json``, the ``verdict`` and its ``reasons``, and the quality measures) and ``failures.json`` (the
    failed pairs; ``[]`` when none) are written, and, with ``fail_on_error``, a :class:`RegistrationFailuresError` is
    raised if any pair failed, so ``python -m monai.bundle run inference`` exits non-zero after writing every result it
    could.

    With a :class:`~custom_nets.cohort_run.CohortRun` (``run``), the pairs of this process are its share of the list:
    each JSON records what made it (``run``), the pairs the plan found complete (resume) and the clashes it decided
    are rows of ``results.csv`` too, and the rows of every rank are merged, in the list's order, into the one
    ``results.csv`` / ``failures.json`` that rank 0 writes.

    Args:
        output_dir: output folder.
        png: write the PNG.
        device: device used to resample the originals.
        fail_on_error: raise at the end of the run if any pair failed.
        fail_on_suspect: treat a registration whose quality verdict is ``suspect`` as a failure (nothing written).
        run: the plan of a sharded / resumable batch run (see :mod:`custom_nets.cohort_run`).
    """

    def __init__(
        self,
        output_dir: str,
        png: bool = True,
        device: torch.device | str = "cpu",
        fail_on_error: bool = True,
        fail_on_suspect: bool = False,
        run: CohortRun | None = None,
    ) -> None:
        self.output_dir, self.png, self.device = Path(output_dir), bool(png), device
        self.fail_on_error, self.fail_on_suspect = bool(fail_on_error), bool(fail_on_suspect)
        self.run = run
        self.written: list[dict[str, str]] = []
        self.results: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._stems: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def _reset(self, engine: Engine | None = None) -> None:
        self.written, self.results, self.failures, self._stems = [], [], [], set()

    def __call__(self, engine: Engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        pred = out.get("pred") if isinstance(out, Mapping) else None
        if "fixed_image" in batch and "moving_image" in batch:
            fixed_paths = batch["fixed_image"].meta["filename_or_obj"]
            moving_paths = batch["moving_image"].meta["filename_or_obj"]
            labels = batch.get("moving_label")
            masks = {side: batch.get(f"{side}_brainmask") for side in ("moving", "fixed")}
            agreements = [batch.get(mask_agreement_key(f"{side}_image")) for side in ("moving", "fixed")]
            indices = batch.get(PAIR_KEY)
            for b in range(len(fixed_paths)):
                label = labels[b] if isinstance(labels, (list, tuple)) else None
                fixed, moving = str(fixed_paths[b]), str(moving_paths[b])
                index = self._index(_item_value(indices, b))
                item = pred[b] if isinstance(pred, list) else pred
                if isinstance(item, RegistrationFailure):
                    self._fail(moving, fixed, item.stage, item.error, pair=index)
                    continue
                if item is None:
                    self._fail(moving, fixed, "register", "the network returned no result", pair=index)
                    continue
                item_masks = {
                    s: m[b] for s, m in masks.items() if isinstance(m, (torch.Tensor, list, tuple)) and m[b] is not None
                }
                _judge_mask_agreement(item, 0 if isinstance(pred, list) else b, [_item_value(a, b) for a in agreements])
                self._write_isolated(item, 0 if isinstance(pred, list) else b, fixed, moving, label, item_masks, index)
        for record in batch.get(FAILURES_KEY) or []:
            info = record.get(FAILURE_KEY) or {}
            self._fail(
                record.get("moving_image"),
                record.get("fixed_image"),
                str(info.get("stage", "load")),
                str(info.get("error", "unknown error")),
                pair=self._index(record.get(PAIR_KEY)),
            )

    def _index(self, given: Any) -> int:
        """The pair-list position of an item: the one it carries, else the order of the results (one process)."""
        return len(self.results) if given is None else int(given)

    def _write_isolated(
        self,
        pred: Any,
        b: int,
        fixed: str,
        moving: str,
        label: str | None,
        masks: Mapping[str, Any] | None = None,
        pair: int | None = None,
    ) -> None:
        pair = self._index(pair)
        quality = _quality_of(pred, b)
        if quality is not None and quality.get("verdict") == "suspect":
            reasons = "; ".join(quality.get("reasons") or [])
            if self.fail_on_suspect:
                self._fail(
                    moving, fixed, "quality", f"suspect registration (--fail_on_suspect): {reasons}", quality, pair
                )
                return
            logger.warning(
                "pair %d: moving %s, fixed %s registered, but the result is SUSPECT: %s", pair, moving, fixed, reasons
            )
        stem = output_stem(moving)
        if stem in self._stems:
            self._fail(
                moving,
                fixed,
                "write",
                f"another pair of this run already wrote outputs named {stem!r} (same moving file name); refusing to "
                "overwrite them",
                pair=pair,
            )
            return
        try:
            files = self.write_pair(pred, b, fixed, moving, label, masks, pair)
        except Exception as err:  # recorded as this pair's failure; the others go on
            self._fail(moving, fixed, "write", f"{type(err).__name__}: {err}", pair=pair)
            return
        self._stems.add(stem)
        self.written.append(files)
        self.results.append(ok_row(pair, moving, fixed, files["json"], quality))

    def _outputs_of(self, stem: str) -> list[Path]:
        names = (
            f"{stem}_warped.nii.gz", f"{stem}_label_warped.nii.gz", f"{stem}.json", f"{stem}.tfm", f"{stem}.png",
            f"{stem}_brainmask.nii.gz", f"{stem}_fixed_brainmask.nii.gz",
        )  # fmt: skip
        return [self.output_dir / n for n in names]

    def _fail(
        self,
        moving: str | None,
        fixed: str | None,
        stage: str,
        error: str,
        quality: dict[str, Any] | None = None,
        pair: int | None = None,
    ) -> None:
        record = {PAIR_KEY: self._index(pair), "moving": moving, "fixed": fixed, "stage": stage, "error": error}
        if quality is not None:
            record["quality"] = quality
        logger.error("pair %d failed at %s: moving %s, fixed %s: %s", record["pair"], stage, moving, fixed, error)
        if moving and output_stem(str(moving)) not in self._stems:  # never another pair's outputs
            for old in self._outputs_of(output_stem(str(moving))):
                if old.exists():
                    logger.warning("removing %s: its pair failed in this run", old)
                    old.unlink(missing_ok=True)
        self.failures.append(record)
        self.results.append(failed_row(record))

    def finish(self, engine: Engine | None = None) -> None:
        """Write ``results.csv`` and ``failures.json`` (merged over the ranks, on rank 0), log the count, and raise
        if any pair failed (see above)."""
        self.results, self.failures = write_results(self.output_dir, self.results, self.failures, self.run)
        total, failed = len(self.results), len(self.failures)
        suspect = sum(1 for r in self.results if r.get("status") == "ok" and r.get("verdict") == "suspect")
        if suspect:
            logger.warning(
                "%d of %d registered pair(s) are SUSPECT (verdict in results.csv and each pair's JSON); check them "
                "before use", suspect, total - failed,
            )  # fmt: skip
        if not failed:
            logger.info("registered all %d pair(s); results in %s", total, self.output_dir)
            return
        summary = (
            f"{failed} of {total} pair(s) failed and were not written (the other {total - failed} were); see "
            f"{self.output_dir / 'failures.json'}:\n"
            + "\n".join(f"  {f['moving']} -> {f['fixed']} ({f['stage']}): {f['error']}" for f in self.failures)
        )
        logger.error(summary)
        if self.fail_on_error:
            raise RegistrationFailuresError(summary)

    def write_pair(
        self,
        pred: Any,
        b: int,
        fixed_path: str,
        moving_path: str,
        label_path: str | None,
        masks: Mapping[str, Any] | None = None,
        pair: int | None = None,
    ) -> dict:
        """Write the outputs of batch item ``b`` of ``pred`` (``masks``: ``{"moving" / "fixed": (1, I, J, K)
        MetaTensor}`` brain masks on any grid of the same world; ``pair``: its pair-list position, for the ``run``
        record); on any error, the files already written for it are removed and the error re-raised."""
        files: dict[str, str] = {}
        try:
            self._write_pair(pred, b, fixed_path, moving_path, label_path, files, masks or {}, pair)
        except BaseException:
            for path in files.values():
                Path(path).unlink(missing_ok=True)
            raise
        return files

    def _write_mask(self, mask: Any, image_path: str, side: str, moving_path: str, files: dict[str, str]) -> None:
        """Write a brain mask on the grid of the original image ``image_path`` (nearest neighbour through world)."""
        img = load_volume(image_path)
        data = torch.as_tensor(mask).detach().cpu().float().numpy().reshape(mask.shape[-3:])
        on_grid = resample_to_image(
            data,
            np.asarray(torch.as_tensor(mask.affine, dtype=torch.float64).cpu()),
            img.shape[:3],
            np.asarray(img.affine, dtype=np.float64),
            torch.eye(4, dtype=torch.float64)[None],
            mode="nearest",
            device=self.device,
        )
        stem = output_stem(moving_path)
        key = "brainmask" if side == "moving" else "fixed_brainmask"
        files[key] = str(self.output_dir / f"{stem}_{key}.nii.gz")
        save_like(np.rint(on_grid), img, files[key], np.uint8)

    def _write_pair(
        self,
        pred: Any,
        b: int,
        fixed_path: str,
        moving_path: str,
        label_path: str | None,
        files: dict[str, str],
        masks: Mapping[str, Any],
        pair: int | None = None,
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(moving_path)
        fixed_img, moving_img = load_volume(fixed_path), load_volume(moving_path)
        f_aff, m_aff = np.asarray(fixed_img.affine, dtype=np.float64), np.asarray(moving_img.affine, dtype=np.float64)
        f2m = pred.fixed_to_moving
        t_item = f2m[b : b + 1].double() if isinstance(f2m, torch.Tensor) else f2m.select(b).to(self.device)
        moving_data = read_volume(moving_img, moving_path)
        warped = resample_to_image(moving_data, m_aff, fixed_img.shape, f_aff, t_item, device=self.device)
        if not np.isfinite(warped).all():
            raise ValueError(f"{moving_path}: the warped image has NaN / Inf voxels; not writing it.")
        files["warped"] = str(self.output_dir / f"{stem}_warped.nii.gz")
        save_like(warped, fixed_img, files["warped"], np.float32)
        if label_path:
            lab_img = load_volume(label_path)
            lab = resample_to_image(
                read_volume(lab_img, label_path),
                np.asarray(lab_img.affine, dtype=np.float64),
                fixed_img.shape,
                f_aff,
                t_item,
                mode="nearest",
                device=self.device,
            )
            files["label_warped"] = str(self.output_dir / f"{stem}_label_warped.nii.gz")
            save_like(np.rint(lab), fixed_img, files["label_warped"], lab_img.get_data_dtype())
            del lab
        record: dict[str, Any] = {
            "moving": moving_path,
            "fixed": fixed_path,
            "transform_type": pred.transform_type,
            "convention": (
                "RAS+ world coordinates in mm. fixed_to_moving_ras maps a point of the fixed image to the "
                "corresponding point of the moving image (the resampling direction, as ITK); moving_to_fixed_ras is "
                "its inverse, which moves the moving image onto the fixed one."
            ),
            "keypoints_fixed_ras_mm": pred.keypoints_fixed[b].detach().cpu().double().tolist(),
            "keypoints_moving_ras_mm": pred.keypoints_moving[b].detach().cpu().double().tolist(),
            "keypoint_weights": pred.weights[b].detach().cpu().double().tolist(),
        }
        quality = _quality_of(pred, b)
        if quality is not None:
            record["quality"] = quality
        if isinstance(f2m, torch.Tensor):
            m = f2m[b].detach().cpu().double()
            record["fixed_to_moving_ras"] = m.tolist()
            record["moving_to_fixed_ras"] = torch.linalg.inv(m).tolist()
            files["itk_transform"] = str(self.output_dir / f"{stem}.tfm")
            write_itk_affine(files["itk_transform"], m.numpy())
        else:
            record["tps_lambda"] = pred.tps_lambda
            record["fixed_to_moving_affine_part_ras"] = f2m.affine_part()[b].detach().cpu().double().tolist()
        if self.png:
            files["png"] = str(self.output_dir / f"{stem}.png")
            save_registration_png(
                files["png"],
                read_volume(fixed_img, fixed_path),
                moving_data,
                warped,
                f_aff,
                m_aff,
                np.asarray(record["keypoints_fixed_ras_mm"]),
                np.asarray(record["keypoints_moving_ras_mm"]),
                np.asarray(record["keypoint_weights"]),
                title=f"{Path(moving_path).name} -> {Path(fixed_path).name}" + _verdict_title(quality),
            )
        for side, mask in masks.items():
            self._write_mask(mask, fixed_path if side == "fixed" else moving_path, side, moving_path, files)
        record["outputs"] = dict(files)
        if self.run is not None and pair is not None:
            record["run"] = self.run.stamp(pair)  # what made it: a rerun skips it only if that is unchanged
        files["json"] = str(self.output_dir / f"{stem}.json")
        write_json(files["json"], record)


def _item_value(values: Any, b: int) -> float | None:
    """Item ``b`` of a collated per-item number (a tensor or a list), ``None`` when absent."""
    if values is None:
        return None
    value = values[b] if isinstance(values, (list, tuple)) or (torch.is_tensor(values) and values.ndim) else values
    return None if value is None else float(value)


def _judge_mask_agreement(pred: Any, b: int, agreements: list[float | None]) -> None:
    """Put the user masks' agreement with the brain extractor (see
    :func:`~custom_nets.quality.with_mask_agreement`) into item ``b``'s quality record, judged again."""
    records = getattr(pred, "quality", None)
    if records:
        records[b] = with_mask_agreement(records[b], agreements)


def _quality_of(pred: Any, b: int) -> dict[str, Any] | None:
    """The quality record of batch item ``b`` of a :class:`~custom_nets.keymorph.KeyMorphOutput` (``None`` if the
    network gave none, e.g. a traced model)."""
    records = getattr(pred, "quality", None)
    return dict(records[b]) if records else None


def _verdict_title(quality: Mapping[str, Any] | None) -> str:
    """The verdict for a PNG title: ``"  [ok]"``, or ``"  [SUSPECT: first reason]"``."""
    if quality is None:
        return ""
    if quality.get("verdict") == "suspect":
        reasons = quality.get("reasons") or ["?"]
        return f"  [SUSPECT: {reasons[0]}{' ...' if len(reasons) > 1 else ''}]"
    return f"  [{quality.get('verdict', '?')}]"
