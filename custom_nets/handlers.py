"""Ignite handlers for the KeyMorph bundle: atomic checkpoints and resume, augmentation ramp, evaluation report,
inference writer. Each has ``attach(engine)``, so MONAI engines take them in ``train_handlers`` / ``val_handlers``."""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from .data.datasets import FAILURE_KEY, FAILURES_KEY
from .engines import SUCCESS_MM, RegistrationFailure
from .fits import ThinPlateSpline
from .geometry import resample
from .io import atomic_write, save_registration_png, sha256_file, write_csv, write_itk_affine, write_json

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

    Files are written through a temporary file and a rename (:func:`custom_nets.io.atomic_write`), so a run killed at
    any moment leaves the previous checkpoints intact. The handler does no collective communication, so in
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
    when a run is killed while :func:`~custom_nets.io.atomic_write` is writing) are removed first; they are never
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

    Args:
        desc: bar label.
        output_key: engine output key shown beside the bar (``None``: nothing).
        persist: keep the finished bar on screen.
    """

    def __init__(self, desc: str = "", output_key: str | None = "loss", persist: bool = True) -> None:
        self.desc, self.output_key, self.persist = desc, output_key, persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as _Bar

        key = self.output_key

        def show(output: Any) -> dict[str, float]:
            if key is None or not isinstance(output, Mapping) or key not in output:
                return {}
            value = output[key]
            return {key: float(value.detach().mean()) if isinstance(value, torch.Tensor) else float(value)}

        _Bar(persist=self.persist, desc=self.desc).attach(engine, output_transform=show)


def _as_list(x: Any, n: int) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(n, -1)[:, 0].tolist() if x.numel() >= n else [x.item()] * n
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * n


class RegistrationReport:
    """Write per-pair metrics (CSV) and a summary (JSON) of an evaluation run, by rotation angle.

    Reads, per iteration, the outputs of :class:`~custom_nets.engines.RegistrationMetricsd` (``error_mm``,
    ``success``, ``dice``) and from the batch ``rotation_angle_deg``, contrasts / modalities, subjects and seed. The
    summary has, overall and per angle: pairs, success rate (error below 2 mm), median and mean error (mm), mean
    Dice and seconds per pair. Files are written atomically when the run completes.

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
        for i in range(n):
            row = {k: v[i] for k, v in cols.items()}
            row["same_subject"] = row.pop("fixed_subject") == row.pop("moving_subject")
            row["pair"], row["seconds"] = len(self.rows), seconds
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.output_dir / f"{self.prefix}metrics.csv", self.rows, self.COLUMNS)
        summary = self.summary()
        write_json(self.output_dir / f"{self.prefix}summary.json", summary)
        logger.info("evaluation summary: %s", summary["overall"])


def output_stem(path: str) -> str:
    """The name inference outputs of an image get: its file name without the image extension."""
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$|\.mg[hz]$|\.n(rrd|hdr)$|\.mh[ad]$|\.hdr$|\.img$", "", name, flags=re.IGNORECASE)


def _load_volume(path: str) -> Any:
    """Open an image with nibabel (data stays on disk until read); a 4D file holding one volume is squeezed to 3D.

    Formats nibabel does not read (e.g. NRRD, MetaImage, which the preprocessing reads through MONAI's ITK reader) are
    read with MONAI's ``LoadImage``, the reader the registration saw them with, so voxels and RAS affine are the same;
    they come back as an in-memory NIfTI image, and the outputs on their grid are NIfTI.

    Raises:
        ValueError: naming the file, if it cannot be read or is not a 3D volume.
    """
    from .data.transforms import nibabel_reads

    try:
        if nibabel_reads(path):
            img = nib.load(path)
        else:
            from monai.transforms import LoadImage

            loaded = LoadImage(image_only=True, dtype=np.float32)(path)
            img = nib.Nifti1Image(np.asarray(loaded), np.asarray(loaded.affine, dtype=np.float64))
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from err
    if len(img.shape) > 3 and all(n == 1 for n in img.shape[3:]):
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}.")
    return img


