"""The scans of a cohort (groupwise registration): from a list, a folder or a JSON file, with optional labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["cohort_images", "cohort_labels"]


def _json_items(path: Path) -> list[Any]:
    content = json.loads(path.read_text())
    items = content.get("images") if isinstance(content, dict) else content
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a list of images or {{'images': [...]}}, got {type(content).__name__}.")
    return items


def _resolve(path: Path, value: Any) -> str:
    return str(value if Path(str(value)).is_absolute() else path.parent / str(value))


def cohort_images(images: Any) -> list[str]:
    """The cohort's image paths from a list of paths, a folder (its ``.nii`` / ``.nii.gz`` files, sorted), or a JSON
    file holding a list of paths or of ``{"image": path[, "label": path]}`` items, or ``{"images": [...]}``
    (relative paths are taken from the JSON file's folder).

    Raises:
        ValueError: nothing given, a folder without NIfTI files, or a JSON file of another shape (named)."""
    if images is None or (isinstance(images, (list, tuple)) and not images):
        raise ValueError("groupwise: expected --images (a list of paths, a folder or a JSON file), got nothing.")
    if isinstance(images, (list, tuple)):
        return [str(p) for p in images]
    path = Path(str(images))
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.name.lower().endswith((".nii", ".nii.gz")))
        if not found:
            raise ValueError(f"groupwise: the folder {path} holds no .nii / .nii.gz files.")
        return found
    if path.suffix.lower() == ".json":
        return [_resolve(path, item["image"] if isinstance(item, dict) else item) for item in _json_items(path)]
    return [str(path)]


def cohort_labels(images: Any, labels: Any, count: int) -> list[str | None]:
    """Each scan's label map (``None`` where it has none): ``labels`` (a list, one per image, ``None`` entries
    allowed), else the ``"label"`` of the items of a JSON ``images`` file, else none.

    Raises:
        ValueError: a ``labels`` list whose length is not the number of images (both named)."""
    if labels is not None:
        labels = list(labels) if isinstance(labels, (list, tuple)) else [labels]
        if len(labels) != count:
            raise ValueError(f"groupwise: expected one label per image ({count}), got {len(labels)} labels.")
        return [None if lab in (None, "") else str(lab) for lab in labels]
    path = Path(str(images)) if isinstance(images, (str, Path)) else None
    if path is not None and path.suffix.lower() == ".json" and path.is_file():
        items = _json_items(path)
        return [_resolve(path, i["label"]) if isinstance(i, dict) and i.get("label") else None for i in items]
    return [None] * count
