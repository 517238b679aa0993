"""Checkpointing of the bundle's training: a thin layer over ignite's ``Checkpoint`` / ``DiskSaver`` and MONAI's
``CheckpointLoader``.

:class:`AtomicCheckpointSaver` writes training state atomically (refusing NaN / Inf state),
:class:`ResumeFromCheckpoint` resumes from the newest readable checkpoint (naming a corrupt one),
:func:`state_fingerprint` says whether two states are equal. Each handler has ``attach(engine)`` (MONAI handler
style). Weights for evaluation and inference are loaded by :class:`custom_nets.weights.VerifiedCheckpointLoader`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

__all__ = [
    "AtomicCheckpointSaver",
    "NonFiniteStateError",
    "ResumeFromCheckpoint",
    "find_checkpoints",
    "state_fingerprint",
]

logger = logging.getLogger(__name__)


def _state_of(obj: Any) -> Any:
    """``state_dict()`` of a module (unwrapping DistributedDataParallel), optimizer or engine."""
    if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
        obj = obj.module
    return obj.state_dict()


class NonFiniteStateError(RuntimeError):
    """Training state with NaN / Inf values, which :class:`AtomicCheckpointSaver` refuses to write."""


def _nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors of a (nested) state dict that hold NaN or Inf."""
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        return [n for k, v in state.items() for n in _nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in _nonfinite_entries(v, f"{prefix}[{i}]")]
    return []


def _fingerprint_update(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for k in sorted(obj, key=str):
            digest.update(f"{type(k).__name__}:{k}=".encode())
            _fingerprint_update(digest, obj[k])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for v in obj:
            _fingerprint_update(digest, v)
        digest.update(b"]")
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_fingerprint(state: Any) -> str:
    """SHA-256 (first 16 hex digits) of a nested state dict's content: keys, tensor dtypes, shapes and bytes, and
    scalar values. Equal fingerprints mean equal states; :class:`ResumeFromCheckpoint` logs the fingerprint of what
    it restored, so a resumed run can be checked against the checkpoint file."""
    digest = hashlib.sha256()
    _fingerprint_update(digest, state)
    return digest.hexdigest()[:16]


class _FiniteDiskSaver(DiskSaver):
    """ignite's atomic :class:`~ignite.handlers.DiskSaver` (temporary file, then rename) that refuses NaN / Inf state
    and deletes a rotated-out checkpoint only once its successor is on disk.

    ignite's :class:`~ignite.handlers.Checkpoint` asks its save handler to remove the oldest file *before* it saves the
    new one; here the removal waits for the successful save, so a refused (non-finite) or interrupted save keeps the
    previous checkpoints, and a file saved again under its own name (``best_model.pt``) is replaced, never missing.
    """

    def __init__(self, dirname: str | os.PathLike) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False)
        self._to_remove: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self.dirname / filename
        bad = _nonfinite_entries(checkpoint)
        if bad:
            self._to_remove.clear()
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(
                f"{path}: refusing to save a checkpoint with NaN / Inf values in {shown} (training diverged); the "
                "previous checkpoints are kept."
            )
        super().__call__(checkpoint, filename, metadata)
        logger.info("saved %s", path)
        for old in self._to_remove:
            if old != filename:
                super().remove(old)
        self._to_remove.clear()

    def remove(self, filename: str) -> None:
        self._to_remove.append(filename)


