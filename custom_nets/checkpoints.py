"""Checkpointing handlers of the bundle's training and the verified weights loader of its evaluation / inference.

:class:`AtomicCheckpointSaver` writes training state atomically (refusing NaN / Inf state),
:class:`ResumeFromCheckpoint` resumes from the newest readable checkpoint (naming a corrupt one),
:class:`VerifiedCheckpointLoader` loads weights only after their SHA-256 matched ``large_files.yml``.
Each has ``attach(engine)`` (MONAI handler style).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from .fileio import atomic_write, sha256_file

__all__ = [
    "AtomicCheckpointSaver",
    "CHECKPOINT_NETWORK_KEY",
    "NonFiniteStateError",
    "ResumeFromCheckpoint",
    "VerifiedCheckpointLoader",
    "WeightsIntegrityError",
    "expected_sha256",
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
    import hashlib

    digest = hashlib.sha256()
    _fingerprint_update(digest, state)
    return digest.hexdigest()[:16]


class AtomicCheckpointSaver:
    """Save training state atomically: the file under its final name is always complete.

    Files are written through a temporary file and a rename (:func:`~custom_nets.fileio.atomic_write`), so a run killed
    at any moment leaves the previous checkpoints intact. The handler does no collective communication, so in
    multi-GPU training it is attached on rank 0 only.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"network": net, "optimizer": opt}``.
        every_n_iterations: save every N iterations (``None``: never by iteration).
        every_n_epochs: save every N epochs (``None``: never by epoch).
        n_saved: keep the last N periodic checkpoints (or the N best with ``key_metric``); the checkpoints already
            in ``save_dir`` of an iteration before this run's first save (those a resumed run continues from) count,
            so the folder keeps the last N.
        prefix: file name prefix: files are ``<prefix>_<iteration>.pt``.
        final_filename: also save at the end of the run (or, with ``key_metric``, at each new best) under this exact
            name; a single object in ``save_dict`` is saved as its bare state dict, so e.g. ``model.pt`` loads with
            ``torch.load(weights_only=True)`` straight into the network.
        key_metric: instead of periodic saving, save when this metric of the attached engine (e.g. a validator)
            improves (higher is better).
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
        self.best: float | None = None
        self.saved: list[Path] = []

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

    def state(self) -> Any:
        """What is saved: the bare state dict of a single object, else ``{key: state_dict}``."""
        if len(self.save_dict) == 1:
            return _state_of(next(iter(self.save_dict.values())))
        return {k: _state_of(v) for k, v in self.save_dict.items()}

    def _write(self, path: Path) -> Path:
        state = self.state()
        bad = _nonfinite_entries(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(
                f"{path}: refusing to save a checkpoint with NaN / Inf values in {shown} (training diverged); the "
                "previous checkpoints are kept."
            )
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        logger.info("saved %s", path)
        return path

    def _save_periodic(self, engine: Engine) -> None:
        path = self.save_dir / f"{self.prefix}_{engine.state.iteration}.pt"
        if path in self.saved:
            return  # the same iteration hit by the iteration and the epoch schedule
        if not self.saved:  # a resumed run: the checkpoints it continues from count towards n_saved
            found = find_checkpoints(self.save_dir, self.prefix)  # newest first
            self.saved = [p for p in found[::-1] if _iteration(p) < engine.state.iteration]
            later = [p.name for p in found if _iteration(p) > engine.state.iteration]
            if later:
                logger.warning(
                    "%s holds checkpoints of a later iteration than this run's (%s), from another run: a resume "
                    "would start from them; remove them or use another output folder.",
                    self.save_dir,
                    ", ".join(later),
                )
        self.saved.append(self._write(path))
        for old in self.saved[: -self.n_saved]:
            old.unlink(missing_ok=True)
        self.saved = self.saved[-self.n_saved :]

    def _save_if_best(self, engine: Engine) -> None:
        value = engine.state.metrics.get(str(self.key_metric))
        if value is None or not np.isfinite(float(value)) or (self.best is not None and float(value) <= self.best):
            return
        self.best = float(value)
        if self.final_filename:
            self._write(self.save_dir / str(self.final_filename))


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


class ResumeFromCheckpoint:
    """Resume from the newest complete checkpoint in ``save_dir`` when the run starts (nothing there: a fresh run).

    Checkpoints are loaded with ``weights_only=True``. A checkpoint that cannot be read (corrupt, truncated, not a
    checkpoint) is reported by name in a warning and skipped for the next newest one; if every checkpoint is
    unreadable, the run stops with an error listing them. Temporary files of an interrupted save (``.tmp-*``, left
    when a run is killed while :func:`~custom_nets.fileio.atomic_write` is writing) are removed first; they are never
    mistaken for checkpoints. The configured ``max_epochs`` and learning rates win over the saved ones, so a finished
    run can be extended by raising ``max_epochs`` and continued with a lower rate.

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

    def __call__(self, engine: Engine) -> None:
        folder = Path(self.save_dir)
        for stale in sorted(folder.glob(".tmp-*")) if folder.is_dir() else []:
            logger.warning("removing %s, a temporary file left by an interrupted checkpoint save", stale)
            stale.unlink(missing_ok=True)
        candidates = find_checkpoints(self.save_dir, self.prefix)
        if not candidates:
            return
        problems = []
        for path in candidates:
            try:
                state = torch.load(path, map_location=self.map_location, weights_only=True)
                if not isinstance(state, Mapping) or not set(self.load_dict) <= set(state):
                    raise ValueError(f"expected keys {sorted(self.load_dict)}, found {sorted(state)[:8]}")
            except Exception as err:  # corrupt zip, truncated pickle, wrong content
                problems.append(f"{path}: {type(err).__name__}: {err}")
                logger.warning(
                    "checkpoint %s is unreadable (%s: %s); trying an older one", path, type(err).__name__, err
                )
                continue
            max_epochs = engine.state.max_epochs
            for key, obj in self.load_dict.items():
                target = obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
                rates = [g["lr"] for g in target.param_groups] if isinstance(target, torch.optim.Optimizer) else None
                target.load_state_dict(state[key])
                if rates is not None:
                    for group, lr in zip(target.param_groups, rates):
                        group["lr"] = lr
            if max_epochs is not None and engine.state.max_epochs != max_epochs:
                engine.state.max_epochs = max_epochs
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
        raise RuntimeError(
            "every checkpoint is unreadable, refusing to start from scratch over them:\n" + "\n".join(problems)
        )


class WeightsIntegrityError(RuntimeError):
    """A weights file does not match the SHA-256 recorded for it, or cannot be read as a state dict."""


def expected_sha256(weights: str | os.PathLike, large_files: str | os.PathLike | None) -> str | None:
    """The SHA-256 recorded for ``weights`` in a bundle's ``large_files.yml`` (matched by resolved path), if any."""
    if large_files is None or not Path(large_files).is_file():
        return None
    from monai.bundle import ConfigParser

    listing = ConfigParser.load_config_file(str(large_files))
    root = Path(large_files).resolve().parent
    target = Path(weights).resolve()
    for entry in listing.get("large_files", []):
        if (root / str(entry.get("path", ""))).resolve() == target and entry.get("hash_val"):
            kind = str(entry.get("hash_type", "sha256")).lower()
            if kind != "sha256":
                raise WeightsIntegrityError(f"{large_files}: {entry['path']} has a {kind} hash; expected sha256.")
            return str(entry["hash_val"]).lower()
    return None


class VerifiedCheckpointLoader:
    """Load weights into the network only if their SHA-256 matches the recorded one; always ``weights_only=True``.

    The expected hash is ``sha256`` if given, else the entry of ``load_path`` in the bundle's ``large_files.yml``.
    Weights with no recorded hash (e.g. your own training run) are loaded with a warning saying so. Loading happens
    when the engine starts, before the first pair, so a refused file stops the run before any output is written.

    Args:
        load_path: weights file: a state dict (``model.pt``), a file holding one under a ``load_dict`` key, or a
            training checkpoint of the bundle (``checkpoints/checkpoint_<iteration>.pt``: its network is loaded).
        load_dict: ``{"model": network}``.
        sha256: expected hex digest (optional).
        large_files: path of ``large_files.yml`` to look the digest up in (optional).
        map_location: ``torch.load`` map location.
        strict: strict ``load_state_dict``.

    Raises:
        FileNotFoundError: no file at ``load_path``.
        WeightsIntegrityError: digest mismatch, not a loadable file, or not weights of this network (the message
            names the file).
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, torch.nn.Module],
        sha256: str | None = None,
        large_files: str | None = None,
        map_location: Any = "cpu",
        strict: bool = True,
    ) -> None:
        self.load_path, self.load_dict, self.map_location, self.strict = (
            Path(load_path),
            dict(load_dict),
            map_location,
            strict,
        )
        self.sha256 = sha256.lower() if sha256 else expected_sha256(load_path, large_files)

    def load(self) -> None:
        if not self.load_path.is_file():
            raise FileNotFoundError(
                f"{self.load_path}: no weights file (download it: python -m monai.bundle "
                "download_large_files --bundle_path <bundle>)."
            )
        if self.sha256 is None:
            logger.warning("%s: no SHA-256 recorded for these weights; loading them unverified", self.load_path)
        else:
            actual = sha256_file(self.load_path)
            if actual != self.sha256:
                raise WeightsIntegrityError(
                    f"{self.load_path}: SHA-256 {actual} does not match the recorded {self.sha256}; the file is "
                    "corrupt or has been changed, refusing to load it."
                )
        try:
            state = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        except Exception as err:
            raise WeightsIntegrityError(
                f"{self.load_path}: not a loadable weights file ({type(err).__name__}: {err})."
            ) from err
        for key, net in self.load_dict.items():
            target = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
            part = _state_part(state, key, len(self.load_dict))
            try:
                target.load_state_dict(part, strict=self.strict)
            except Exception as err:  # missing / unexpected keys, shape mismatches: another network's weights
                raise WeightsIntegrityError(
                    f"{self.load_path}: not weights of this network ({type(target).__name__}, load_dict key "
                    f"'{key}'): {type(err).__name__}: {err}"
                ) from err
        logger.info("loaded weights %s (%s)", self.load_path, "SHA-256 verified" if self.sha256 else "unverified")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.load())


#: The key under which the bundle's training checkpoints (``checkpoints/checkpoint_<iteration>.pt``) hold the network.
CHECKPOINT_NETWORK_KEY = "network"


def _state_part(state: Any, key: str, num_networks: int) -> Any:
    """The state dict for ``load_dict[key]`` in a loaded file: ``state[key]`` when the file holds one under that key,
    else, for a single network, the network of a training checkpoint (``{"network", "optimizer", "trainer"}``) or the
    file itself (a bare state dict such as ``model.pt``)."""
    if isinstance(state, Mapping):
        if isinstance(state.get(key), Mapping):
            return state[key]
        if num_networks == 1 and isinstance(state.get(CHECKPOINT_NETWORK_KEY), Mapping) and "optimizer" in state:
            return state[CHECKPOINT_NETWORK_KEY]
    return state
