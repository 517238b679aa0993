"""The evaluation report of the bundle: per-pair metrics and a summary by rotation angle (an ignite handler)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from .cohort_run import all_gather, distributed_rank
from .fileio import write_csv, write_json
from .metrics import SUCCESS_MM

__all__ = ["RegistrationReport"]

logger = logging.getLogger(__name__)


def _as_list(x: Any, n: int) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(n, -1)[:, 0].tolist() if x.numel() >= n else [x.item()] * n
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * n


class RegistrationReport:
    """Write per-pair metrics (CSV) and a summary (JSON) of an evaluation run, by rotation angle.

    Reads, per iteration, the outputs of :class:`~custom_nets.metrics.RegistrationMetricsd` (``error_mm``,
    ``success``, ``dice``) and from the batch ``rotation_angle_deg``, contrasts / modalities, subjects and seed. The
    summary has, overall and per angle: pairs, success rate (error below 2 mm), median and mean error (mm), mean
    Dice and seconds per pair. Files are written atomically when the run completes.

    In a ``torch.distributed`` run (``configs/multi_gpu_evaluate.json``: each rank evaluates its share through a
    ``DistributedSampler`` without shuffling or padding, so rank ``r`` holds pairs ``r, r + w, ...``), the ranks'
    rows are gathered and rank 0 writes one report with every pair once, in the dataset's order.

    Args:
        output_dir: folder for ``metrics.csv`` and ``summary.json``.
        prefix: file name prefix.
    """

    COLUMNS = (
        "pair",
        "seed",
        "rotation_deg",
        "fixed_contrast",
        "moving_contrast",
        "same_subject",
        "error_mm",
        "success",
        "dice",
        "seconds",
    )

    def __init__(self, output_dir: str, prefix: str = "") -> None:
        self.output_dir, self.prefix = Path(output_dir), prefix
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        n = int(batch["fixed_image"].shape[0])
        seconds = (time.perf_counter() - self._t0) / n

        def get(src: Mapping[str, Any], *keys: str) -> list[Any]:
            for k in keys:
                if src.get(k) is not None:
                    return _as_list(src[k], n)
            return [None] * n

        cols = {
            "seed": get(batch, "seed"),
            "rotation_deg": get(batch, "rotation_angle_deg"),
            "fixed_contrast": get(batch, "fixed_contrast", "fixed_modality"),
            "moving_contrast": get(batch, "moving_contrast", "moving_modality"),
            "fixed_subject": get(batch, "fixed_subject"),
            "moving_subject": get(batch, "moving_subject"),
            "error_mm": get(out, "error_mm"),
            "success": get(out, "success"),
            "dice": get(out, "dice"),
        }
        rank, world = distributed_rank()
        for i in range(n):
            row = {k: v[i] for k, v in cols.items()}
            row["same_subject"] = row.pop("fixed_subject") == row.pop("moving_subject")
            row["pair"], row["seconds"] = rank + world * len(self.rows), seconds  # the sampler's order (see above)
            self.rows.append(row)

    def summary(self) -> dict[str, Any]:
        def stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            err = np.array([r["error_mm"] for r in rows if r["error_mm"] is not None], dtype=float)
            dice = np.array([r["dice"] for r in rows if r["dice"] is not None], dtype=float)
            out: dict[str, Any] = {"pairs": len(rows), "seconds_per_pair": float(np.mean([r["seconds"] for r in rows]))}
            if err.size:
                out.update(
                    success_rate=float(np.mean(err < SUCCESS_MM)),
                    median_error_mm=float(np.median(err)),
                    mean_error_mm=float(np.mean(err)),
                    p90_error_mm=float(np.percentile(err, 90)),
                )
            if dice.size:
                out["mean_dice"] = float(np.nanmean(dice))
            return out

        by_angle: dict[Any, list] = defaultdict(list)
        for r in self.rows:
            by_angle[r["rotation_deg"]].append(r)
        return {
            "success_threshold_mm": SUCCESS_MM,
            "overall": stats(self.rows) if self.rows else {"pairs": 0},
            "by_rotation_deg": {
                str(k): stats(v) for k, v in sorted(by_angle.items(), key=lambda kv: (kv[0] is None, kv[0]))
            },
        }

    def write(self, engine: Engine | None = None) -> None:
        """Write ``metrics.csv`` and ``summary.json`` (gathered over the ranks; rank 0 writes)."""
        rank, world = distributed_rank()
        if world > 1:
            self.rows = sorted((row for part in all_gather(self.rows) for row in part), key=lambda r: r["pair"])
            if rank != 0:
                return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.output_dir / f"{self.prefix}metrics.csv", self.rows, self.COLUMNS)
        summary = self.summary()
        write_json(self.output_dir / f"{self.prefix}summary.json", summary)
        logger.info("evaluation summary: %s", summary["overall"])