class AtomicCheckpointSaver:
    """Save training state atomically: the file under its final name is always complete.

    A thin layer over ignite's :class:`~ignite.handlers.Checkpoint` (rotation, best-metric keeping) and its atomic
    :class:`~ignite.handlers.DiskSaver`; what it adds: saving on an iteration *and* an epoch schedule into one
    ``<prefix>_<iteration>.pt`` series, refusing NaN / Inf state, keeping ``n_saved`` across a resume (the
    checkpoints a resumed run continues from are rotated out as it saves), and a fixed-name copy (``model.pt``) that
    loads straight into the network. The handler does no collective communication, so in multi-GPU training it is
    attached on rank 0 only.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"network": net, "optimizer": opt}``.
        every_n_iterations: save every N iterations (``None``: never by iteration).
        every_n_epochs: save every N epochs (``None``: never by epoch).
        n_saved: keep the last N periodic checkpoints; the checkpoints already in ``save_dir`` of an iteration before
            this run's first save (those a resumed run continues from) count, so the folder keeps the last N.
        prefix: file name prefix: files are ``<prefix>_<iteration>.pt``.
        final_filename: also save at the end of the run (or, with ``key_metric``, at each new best) under this exact
            name; a single object in ``save_dict`` is saved as its bare state dict, so e.g. ``model.pt`` loads with
            ``torch.load(weights_only=True)`` straight into the network.
        key_metric: instead of periodic saving, save when this metric of the attached engine (e.g. a validator)
            improves (higher is better; NaN / missing values never count as an improvement).
        engine_key: also save the attached engine's state (epoch, iteration) under this key (``None``: do not);
            configs cannot reference the trainer from its own handler list, hence this.

    Raises:
        NonFiniteStateError: when asked to save weights or optimizer state holding NaN / Inf (training diverged):
            the run stops there, naming the tensors, and the earlier checkpoints are kept instead of being rotated
            out by useless ones.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        every_n_iterations: int | None = None,
        every_n_epochs: int | None = 1,
        n_saved: int = 2,
        prefix: str = "checkpoint",
        final_filename: str | None = None,
        key_metric: str | None = None,
        engine_key: str | None = None,
    ) -> None:
        self.save_dir, self.save_dict, self.engine_key = Path(save_dir), dict(save_dict), engine_key
        self.every_n_iterations, self.every_n_epochs = every_n_iterations, every_n_epochs
        self.n_saved, self.prefix, self.final_filename, self.key_metric = (
            int(n_saved),
            prefix,
            final_filename,
            key_metric,
        )
        self._disk: _FiniteDiskSaver | None = None
        self._periodic: Checkpoint | None = None
        self._best: Checkpoint | None = None
        self._last_iteration: int | None = None

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        if self.key_metric is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save_if_best)
            return
        if self.every_n_iterations:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(every=int(self.every_n_iterations)), self._save_periodic
            )
        if self.every_n_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=int(self.every_n_epochs)), self._save_periodic)
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, lambda e: self._write(self.save_dir / str(self.final_filename)))

    @property
    def disk(self) -> _FiniteDiskSaver:
        """The save handler (made at the first save, so that ``save_dir`` is created only when something is saved)."""
        if self._disk is None:
            self._disk = _FiniteDiskSaver(self.save_dir)
        return self._disk

    def state(self) -> Any:
        """What is saved: the bare state dict of a single object, else ``{key: state_dict}``."""
        if len(self.save_dict) == 1:
            return _state_of(next(iter(self.save_dict.values())))
        return {k: _state_of(v) for k, v in self.save_dict.items()}

    def _write(self, path: Path) -> Path:
        """Save :meth:`state` as ``save_dir / path.name`` (atomically; NaN / Inf refused)."""
        self.disk(self.state(), Path(path).name)
        return self.save_dir / Path(path).name

    def _save_periodic(self, engine: Engine) -> None:
        iteration = int(engine.state.iteration)
        if iteration == self._last_iteration:
            return  # the same iteration hit by the iteration and the epoch schedule
        extra: list[Path] = []
        if self._periodic is None:
            self._periodic = Checkpoint(
                self.save_dict,
                self.disk,
                filename_prefix=self.prefix,
                n_saved=self.n_saved,
                global_step_transform=lambda e, _: int(e.state.iteration),
                filename_pattern="{filename_prefix}_{global_step}.{ext}",
            )
            found = find_checkpoints(self.save_dir, self.prefix)  # newest first
            earlier = [p for p in found[::-1] if _iteration(p) < iteration]  # a resumed run's: they count
            self._periodic.load_state_dict({"_saved": [(_iteration(p), p.name) for p in earlier[-self.n_saved :]]})
            extra = earlier[: -self.n_saved]
            later = [p.name for p in found if _iteration(p) > iteration]
            if later:
                logger.warning(
                    "%s holds checkpoints of a later iteration than this run's (%s), from another run: a resume "
                    "would start from them; remove them or use another output folder.",
                    self.save_dir,
                    ", ".join(later),
                )
        self._periodic(engine)
        self._last_iteration = iteration
        for old in extra:  # beyond n_saved before this run's first save
            old.unlink(missing_ok=True)

    def _save_if_best(self, engine: Engine) -> None:
        value = engine.state.metrics.get(str(self.key_metric))
        if value is None or not np.isfinite(float(value)) or not self.final_filename:
            return
        if self._best is None:
            self._best = Checkpoint(
                self.save_dict,
                self.disk,
                score_function=lambda e: float(e.state.metrics[str(self.key_metric)]),
                n_saved=1,
                filename_pattern=str(self.final_filename),
            )
        self._best(engine)


def _iteration(checkpoint: Path) -> int:
    """The iteration in a ``<prefix>_<iteration>.pt`` file name."""
    return int(checkpoint.stem.rsplit("_", 1)[1])


def find_checkpoints(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """Checkpoints ``<prefix>_<iteration>.pt`` in ``save_dir``, newest (highest iteration) first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


