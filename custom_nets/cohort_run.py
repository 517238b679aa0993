"""Batch inference over a cohort: which pairs this process registers, which are done already, and one merged record.

A pair list of thousands of registrations runs as one job on one process or on many (``torchrun``, one process per
GPU or per share of CPU cores, on one node or several; see ``configs/multi_gpu_inference.json``):

* **Sharding.** Pair ``i`` of the list (0-based, the list's order) belongs to rank ``i % world_size``: every pair
  is registered by exactly one process, none twice (no padding of the last share with repeats) and none dropped when
  the count does not divide. Ownership follows from the list alone, so the ranks need no coordination while they
  work, and a rerun with another number of processes shares the work out afresh.
* **Resume.** Every pair's outputs are written atomically, its ``<stem>.json`` last, and that JSON records what made
  it (``run``: a fingerprint of the settings, the SHA-256 of the weights and the code version, and the size and
  modification time of every input file). A pair whose JSON matches this run and whose listed outputs all exist is
  complete and is skipped; a half-written pair (no JSON) or one made by other settings, weights, code or inputs is
  registered again (the difference is logged). Kill any process at any moment and run the same command again: every
  pair ends up exactly once in the outputs and in ``results.csv``.
* **One record.** At the end the ranks exchange their rows (``torch.distributed.all_gather_object``) and rank 0
  writes ``results.csv`` and ``failures.json``, one row per pair in the list's order, the resumed pairs included
  (:func:`write_results`; the columns are :data:`RESULT_COLUMNS`).

Two pairs of the list with the same moving file name would write the same outputs: the first owns the name, the
others are failures of stage ``write`` decided before any work (by every rank alike).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .fileio import sha256_file, to_jsonable, write_csv, write_json
from .volumes import output_stem

__all__ = [
    "CohortRun",
    "INPUT_KEYS",
    "PAIR_KEY",
    "RESULT_COLUMNS",
    "RankLogFilter",
    "all_gather",
    "all_reduce_sum",
    "distributed_rank",
    "failed_row",
    "log_rank",
    "ok_row",
    "quality_columns",
    "shard",
    "write_results",
]

logger = logging.getLogger(__name__)

#: The key of a pair item holding its 0-based position in the pair list (carried through loading and collation).
PAIR_KEY = "pair"
#: The file fields of a pair item whose content decides its result (recorded and compared on resume).
INPUT_KEYS = ("moving_image", "fixed_image", "moving_label", "moving_mask", "fixed_mask")
#: The measures of a quality record (:mod:`custom_nets.quality`) that ``results.csv`` carries.
QUALITY_COLUMNS = (
    "nmi", "lncc", "foreground_overlap", "keypoint_residual_mm", "keypoints_used", "inverse_consistency_mm",
    "mask_agreement",
)  # fmt: skip
#: The columns of ``results.csv``: one row per pair.
RESULT_COLUMNS = (
    PAIR_KEY,
    "moving",
    "fixed",
    "status",
    "stage",
    "error",
    "json",
    "verdict",
    "reasons",
    *QUALITY_COLUMNS,
)


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the default ``torch.distributed`` group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective call); ``[obj]`` alone."""
    world = distributed_rank()[1]
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of ``tensor`` (a collective call; with nccl the sum is made on this rank's GPU and
    returned on ``tensor``'s device); ``tensor`` itself alone."""
    if distributed_rank()[1] == 1:
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    total = tensor.detach().to(on).clone()
    dist.all_reduce(total)
    return total.to(tensor.device)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The share of ``items`` of process ``rank`` among ``world_size``: items ``rank, rank + world_size, ...``.

    Disjoint across ranks, together exactly ``items`` (no repeats, nothing dropped); shares differ by at most one.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}.")
    return list(items[rank::world_size])