def _read_volume(img: Any, path: str) -> np.ndarray:
    """The voxels of a nibabel image as float32 (errors, e.g. truncated data, name the file)."""
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise ValueError(f"{path}: cannot read the image data ({type(err).__name__}: {err}).") from err


def resample_to_image(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    fixed_to_moving: torch.Tensor | ThinPlateSpline,
    mode: str = "bilinear",
    device: torch.device | str = "cpu",
    max_voxels: int = 2**22,
) -> np.ndarray:
    """Resample a full-resolution moving volume onto a fixed grid, slab by slab (bounded memory).

    Args:
        moving: ``(I, J, K)`` moving voxels; ``moving_affine``: its ``(4, 4)`` voxel-to-world affine (RAS mm).
        fixed_shape: ``(I', J', K')`` of the output grid; ``fixed_affine``: its ``(4, 4)`` voxel-to-world affine.
        fixed_to_moving: ``(1, 4, 4)`` world matrix or a one-item spline (fixed point -> moving point).
        mode: ``bilinear`` or ``nearest`` (labels); zeros outside the moving field of view.
        device: where the resampling runs.
        max_voxels: output voxels per slab.

    Returns:
        ``(I', J', K')`` float32 array.
    """
    mov = torch.as_tensor(np.asarray(moving, dtype=np.float32), device=device)[None, None]
    a_m = torch.as_tensor(moving_affine, dtype=torch.float64, device=device)
    a_f = torch.as_tensor(fixed_affine, dtype=torch.float64, device=device)
    slab = max(1, max_voxels // max(1, int(np.prod(fixed_shape[1:]))))
    out = np.empty(tuple(int(n) for n in fixed_shape), dtype=np.float32)
    for i0 in range(0, int(fixed_shape[0]), slab):
        i1 = min(int(fixed_shape[0]), i0 + slab)
        shift = torch.eye(4, dtype=torch.float64, device=device)
        shift[0, 3] = i0
        part = resample(mov, fixed_to_moving, (i1 - i0, *fixed_shape[1:]), a_f @ shift, a_m, mode=mode)
        out[i0:i1] = part[0, 0].cpu().numpy()
    return out


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
    ``pair``, ``moving``, ``fixed``, ``status`` ``ok`` / ``failed``, ``stage``, ``error``, ``json``, the ``verdict``
    and its ``reasons``, and the quality measures) and ``failures.json`` (the failed pairs; ``[]`` when none) are
    written, and, with ``fail_on_error``, a :class:`RegistrationFailuresError` is raised if any pair failed, so
    ``python -m monai.bundle run inference`` exits non-zero after writing every result it could.

    Args:
        output_dir: output folder.
        png: write the PNG.
        device: device used to resample the originals.
        fail_on_error: raise at the end of the run if any pair failed.
        fail_on_suspect: treat a registration whose quality verdict is ``suspect`` as a failure (nothing written).
    """

    STATUS_COLUMNS = ("pair", "moving", "fixed", "status", "stage", "error", "json", "verdict", "reasons")
    QUALITY_COLUMNS = (
        "nmi", "lncc", "foreground_overlap", "keypoint_residual_mm", "keypoints_used", "inverse_consistency_mm"
    )  # fmt: skip

    def __init__(
        self,
        output_dir: str,
        png: bool = True,
        device: torch.device | str = "cpu",
        fail_on_error: bool = True,
        fail_on_suspect: bool = False,
    ) -> None:
        self.output_dir, self.png, self.device = Path(output_dir), bool(png), device
        self.fail_on_error, self.fail_on_suspect = bool(fail_on_error), bool(fail_on_suspect)
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
            for b in range(len(fixed_paths)):
                label = labels[b] if isinstance(labels, (list, tuple)) else None
                fixed, moving = str(fixed_paths[b]), str(moving_paths[b])
                item = pred[b] if isinstance(pred, list) else pred
                if isinstance(item, RegistrationFailure):
                    self._fail(moving, fixed, item.stage, item.error)
                    continue
                if item is None:
                    self._fail(moving, fixed, "register", "the network returned no result")
                    continue
                item_masks = {s: m[b] for s, m in masks.items() if isinstance(m, torch.Tensor)}
                self._write_isolated(item, 0 if isinstance(pred, list) else b, fixed, moving, label, item_masks)
        for record in batch.get(FAILURES_KEY) or []:
            info = record.get(FAILURE_KEY) or {}
            self._fail(
                record.get("moving_image"),
                record.get("fixed_image"),
                str(info.get("stage", "load")),
                str(info.get("error", "unknown error")),
            )

    def _write_isolated(
        self, pred: Any, b: int, fixed: str, moving: str, label: str | None, masks: Mapping[str, Any] | None = None
    ) -> None:
        quality = _quality_of(pred, b)
        if quality is not None and quality.get("verdict") == "suspect":
            reasons = "; ".join(quality.get("reasons") or [])
            if self.fail_on_suspect:
                self._fail(moving, fixed, "quality", f"suspect registration (--fail_on_suspect): {reasons}", quality)
                return
            logger.warning(
                "pair %d: moving %s, fixed %s registered, but the result is SUSPECT: %s", len(self.results), moving,
                fixed, reasons,
            )  # fmt: skip
        stem = output_stem(moving)
        if stem in self._stems:
            self._fail(
                moving,
                fixed,
                "write",
                f"another pair of this run already wrote outputs named {stem!r} (same moving file name); refusing to "
                "overwrite them",
            )
            return
        try:
            files = self.write_pair(pred, b, fixed, moving, label, masks)
        except Exception as err:  # recorded as this pair's failure; the others go on
            self._fail(moving, fixed, "write", f"{type(err).__name__}: {err}")
            return
        self._stems.add(stem)
        self.written.append(files)
        self.results.append(
            {
                "pair": len(self.results), "moving": moving, "fixed": fixed, "status": "ok", "json": files["json"],
                **_quality_columns(quality),
            }
        )  # fmt: skip

    def _outputs_of(self, stem: str) -> list[Path]:
        names = (
            f"{stem}_warped.nii.gz", f"{stem}_label_warped.nii.gz", f"{stem}.json", f"{stem}.tfm", f"{stem}.png",
            f"{stem}_brainmask.nii.gz", f"{stem}_fixed_brainmask.nii.gz",
        )  # fmt: skip
        return [self.output_dir / n for n in names]

    def _fail(
        self, moving: str | None, fixed: str | None, stage: str, error: str, quality: dict[str, Any] | None = None
    ) -> None:
        record = {"pair": len(self.results), "moving": moving, "fixed": fixed, "stage": stage, "error": error}
        if quality is not None:
            record["quality"] = quality
        logger.error("pair %d failed at %s: moving %s, fixed %s: %s", record["pair"], stage, moving, fixed, error)
        if moving and output_stem(str(moving)) not in self._stems:  # never another pair's outputs
            for old in self._outputs_of(output_stem(str(moving))):
                if old.exists():
                    logger.warning("removing %s: its pair failed in this run", old)
                    old.unlink(missing_ok=True)
        self.failures.append(record)
        row = {k: v for k, v in record.items() if k != "quality"}
        self.results.append({**row, "status": "failed", "json": "", **_quality_columns(quality)})

    def finish(self, engine: Engine | None = None) -> None:
        """Write ``results.csv`` and ``failures.json``, log the count, and raise if any pair failed (see above)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.output_dir / "results.csv", self.results, self.STATUS_COLUMNS + self.QUALITY_COLUMNS)
        write_json(self.output_dir / "failures.json", self.failures)
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
    ) -> dict:
        """Write the outputs of batch item ``b`` of ``pred`` (``masks``: ``{"moving" / "fixed": (1, I, J, K)
        MetaTensor}`` brain masks on any grid of the same world); on any error, the files already written for it are
        removed and the error re-raised."""
        files: dict[str, str] = {}
        try:
            self._write_pair(pred, b, fixed_path, moving_path, label_path, files, masks or {})
        except BaseException:
            for path in files.values():
                Path(path).unlink(missing_ok=True)
            raise
        return files

    def _write_mask(self, mask: Any, image_path: str, side: str, moving_path: str, files: dict[str, str]) -> None:
        """Write a brain mask on the grid of the original image ``image_path`` (nearest neighbour through world)."""
        img = _load_volume(image_path)
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
        _save_like(np.rint(on_grid), img, files[key], np.uint8)

    def _write_pair(
        self,
        pred: Any,
        b: int,
        fixed_path: str,
        moving_path: str,
        label_path: str | None,
        files: dict[str, str],
        masks: Mapping[str, Any],
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(moving_path)
        fixed_img, moving_img = _load_volume(fixed_path), _load_volume(moving_path)
        f_aff, m_aff = np.asarray(fixed_img.affine, dtype=np.float64), np.asarray(moving_img.affine, dtype=np.float64)
        f2m = pred.fixed_to_moving
        t_item = f2m[b : b + 1].double() if isinstance(f2m, torch.Tensor) else f2m.select(b).to(self.device)
        moving_data = _read_volume(moving_img, moving_path)
        warped = resample_to_image(moving_data, m_aff, fixed_img.shape, f_aff, t_item, device=self.device)
        if not np.isfinite(warped).all():
            raise ValueError(f"{moving_path}: the warped image has NaN / Inf voxels; not writing it.")
        files["warped"] = str(self.output_dir / f"{stem}_warped.nii.gz")
        _save_like(warped, fixed_img, files["warped"], np.float32)
        if label_path:
            lab_img = _load_volume(label_path)
            lab = resample_to_image(
                _read_volume(lab_img, label_path),
                np.asarray(lab_img.affine, dtype=np.float64),
                fixed_img.shape,
                f_aff,
                t_item,
                mode="nearest",
                device=self.device,
            )
            files["label_warped"] = str(self.output_dir / f"{stem}_label_warped.nii.gz")
            _save_like(np.rint(lab), fixed_img, files["label_warped"], lab_img.get_data_dtype())
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
                _read_volume(fixed_img, fixed_path),
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
        files["json"] = str(self.output_dir / f"{stem}.json")
        write_json(files["json"], record)


def _quality_of(pred: Any, b: int) -> dict[str, Any] | None:
    """The quality record of batch item ``b`` of a :class:`~custom_nets.keymorph.KeyMorphOutput` (``None`` if the
    network gave none, e.g. a traced model)."""
    records = getattr(pred, "quality", None)
    return dict(records[b]) if records else None


def _quality_columns(quality: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``results.csv`` columns of a quality record: verdict, reasons (joined), measures rounded to 4 digits."""
    if quality is None:
        return {}
    row: dict[str, Any] = {"verdict": quality.get("verdict", ""), "reasons": "; ".join(quality.get("reasons") or [])}
    for key in RegistrationWriter.QUALITY_COLUMNS:
        value = quality.get(key)
        row[key] = "" if value is None else round(float(value), 4)
    return row


def _verdict_title(quality: Mapping[str, Any] | None) -> str:
    """The verdict for a PNG title: ``"  [ok]"``, or ``"  [SUSPECT: first reason]"``."""
    if quality is None:
        return ""
    if quality.get("verdict") == "suspect":
        reasons = quality.get("reasons") or ["?"]
        return f"  [SUSPECT: {reasons[0]}{' ...' if len(reasons) > 1 else ''}]"
    return f"  [{quality.get('verdict', '?')}]"


def _save_like(data: np.ndarray, like: Any, path: str, dtype: Any) -> None:
    """Save ``data`` as NIfTI on the grid of image ``like``: its affine, and its NIfTI header fields (units, codes,
    description) when ``like`` is NIfTI; data type ``dtype``, no intensity scaling."""
    header = like.header.copy() if isinstance(like, nib.Nifti1Image) else None
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), like.affine, header=header)  # no copy if already dtype
    img.header.set_data_dtype(dtype)
    codes = (int(like.header["qform_code"]), int(like.header["sform_code"])) if header is not None else (0, 0)
    img.set_qform(like.affine, code=codes[0] or 1)
    img.set_sform(like.affine, code=codes[1] or 1)
    img.header.set_slope_inter(1.0, 0.0)
    atomic_write(path, lambda tmp: nib.save(img, tmp))
