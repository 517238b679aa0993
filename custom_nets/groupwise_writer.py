"""The files of a groupwise registration (see :meth:`custom_nets.groupwise.GroupwiseRegistration.run`).

Every file is written atomically (:func:`~custom_nets.fileio.atomic_write`): a run killed at any moment leaves each
file complete or absent. World coordinates are RAS mm (:mod:`custom_nets.geometry`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cohort_run import all_gather, distributed_rank
from .data.datasets import failure_message
from .data.demo import save_nifti
from .figures import save_template_png
from .fileio import write_csv, write_itk_affine, write_json
from .geometry import resample_to_image
from .volumes import load_volume, output_stem, read_volume

__all__ = ["GroupwiseWriter"]

logger = logging.getLogger(__name__)

#: groupwise.csv columns.
COLUMNS = (
    "image", "stem", "view", "keypoint_residual_mm", "keypoints_used", "nmi", "lncc", "foreground_overlap", "verdict",
    "reasons",
)  # fmt: skip
#: Aligned scans shown in template.png besides the template.
PREVIEWS = 3


class GroupwiseWriter:
    """Write each scan's result as it comes, and the template, the CSV and the failures at the end.

    Args:
        output_dir: the output folder (created).
        png: write ``template.png``.
        write_aligned: write each scan resampled into template space at the template's grid
            (``<stem>_in_template.nii.gz``, the scan's own intensities).
    """

    def __init__(self, output_dir: str | Path, png: bool = True, write_aligned: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.png, self.write_aligned = bool(png), bool(write_aligned)
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.previews: list[tuple[str, np.ndarray]] = []
        self.votes: dict[int, np.ndarray] = {}  # label value -> scans voting for it, per template voxel
        self._stems: dict[str, None] = {}  # in the cohort's order

    def stem(self, path: str) -> str:
        """The output name of a scan: its file name without the image extension, ``_2``, ``_3``... if taken."""
        base = output_stem(path)
        stem, n = base, 1
        while stem in self._stems:
            n += 1
            stem = f"{base}_{n}"
        self._stems[stem] = None
        return stem

    def fail(self, path: str, stage: str, err: BaseException | str) -> None:
        """Record a scan that cannot be used (it is left out of the template); ``err``: the error or its message."""
        message = err if isinstance(err, str) else failure_message(err)
        logger.warning("groupwise: %s left out (%s): %s", path, stage, message)
        self.failures.append({"image": str(path), "stage": stage, "error": message})

    def finish_failures(self) -> Path | None:
        """Write ``failures.json`` (rank 0 of a distributed run: every rank records every failure alike)."""
        if distributed_rank()[0] != 0:
            return None
        return write_json(self.output_dir / "failures.json", self.failures)

    def _gather(self) -> None:
        """In a distributed run, every rank's rows, label votes and previews together (each rank wrote its own
        scans), rows in the cohort's order."""
        if distributed_rank()[1] == 1:
            return
        parts = all_gather((self.rows, self.votes, self.previews))
        order = {stem: n for n, stem in enumerate(self._stems)}
        self.rows = sorted((row for rows, _, _ in parts for row in rows), key=lambda row: order[row["stem"]])
        self.previews = [p for _, _, previews in parts for p in previews][:PREVIEWS]
        votes: dict[int, np.ndarray] = {}
        for _, part, _ in parts:
            for value, count in part.items():
                votes[value] = votes.get(value, 0) + count
        self.votes = votes

    def scan(
        self, path: str, stem: str, template_to_scan: torch.Tensor, keypoints: torch.Tensor, weights: torch.Tensor,
        view: int, transform_type: str, quality: dict[str, Any], warped: torch.Tensor, shape: tuple[int, ...],
        affine: torch.Tensor, label: str | None = None,
    ) -> None:  # fmt: skip
        """Write one scan's ``<stem>_to_template.json`` / ``.tfm`` (and aligned image), keep its CSV row and add its
        label map's vote (``label``: its path) to the template label.

        ``template_to_scan`` ``(4, 4)``; ``keypoints`` ``(K, 3)`` world mm of the scan; ``weights`` ``(K,)``;
        ``warped`` ``(1, 1, *shape)``: its finer image in template space (for the PNG); ``affine``: the template
        grid's ``(4, 4)``."""
        a = template_to_scan.to(torch.float64).cpu()
        record = {
            "image": str(path),
            "template_to_scan_ras": a.numpy(),
            "scan_to_template_ras": torch.linalg.inv(a).numpy(),
            "transform_type": transform_type,
            "view": int(view),
            "keypoints_ras": keypoints.cpu().numpy(),
            "weights": weights.cpu().numpy(),
            "quality": quality,
        }
        write_json(self.output_dir / f"{stem}_to_template.json", record)
        write_itk_affine(self.output_dir / f"{stem}_to_template.tfm", a.numpy())
        if self.write_aligned:
            img = load_volume(str(path))
            data = resample_to_image(read_volume(img, str(path)), img.affine, shape, affine.numpy(), a[None])
            save_nifti(data, affine.numpy(), self.output_dir / f"{stem}_in_template.nii.gz")
        if label is not None:
            self._vote(label, a, shape, affine)
        row = {"image": str(path), "stem": stem, "view": int(view), **quality}
        row["reasons"] = "; ".join(quality.get("reasons") or [])
        self.rows.append(row)
        if len(self.previews) < PREVIEWS:
            self.previews.append((stem, warped[0, 0].float().cpu().numpy()))

    def _vote(self, label: str, template_to_scan: torch.Tensor, shape: tuple[int, ...], affine: torch.Tensor) -> None:
        """Resample a label map into template space (nearest) and count one vote per voxel for its value."""
        img = load_volume(label)
        data = resample_to_image(read_volume(img, label), img.affine, shape, affine.numpy(), template_to_scan[None],
                                 mode="nearest")  # fmt: skip
        values = np.rint(data).astype(np.int64)
        for value in np.unique(values):
            self.votes.setdefault(int(value), np.zeros(shape, np.int32))[values == value] += 1

    def template_label(self) -> np.ndarray | None:
        """The majority vote of the labels in template space (ties: the smaller value), or ``None`` without labels."""
        if not self.votes:
            return None
        values = sorted(self.votes)
        counts = np.stack([self.votes[v] for v in values])
        return np.asarray(values, dtype=np.int16)[counts.argmax(0)]

    def finish(
        self, template: torch.Tensor, affine: torch.Tensor, keypoints: torch.Tensor, mass: torch.Tensor,
        cohort_size: int, transform_type: str, gauge: str,
    ) -> dict[str, Any]:  # fmt: skip
        """Write the template files, ``groupwise.csv`` and ``failures.json`` (rank 0, with every rank's scans);
        return the run's summary."""
        self._gather()
        suspect = sum(r.get("verdict") == "suspect" for r in self.rows)
        summary = {"scans": cohort_size, "registered": len(self.rows), "failed": len(self.failures),
                   "suspect": suspect, "output_dir": str(self.output_dir)}  # fmt: skip
        if distributed_rank()[0] != 0:
            return summary
        volume = template[0, 0].float().cpu().numpy()
        save_nifti(volume, affine.numpy(), self.output_dir / "template.nii.gz")
        labels = self.template_label()
        if labels is not None:
            save_nifti(labels, affine.numpy(), self.output_dir / "template_label.nii.gz", np.int16)
        write_json(
            self.output_dir / "template_keypoints.json",
            {"keypoints_ras": keypoints.cpu().numpy(), "mass": mass.cpu().numpy(), "transform_type": transform_type,
             "scans": len(self.rows), "template_space": gauge},
        )  # fmt: skip
        write_csv(self.output_dir / "groupwise.csv", self.rows, COLUMNS)
        self.finish_failures()
        if self.png:
            save_template_png(self.output_dir / "template.png", volume, affine.numpy(), keypoints.cpu().numpy(),
                              self.previews)  # fmt: skip
        logger.info("groupwise: %s", summary)
        return summary