def _input_signature(item: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the inputs of a pair: for every file field, its path, size and modification time (ns)."""
    out: dict[str, Any] = {}
    for key in INPUT_KEYS:
        path = item.get(key)
        if not path:
            continue
        try:
            st = os.stat(path)
            out[key] = {"path": str(path), "bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        except OSError:
            out[key] = {"path": str(path), "missing": True}
    return out


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


class CohortRun:
    """The plan of one batch-inference process: its share of the pairs, those already done, those to register.

    Args:
        pairs: the pair items in the list's order (e.g. :func:`~custom_nets.data.inference_pairs`): dicts with
            ``moving_image``, ``fixed_image`` and optional ``moving_label``, ``moving_mask``, ``fixed_mask``.
        output_dir: the folder the outputs go to (and earlier runs' outputs are looked for in).
        settings: the settings that decide a result (JSON-able mapping; e.g. ``run_settings`` of
            ``inference.json``). A complete pair made with other settings is registered again.
        weights: weight files the result depends on (their SHA-256 go into the fingerprint); missing files are
            left to the loader that reads them (recorded as missing here).
        resume: skip the pairs whose outputs are complete and were made by this run's settings, weights, code and
            inputs. ``False``: register every pair (overwriting earlier outputs).
        rank, world_size: this process's share; default: from the ``torch.distributed`` default group, if any.
        version: the code version recorded with the outputs (default: ``custom_nets.__version__``).

    Attributes:
        pairs: every pair, each with its list position under :data:`PAIR_KEY`.
        pending: this rank's pairs to register (list order).
        resumed: ``(pair, json record)`` of this rank's pairs found complete.
        clashes: failure records (stage ``write``) of this rank's pairs whose moving file name an earlier pair of
            the list uses.
        fingerprint: hex digest of settings, weights and version.
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        settings: Mapping[str, Any] | None = None,
        weights: Sequence[str | os.PathLike | None] = (),
        resume: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        version: str | None = None,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        self.rank, self.world_size = int(rank), int(world_size)
        self.output_dir, self.resume = Path(output_dir), bool(resume)
        self.pairs = [{**dict(p), PAIR_KEY: i} for i, p in enumerate(pairs)]
        if version is None:
            from .version import __version__ as version
        self.settings = to_jsonable(dict(settings or {}))
        self.weights_sha256 = {
            Path(w).name: sha256_file(w) if Path(w).is_file() else "missing" for w in weights if w
        }  # fmt: skip
        self.version = str(version)
        blob = json.dumps({"settings": self.settings, "weights": self.weights_sha256, "version": self.version},
                          sort_keys=True)  # fmt: skip
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.pending: list[dict[str, Any]] = []
        self.resumed: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.clashes: list[dict[str, Any]] = []
        self._signatures: dict[int, dict[str, Any]] = {}
        self._plan()

    def _plan(self) -> None:
        owner: dict[str, int] = {}
        first_of: dict[int, int] = {}
        for item in self.pairs:
            stem = output_stem(str(item.get("moving_image", "")))
            first_of[item[PAIR_KEY]] = owner.setdefault(stem, item[PAIR_KEY])
        mine = shard(self.pairs, self.rank, self.world_size)
        for item in mine:
            i = item[PAIR_KEY]
            if first_of[i] != i:
                stem = output_stem(str(item.get("moving_image", "")))
                self.clashes.append({
                    PAIR_KEY: i, "moving": item.get("moving_image"), "fixed": item.get("fixed_image"),
                    "stage": "write",
                    "error": f"another pair of this run (pair {first_of[i]}, same moving file name) already wrote "
                             f"outputs named {stem!r}; refusing to overwrite them",
                })  # fmt: skip
                continue
            self._signatures[i] = _input_signature(item)
            record = self._complete_record(item) if self.resume else None
            if record is not None:
                self.resumed.append((item, record))
            else:
                self.pending.append(item)
        share = f" (rank {self.rank} of {self.world_size}: {len(mine)} of the {len(self.pairs)} pairs)"
        share = share if self.world_size > 1 else ""
        if self.resume and self.resumed:
            logger.info(
                "%d of %d pairs already done in %s (same settings, weights, code and inputs)%s; registering the "
                "other %d", len(self.resumed), len(mine), self.output_dir, share, len(mine) - len(self.resumed),
            )  # fmt: skip
        elif share:
            logger.info("registering %d pairs%s", len(self.pending), share)

    def stamp(self, pair: int) -> dict[str, Any]:
        """The ``run`` record written into pair ``pair``'s JSON: what made it (see the module docs)."""
        signature = self._signatures.get(pair)
        if signature is None:
            signature = _input_signature(self.pairs[pair])
        return {
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "weights_sha256": self.weights_sha256,
            "custom_nets": self.version,
            "inputs": signature,
        }

    def _complete_record(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        """The JSON record of ``item``'s outputs if they are complete and made by this run; else ``None`` (a
        difference is logged)."""
        stem = output_stem(str(item.get("moving_image", "")))
        path = self.output_dir / f"{stem}.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            why = self._difference(path, record, item)
        except (OSError, ValueError) as err:
            why = f"{path} cannot be read ({type(err).__name__}: {err})"
        if why is None:
            return record
        logger.warning("pair %d (moving %s): %s; registering it again", item[PAIR_KEY], item.get("moving_image"), why)
        return None

    def _difference(self, path: Path, record: Any, item: Mapping[str, Any]) -> str | None:
        """Why ``record`` (the JSON at ``path``) is not this run's result for ``item`` (``None``: it is)."""
        run = record.get("run") if isinstance(record, Mapping) else None
        if not isinstance(run, Mapping):
            return f"{path} does not record what made it (an older version, or not an output of this bundle)"
        diffs: list[str] = []
        old, new = run.get("settings") or {}, self.settings
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{key}: {_short(old.get(key, '(unset)'))} -> {_short(new.get(key, '(unset)'))}")
        old_w, new_w = run.get("weights_sha256") or {}, self.weights_sha256
        for name in sorted(set(old_w) | set(new_w)):
            if old_w.get(name) != new_w.get(name):
                diffs.append(f"weights {name}: {str(old_w.get(name))[:12]} -> {str(new_w.get(name))[:12]}")
        if run.get("custom_nets") != self.version:
            diffs.append(f"custom_nets {run.get('custom_nets')} -> {self.version}")
        old_in, new_in = run.get("inputs") or {}, self._signatures.get(item[PAIR_KEY]) or _input_signature(item)
        for key in sorted(set(old_in) | set(new_in)):
            if old_in.get(key) != new_in.get(key):
                was, now = (old_in.get(key) or {}).get("path"), (new_in.get(key) or {}).get("path")
                diffs.append(f"{key}: {was} -> {now}" if was != now else f"{key}: {now} changed since")
        if diffs:
            return f"the outputs in {self.output_dir} were made otherwise ({'; '.join(diffs)})"
        outputs = record.get("outputs") or {}
        missing = [Path(p).name for p in outputs.values() if not (path.parent / Path(p).name).is_file()]
        if missing:
            return f"outputs listed in {path} are missing ({', '.join(missing)})"
        return None

    def gather(self, rows: Sequence[Any]) -> list[Any]:
        """Every rank's ``rows`` together (a collective call: every rank must make it), on every rank."""
        return [row for part in all_gather(list(rows)) for row in part]


class RankLogFilter(logging.Filter):
    """Prefix every log message with ``[rank r/w]`` (``torch.distributed`` rank and world size)."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world_size}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def log_rank() -> None:
    """Name the rank in every log line of this process (on the root logger's handlers, and on the handlers of the
    loggers that do not propagate); nothing without a ``torch.distributed`` group of more than one process."""
    rank, world = distributed_rank()
    if world <= 1:
        return
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger) and not lg.propagate
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, RankLogFilter) for f in handler.filters):
                handler.addFilter(RankLogFilter(rank, world))


def quality_columns(quality: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``results.csv`` columns of a quality record: verdict, reasons (joined), measures rounded to 4 digits."""
    if quality is None:
        return {}
    row: dict[str, Any] = {"verdict": quality.get("verdict", ""), "reasons": "; ".join(quality.get("reasons") or [])}
    for key in QUALITY_COLUMNS:
        value = quality.get(key)
        row[key] = "" if value is None else round(float(value), 4)
    return row


def ok_row(pair: int, moving: str, fixed: str, json_path: str, quality: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``results.csv`` row of a registered pair."""
    return {PAIR_KEY: pair, "moving": moving, "fixed": fixed, "status": "ok", "json": json_path,
            **quality_columns(quality)}  # fmt: skip


def failed_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``results.csv`` row of a failure record (``pair``, ``moving``, ``fixed``, ``stage``, ``error`` and,
    for a suspect result refused, its ``quality``)."""
    row = {k: v for k, v in record.items() if k != "quality"}
    return {**row, "status": "failed", "json": "", **quality_columns(record.get("quality"))}


def write_results(
    output_dir: str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
    run: CohortRun | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``results.csv`` (one row per pair, :data:`RESULT_COLUMNS`) and ``failures.json`` of a batch run.

    With a ``run``, this process's rows are completed by the pairs the plan found done (rows rebuilt from their
    JSON) and its name clashes, every rank's rows are gathered (a collective call: every rank makes it), and rank 0
    alone writes. Returns every row and failure record, sorted by pair (on every rank)."""
    output_dir = Path(output_dir)
    results, failures = [dict(r) for r in results], [dict(f) for f in failures]
    if run is not None:
        for item, record in run.resumed:
            json_path = str(output_dir / f"{output_stem(str(item['moving_image']))}.json")
            results.append(
                ok_row(item[PAIR_KEY], item["moving_image"], item["fixed_image"], json_path, record.get("quality"))
            )
        failures += [dict(c) for c in run.clashes]
        results += [failed_row(c) for c in run.clashes]
        results = sorted(run.gather(results), key=lambda r: r[PAIR_KEY])
        failures = sorted(run.gather(failures), key=lambda r: r[PAIR_KEY])
    if run is None or run.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(output_dir / "results.csv", results, RESULT_COLUMNS)
        write_json(output_dir / "failures.json", failures)
    return results, failures
