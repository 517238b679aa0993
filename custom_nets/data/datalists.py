"""Lists of real images and pairs: MONAI-style datalist JSON, pair lists, IXI-style folders, and pairs drawn from
image records (with their world-mm ground truth when the records carry ``world_from_template``)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IXI_MODALITIES", "load_datalist", "load_pair_list", "sample_pairs", "scan_ixi_folder"]

#: IXI file-name suffixes this package reads, and the modality names they map to.
IXI_MODALITIES = {"T1": "t1", "T2": "t2", "PD": "pd"}
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_SPLIT_KEYS = ("training", "validation", "test")


def _resolve(base: Path, value: str, source: str, must_exist: bool = True) -> str:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (listed in {source}).")
    return str(path)


def _read_json(path: str | Path, what: str) -> tuple[Path, Any]:
    """Read a JSON file; errors name the file and say what it should have been."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found.")
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON {what} ({err}).") from err


def load_datalist(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Read a MONAI-style datalist JSON of images.

    The file holds either a list of entries or a dict with lists under ``"training"`` / ``"validation"`` / ``"test"``
    (pick one with ``split``; ``None`` concatenates all). An entry is ``{"image": path, "label": path (optional),
    "modality": "t1" (optional), "subject": id (optional), "world_from_template": 4 x 4 (optional), ...}``; other
    keys are kept. ``world_from_template`` maps a common frame (e.g. a template's world mm) to the image's world mm:
    when every record has it, pairs carry their ground truth (validation then reports the error in mm); an identity
    claims the image is already aligned in world space with the others. Relative paths are resolved against the JSON
    file's folder; every file must exist.

    Returns:
        The entries with absolute paths, ``modality`` (lower case, ``"unknown"`` if absent) and ``subject`` (default:
        the image file name) filled in.

    Raises:
        FileNotFoundError: the JSON or a listed file is missing (the message names it).
        ValueError: the JSON is malformed, the split is absent, or an entry has no ``image``.
    """
    path, content = _read_json(path, "datalist")
    if isinstance(content, list):
        if split is not None:
            raise ValueError(f"{path}: is a plain list, it has no split {split!r}.")
        entries = content
    elif isinstance(content, Mapping):
        if split is None:
            entries = [e for key in _SPLIT_KEYS for e in content.get(key, [])]
        elif split in content:
            entries = content[split]
        else:
            raise ValueError(f"{path}: has no split {split!r} (found {sorted(k for k in content)}).")
    else:
        raise ValueError(f"{path}: expected a list of entries or a dict of splits, got {type(content).__name__}.")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}, entry {i}"
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise ValueError(f"{where}: expected an object with an 'image' path, got {entry!r}.")
        rec = dict(entry)
        rec["image"] = _resolve(path.parent, rec["image"], where)
        if rec.get("label"):
            rec["label"] = _resolve(path.parent, rec["label"], where)
        rec["modality"] = str(rec.get("modality", "unknown")).lower()
        rec["subject"] = str(rec.get("subject", Path(rec["image"]).name))
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no entries" + (f" in split {split!r}." if split else "."))
    return out


def load_pair_list(path: str | Path, key: str = "test_pairs", must_exist: bool = True) -> list[dict[str, Any]]:
    """Read a list of registration pairs from a datalist JSON (e.g. the demo set's ``test_pairs``).

    Entries hold ``fixed_image`` and ``moving_image`` paths, optional ``fixed_label`` / ``moving_label``, and any
    other keys (e.g. the ground truth ``fixed_to_moving_ras``), kept as they are. Relative paths are resolved against
    the JSON's folder; every file must exist unless ``must_exist=False`` (batch inference reports a missing file as
    that pair's failure instead of refusing the whole list).
    """
    path, content = _read_json(path, "pair list")
    entries = content if isinstance(content, list) else content.get(key) if isinstance(content, Mapping) else None
    if not entries:
        raise ValueError(f"{path}: no pairs (expected a list, or a non-empty list under {key!r}).")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}, pair {i}"
        if not isinstance(entry, Mapping) or "fixed_image" not in entry or "moving_image" not in entry:
            raise ValueError(f"{where}: expected an object with 'fixed_image' and 'moving_image' paths, got {entry!r}.")
        rec = dict(entry)
        for k in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
            if rec.get(k):
                rec[k] = _resolve(path.parent, rec[k], where, must_exist)
        out.append(rec)
    return out


def scan_ixi_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Entries for an IXI-style folder: ``IXI002-Guys-0828-T1.nii.gz`` -> subject ``IXI002-Guys-0828``, ``t1``.

    T1, T2 and PD files are listed (MRA, DTI and other names are skipped); a label ``<stem>_label.nii[.gz]`` or
    ``<stem>-label.nii[.gz]`` next to an image is attached.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no T1 / T2 / PD NIfTI file was found in it.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder.")
    pattern = re.compile(r"^(?P<subject>.+)-(?P<mod>" + "|".join(IXI_MODALITIES) + r")$", re.IGNORECASE)
    out = []
    for file in sorted(folder.iterdir()):
        if not _NIFTI.search(file.name):
            continue
        stem = _NIFTI.sub("", file.name)
        match = pattern.match(stem)
        if not match:
            continue
        rec: dict[str, Any] = {
            "image": str(file),
            "modality": IXI_MODALITIES[match["mod"].upper()],
            "subject": match["subject"],
        }
        for suffix in ("_label", "-label"):
            for ext in (".nii.gz", ".nii"):
                label = folder / f"{stem}{suffix}{ext}"
                if label.is_file():
                    rec["label"] = str(label)
        out.append(rec)
    if not out:
        raise ValueError(f"{folder}: no IXI-style T1 / T2 / PD NIfTI files (e.g. IXI002-Guys-0828-T1.nii.gz).")
    return out


def sample_pairs(
    records: Sequence[Mapping[str, Any]],
    num_pairs: int,
    same_subject_prob: float = 0.5,
    cross_contrast_prob: float = 0.5,
    seed: int = 0,
    item_seeds: bool = False,
) -> list[dict[str, Any]]:
    """Draw (fixed, moving) pairs from image records (as returned by :func:`load_datalist`).

    Each pair is same-subject with probability ``same_subject_prob`` and cross-contrast with probability
    ``cross_contrast_prob``, when the records allow it (otherwise the closest possible pair is taken). A pair never
    uses the same image twice unless there is only one image.

    Returns:
        Dicts with ``fixed_image``, ``moving_image`` (paths), ``fixed_label`` / ``moving_label`` when both images have
        labels, ``fixed_modality``, ``moving_modality``, ``fixed_subject``, ``moving_subject``; ``fixed_to_moving``
        (4 x 4 list, world mm) when both records carry ``world_from_template`` (a ground truth, as in the demo set);
        and a per-pair ``seed`` if ``item_seeds`` (fixed augmentation per pair, for evaluation sets).
    """
    if not records:
        raise ValueError("sample_pairs: no records to pair.")
    rng = np.random.default_rng(seed)
    recs = list(records)
    pairs = []
    for _ in range(int(num_pairs)):
        f = recs[int(rng.integers(len(recs)))]
        same_subj = rng.random() < same_subject_prob
        cross = rng.random() < cross_contrast_prob
        candidates = [r for r in recs if r is not f]
        if not candidates:
            candidates = [f]
        scores = [
            int((r["subject"] == f["subject"]) == same_subj) + int((r["modality"] != f["modality"]) == cross)
            for r in candidates
        ]
        pool = [r for r, sc in zip(candidates, scores) if sc == max(scores)]
        m = pool[int(rng.integers(len(pool)))]
        pair: dict[str, Any] = {
            "fixed_image": f["image"],
            "moving_image": m["image"],
            "fixed_modality": f["modality"],
            "moving_modality": m["modality"],
            "fixed_subject": f["subject"],
            "moving_subject": m["subject"],
        }
        if f.get("label") and m.get("label"):
            pair["fixed_label"], pair["moving_label"] = f["label"], m["label"]
        if "world_from_template" in f and "world_from_template" in m:
            gt = np.asarray(m["world_from_template"]) @ np.linalg.inv(np.asarray(f["world_from_template"]))
            pair["fixed_to_moving"] = gt.tolist()
        if item_seeds:
            pair["seed"] = int(rng.integers(2**31))
        pairs.append(pair)
    return pairs
