"""Checks that input images are usable, each error naming the file: header checks before a run, checked loading,
and the checks of a loaded pair (overlap in world space, each label on its image's grid).

Affines are voxel-to-world ``(4, 4)`` matrices (voxel indices to world mm, RAS+ for NIfTI), as in
:mod:`custom_nets.geometry`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

__all__ = [
    "LoadVolumed",
    "CheckLabelGridd",
    "CheckWorldOverlapd",
    "affine_problem",
    "check_image_header",
    "check_image_headers",
    "nibabel_reads",
    "world_bounding_box",
]

logger = logging.getLogger(__name__)

_NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".hdr", ".img")


def nibabel_reads(path: str | Path) -> bool:
    """Whether ``path`` names a format nibabel reads (by suffix: NIfTI, MGH / MGZ, Analyze)."""
    return str(path).lower().endswith(_NIBABEL_SUFFIXES)


def _nibabel_affine(path: str | Path) -> np.ndarray | None:
    """The voxel-to-world affine nibabel reads from a file's header (NIfTI precedence: sform, then qform), or
    ``None`` for formats nibabel does not read or headers it cannot parse (their loading errors come from MONAI)."""
    if not nibabel_reads(path):
        return None
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception:  # MONAI read the file; its own affine is checked instead
        return None


def affine_problem(affine: Any) -> str | None:
    """What is wrong with a ``4 x 4`` voxel-to-world affine (singular or not finite), or ``None``."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(a).all() or abs(float(np.linalg.det(a[:3, :3]))) < 1e-9:
        return "the voxel-to-world affine is singular or not finite"
    return None


def _check_affine(path: Any, affine: np.ndarray) -> None:
    problem = affine_problem(affine)
    if problem:
        raise ValueError(
            f"{path}: {problem} ({np.round(affine, 4).tolist()}); expected a valid header (pixel sizes and "
            "orientation)."
        )


