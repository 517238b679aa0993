"""Training handlers of the bundle (augmentation ramp, progress bar), and the names of its other handlers.

The bundle's handlers live in rooms with one job each: :mod:`custom_nets.checkpoints` (atomic checkpoints, resume),
:mod:`custom_nets.weights` (verified weights), :mod:`custom_nets.report` (evaluation report), :mod:`custom_nets.writer`
(inference writer). They are importable from here too, so configs and code written against ``custom_nets.handlers``
keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from .checkpoints import (
    AtomicCheckpointSaver,
    NonFiniteStateError,
    ResumeFromCheckpoint,
    find_checkpoints,
    state_fingerprint,
)
from .report import RegistrationReport
from .volumes import output_stem
from .weights import VerifiedCheckpointLoader, WeightsIntegrityError, expected_sha256
from .writer import RegistrationFailuresError, RegistrationWriter

__all__ = [
    "AtomicCheckpointSaver",
    "ResumeFromCheckpoint",
    "VerifiedCheckpointLoader",
    "WeightsIntegrityError",
    "expected_sha256",
    "AugmentationRamp",
    "ProgressBar",
    "RegistrationReport",
    "RegistrationWriter",
    "RegistrationFailuresError",
    "NonFiniteStateError",
    "find_checkpoints",
    "output_stem",
    "state_fingerprint",
]


class AugmentationRamp:
    """Ramp the misalignment ranges of every :class:`~custom_nets.data.RandAffineMovingd` in a dataset's transforms
    linearly from ``start`` to 1 over ``ramp_epochs`` epochs (KeyMorph's curriculum). Set at each epoch start, before
    the data loader starts its workers, so worker processes see it."""

    def __init__(self, dataset: Any, ramp_epochs: int, start: float = 0.1) -> None:
        from .data.augment import RandAffineMovingd

        transforms = getattr(getattr(dataset, "transform", None), "transforms", ())
        self.targets = [t for t in transforms if isinstance(t, RandAffineMovingd)]
        if not self.targets:
            raise ValueError("AugmentationRamp: the dataset's transform has no RandAffineMovingd to ramp.")
        self.ramp_epochs, self.start = int(ramp_epochs), float(start)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frac = 1.0 if self.ramp_epochs <= 0 else min(1.0, (engine.state.epoch - 1) / self.ramp_epochs)
        for t in self.targets:
            t.set_ramp(self.start + (1.0 - self.start) * frac)


class ProgressBar:
    """ignite's tqdm progress bar with the running loss, as a MONAI-style handler (``attach(engine)``).

    In a ``torch.distributed`` run of more than one process, every rank shows its own bar, labelled
    ``<desc> [rank r/w]``.

    Args:
        desc: bar label.
        output_key: engine output key shown beside the bar (``None``: nothing).
        persist: keep the finished bar on screen.
    """

    def __init__(self, desc: str = "", output_key: str | None = "loss", persist: bool = True) -> None:
        self.desc, self.output_key, self.persist = desc, output_key, persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as _Bar

        from .cohort_run import distributed_rank

        key = self.output_key
        rank, world = distributed_rank()
        desc = self.desc if world == 1 else f"{self.desc} [rank {rank}/{world}]"

        def show(output: Any) -> dict[str, float]:
            if key is None or not isinstance(output, Mapping) or key not in output:
                return {}
            value = output[key]
            return {key: float(value.detach().mean()) if isinstance(value, torch.Tensor) else float(value)}

        _Bar(persist=self.persist, desc=desc).attach(engine, output_transform=show)