#: Temporary files of an interrupted atomic save: ``.tmp-*`` (:func:`~custom_nets.fileio.atomic_write`) and
#: ``tmpXXXXXXXX`` (ignite's :class:`~ignite.handlers.DiskSaver`, through :func:`tempfile.NamedTemporaryFile`).
_INTERRUPTED_SAVE = re.compile(r"^(\.tmp-.*|tmp[a-z0-9_]{8})$")


class ResumeFromCheckpoint:
    """Resume from the newest complete checkpoint in ``save_dir`` when the run starts (nothing there: a fresh run).

    What MONAI's :class:`~monai.handlers.CheckpointLoader` (which does the loading, ``weights_only=True``) lacks:
    choosing the checkpoint. A checkpoint that cannot be read (corrupt, truncated, not a checkpoint) is reported by
    name in a warning and skipped for the next newest one; if every checkpoint is unreadable, the run stops with an
    error listing them. Temporary files of an interrupted save are removed first; they are never mistaken for
    checkpoints. The configured ``max_epochs`` and learning rates win over the saved ones, so a finished run can be
    extended by raising ``max_epochs`` and continued with a lower rate.

    The log line of a resume gives the :func:`state_fingerprint` of the restored state (every object of
    ``load_dict`` but the engine, after loading): with an unchanged learning rate it equals the fingerprint of the
    checkpoint file's content, which is how a resumed run can be checked to continue from exactly the saved state.

    Args:
        save_dir: folder of :class:`AtomicCheckpointSaver` checkpoints.
        load_dict: objects to restore, same keys as saved (e.g. network, optimizer, trainer).
        prefix: checkpoint file prefix.
        map_location: ``torch.load`` map location.
        enabled: set False to always start fresh.
        engine_key: restore the attached engine's state from this key (see :class:`AtomicCheckpointSaver`).
    """

    def __init__(
        self,
        save_dir: str,
        load_dict: Mapping[str, Any],
        prefix: str = "checkpoint",
        map_location: str | None = "cpu",
        enabled: bool = True,
        engine_key: str | None = None,
    ) -> None:
        self.save_dir, self.load_dict, self.prefix, self.engine_key = save_dir, dict(load_dict), prefix, engine_key
        self.map_location, self.enabled = map_location, bool(enabled)
        self.loaded_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.load_dict[self.engine_key] = engine
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def _readable(self, path: Path) -> str | None:
        """Why ``path`` cannot be resumed from (``None``: it can)."""
        try:
            state = torch.load(path, map_location=self.map_location, weights_only=True)
            if not isinstance(state, Mapping) or not set(self.load_dict) <= set(state):
                raise ValueError(f"expected keys {sorted(self.load_dict)}, found {sorted(state)[:8]}")
        except Exception as err:  # corrupt zip, truncated pickle, wrong content
            return f"{type(err).__name__}: {err}"
        return None

    def __call__(self, engine: Engine) -> None:
        folder = Path(self.save_dir)
        for stale in sorted(p for p in folder.iterdir() if _INTERRUPTED_SAVE.match(p.name)) if folder.is_dir() else []:
            logger.warning("removing %s, a temporary file left by an interrupted checkpoint save", stale)
            stale.unlink(missing_ok=True)
        problems = []
        for path in find_checkpoints(self.save_dir, self.prefix):
            problem = self._readable(path)
            if problem is not None:
                problems.append(f"{path}: {problem}")
                logger.warning("checkpoint %s is unreadable (%s); trying an older one", path, problem)
                continue
            optimizers = [o for o in self.load_dict.values() if isinstance(o, torch.optim.Optimizer)]
            rates = [[g["lr"] for g in o.param_groups] for o in optimizers]
            CheckpointLoader(str(path), self.load_dict, map_location=self.map_location)(engine)
            for optimizer, lrs in zip(optimizers, rates):  # the configured rates win
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
            self.loaded_from = path
            restored = {k: _state_of(v) for k, v in self.load_dict.items() if k != self.engine_key}
            logger.info(
                "resumed from %s at iteration %d (restored %s, state fingerprint %s)",
                path,
                engine.state.iteration,
                "+".join(sorted(restored)),
                state_fingerprint(restored),
            )
            return
        if problems:
            raise RuntimeError(
                "every checkpoint is unreadable, refusing to start from scratch over them:\n" + "\n".join(problems)
            )