class LoadVolumed(MapTransform):
    """Load 3D images with MONAI ``LoadImaged`` (channel first) and fail with the file named on anything unusable.

    Errors (``ValueError`` / ``FileNotFoundError``, message starting with the path): missing file, unreadable or
    corrupt file, not a single-channel 3D volume (2D, 4D / multi-channel; a 4D file with a single volume
    ``(I, J, K, 1)`` is accepted), a voxel-to-world affine that is singular or not finite, an inconsistent NIfTI
    header (MONAI's header correction would give another affine than the NIfTI standard, which the outputs use),
    NaN or Inf voxels, and (unless ``reject_constant=False``, e.g. for label maps that may be empty) a constant image.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, reject_constant: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reject_constant = bool(reject_constant)
        self._loader = LoadImaged(keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, Path)):
                continue  # already loaded
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file (key '{key}').")
            try:
                img = self._loader({key: str(path)})[key]
            except Exception as err:  # nibabel / MONAI raise many types for damaged files
                raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from err
            if img.ndim != 4 or img.shape[0] != 1:
                spatial = tuple(img.shape[1:]) if img.ndim >= 2 else tuple(img.shape)
                raise ValueError(
                    f"{path}: expected a single-channel 3D volume, got {img.shape[0]} channel(s) of spatial shape "
                    f"{spatial} (2D images and 4D / multi-channel series are not supported)."
                )
            if min(img.shape[1:]) < 2:
                raise ValueError(f"{path}: expected a 3D volume, got spatial shape {tuple(img.shape[1:])}.")
            affine = torch.as_tensor(getattr(img, "affine", torch.eye(4)), dtype=torch.float64)
            _check_affine(path, affine.numpy())
            header_affine = _nibabel_affine(path)
            if header_affine is not None:
                _check_affine(path, header_affine)
                if not np.allclose(header_affine, affine.numpy(), rtol=1e-4, atol=1e-3):
                    raise ValueError(
                        f"{path}: inconsistent header: its pixel sizes (pixdim) disagree with its sform / qform, and "
                        f"MONAI would read the affine {np.round(affine.numpy(), 4).tolist()} where the NIfTI standard "
                        f"(nibabel, used for the outputs) gives {np.round(header_affine, 4).tolist()}; expected a "
                        "consistent header (fix pixdim, sform and qform)."
                    )
            finite = torch.isfinite(img)
            if not finite.all():
                n_nan = int(torch.isnan(img).sum())
                raise ValueError(
                    f"{path}: contains NaN or Inf voxels ({n_nan} NaN, {int((~finite).sum()) - n_nan} infinite, of "
                    f"{img.numel()}); expected finite intensities."
                )
            del finite
            if self.reject_constant and img.numel() and bool(img.max() == img.min()):
                raise ValueError(
                    f"{path}: every voxel is {float(img.min()):g} (a constant image has nothing to register)."
                )
            d[key] = img
        return d


def check_image_header(path: str | Path) -> str | None:
    """The problem with an image file that its header alone shows, or ``None``.

    Reads only the header (cheap, even for large compressed files): a missing file, a file that is not an image, a
    shape that is not a single-channel 3D volume, or a singular / non-finite affine. Content faults (truncated data,
    NaN voxels, a constant image) are found by :class:`~custom_nets.data.LoadVolumed` when the image is loaded.
    Files nibabel does not read (by suffix) are not checked here.
    """
    path = Path(path)
    if not path.is_file():
        return "no such file"
    if not nibabel_reads(path):
        return None
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as err:
        return f"cannot be read as an image ({type(err).__name__}: {err})"
    if len(shape) < 3 or min(shape[:3]) < 2 or any(n != 1 for n in shape[3:]):
        return f"expected a single-channel 3D volume, got shape {shape}"
    return affine_problem(affine)


def check_image_headers(paths: Sequence[str | Path]) -> None:
    """Check the header of every file (see :func:`check_image_header`) before a training run starts.

    Raises:
        ValueError: listing every bad file with its problem, so that a run over thousands of images fails at the
            start rather than hours in.
    """
    problems = [f"{p}: {why}" for p in dict.fromkeys(str(p) for p in paths) if (why := check_image_header(p))]
    if problems:
        raise ValueError(f"{len(problems)} of the listed image files are unusable:\n" + "\n".join(problems))


def world_bounding_box(shape: Sequence[int], affine: Any) -> np.ndarray:
    """``(2, 3)`` world (mm) corners ``[min, max]`` of the axis-aligned box around a grid's field of view.

    The field of view spans voxel centres ``0 .. n-1`` plus half a voxel on each side; for oblique grids the box is the
    bounding box of the eight rotated corners (so it contains the field of view)."""
    n = np.asarray([int(v) for v in shape[-3:]], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, m - 0.5] for m in n], indexing="ij")).reshape(3, -1).T
    a = np.asarray(affine, dtype=np.float64)
    world = corners @ a[:3, :3].T + a[:3, 3]
    return np.stack([world.min(0), world.max(0)])


class CheckWorldOverlapd(MapTransform):
    """Check that two loaded images (e.g. ``fixed_image`` and ``moving_image``) overlap in world space.

    Disjoint fields of view usually mean a header problem (e.g. images from different scanner frames), or simply a
    large offset. KeyMorph itself does not need the overlap: each image is cropped to its own foreground and its
    keypoints are mapped to world mm through its own affine, so any translation is recovered (the tests register a
    pair 1 m apart exactly). Hence the default only warns; ``on_disjoint="error"`` makes it an error for pipelines
    whose images are expected to be pre-aligned in world space.

    Args:
        keys: the image keys (loaded ``MetaTensor`` with affines, channel first): two, or one (nothing to compare:
            the check passes, so one preprocessing list serves pairs and single scans).
        on_disjoint: ``"warn"`` (log a warning naming both files), ``"error"`` (``ValueError`` naming both files)
            or ``"ignore"``.
        allow_missing_keys: skip the check if a key is missing.
    """

    _MODES = ("warn", "error", "ignore")

    def __init__(self, keys: KeysCollection, on_disjoint: str = "warn", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) not in (1, 2):
            raise ValueError(f"CheckWorldOverlapd: expected one or two image keys, got {self.keys}.")
        if on_disjoint not in self._MODES:
            raise ValueError(f"CheckWorldOverlapd: expected on_disjoint in {self._MODES}, got {on_disjoint!r}.")
        self.on_disjoint = on_disjoint

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if self.on_disjoint == "ignore" or len(present) != 2:
            return d
        boxes, names = [], []
        for key in present:
            img = d[key]
            boxes.append(world_bounding_box(img.shape, getattr(img, "affine", np.eye(4))))
            names.append(str(getattr(img, "meta", {}).get("filename_or_obj", key)))
        (lo_a, hi_a), (lo_b, hi_b) = boxes
        gap = np.maximum(np.maximum(lo_a - hi_b, lo_b - hi_a), 0.0)
        if (gap > 0).any():
            msg = (
                f"{names[0]} ({present[0]}) and {names[1]} ({present[1]}) do not overlap in world space: their "
                f"fields of view are {float(np.linalg.norm(gap)):.1f} mm apart (world boxes "
                f"{np.round(boxes[0], 1).tolist()} and {np.round(boxes[1], 1).tolist()} mm)"
            )
            if self.on_disjoint == "error":
                raise ValueError(msg + "; expected images that overlap (check their headers).")
            logger.warning("%s; registering anyway (KeyMorph recovers any translation).", msg)
        return d


class CheckLabelGridd(MapTransform):
    """Check that each loaded label map lies on its image's voxel grid (same shape and voxel-to-world affine).

    The preprocessing crops a label with its image's foreground box and the losses warp it with its image's affine,
    so a label on another grid (another resolution, a cropped or reoriented export) would silently misalign Dice.

    Args:
        keys: label keys (loaded ``MetaTensor`` with affines, channel first).
        image_keys: the image key of each label key, in order.
        atol: tolerance of the affine entries (mm; NIfTI headers store float32).
    """

    def __init__(
        self, keys: KeysCollection, image_keys: Sequence[str], atol: float = 1e-3, allow_missing_keys: bool = True
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(image_keys) != len(self.keys):
            raise ValueError(f"CheckLabelGridd: expected one image key per label key {self.keys}, got {image_keys}.")
        self.image_keys, self.atol = dict(zip(self.keys, image_keys)), float(atol)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image_key = self.image_keys[key]
            if d.get(image_key) is None:
                continue
            lab, img = d[key], d[image_key]
            a_lab = np.asarray(getattr(lab, "affine", np.eye(4)), dtype=np.float64)
            a_img = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
            if tuple(lab.shape[1:]) != tuple(img.shape[1:]) or not np.allclose(a_lab, a_img, atol=self.atol):
                pairs = ((lab, key), (img, image_key))
                names = [str(getattr(x, "meta", {}).get("filename_or_obj", k)) for x, k in pairs]
                raise ValueError(
                    f"{names[0]}: expected the label map on the grid of its image {names[1]}, got shape "
                    f"{tuple(lab.shape[1:])} and affine {np.round(a_lab, 4).tolist()} for an image of shape "
                    f"{tuple(img.shape[1:])} and affine {np.round(a_img, 4).tolist()} (resample the label onto the "
                    "image's grid, nearest neighbour)."
                )
        return d
