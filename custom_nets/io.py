"""Results out: atomic file writing, JSON, ITK affine transform files and registration preview PNGs.

Coordinate convention (see :mod:`custom_nets.geometry`): world points are RAS+ millimetres given by each image's
4 x 4 voxel-to-world affine, and a ``fixed_to_moving`` matrix maps a world point of the fixed image to the
corresponding world point of the moving image (the pull-back used for resampling the moving image onto the fixed
grid). ITK uses LPS+ physical points and stores, for a registration, exactly that fixed-to-moving direction, so the
ITK file of a RAS matrix ``T`` holds ``L T L`` with ``L = diag(-1, -1, 1, 1)``.

Every writer here is atomic: the output is first written to a temporary file in the destination folder and then
renamed into place, so a crash or an exception never leaves a half-written file under the final name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .geometry import LPS_FROM_RAS, as_tensor

if TYPE_CHECKING:  # matplotlib is imported lazily, inside the plotting functions
    from matplotlib.figure import Figure

__all__ = [
    "atomic_write",
    "sha256_file",
    "to_jsonable",
    "write_json",
    "write_csv",
    "write_itk_affine",
    "read_itk_affine",
    "registration_figure",
    "save_registration_png",
]

PathLike = str | os.PathLike

#: RAS+ <-> LPS+ (its own inverse), as a float64 numpy matrix.
_LPS_FROM_RAS = LPS_FROM_RAS.numpy()  # the one definition, in geometry

_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_WRITE_TYPE = "AffineTransform_double_3_3"
#: Transform types read by :func:`read_itk_affine`: all of them are ``T(x) = M (x - c) + c + t``.
_ITK_READ_TYPES = (
    "AffineTransform_double_3_3",
    "MatrixOffsetTransformBase_double_3_3",
    "AffineTransform_float_3_3",
    "MatrixOffsetTransformBase_float_3_3",
)
_ITK_TEXT_SUFFIXES = (".tfm", ".txt")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

#: Size of the registration preview figure in inches (the PNG has ``dpi`` pixels per inch).
_FIGSIZE = (11.0, 11.0)
#: Marker area (points^2) of the keypoint with the largest weight.
_MAX_MARKER_AREA = 60.0


# ----------------------------------------------------------------------------------------------------------------------
# atomic writing and JSON


def _temporary_suffix(path: Path) -> str:
    """The final suffix of ``path`` (two for compressed files such as ``.nii.gz``), for format-sniffing writers."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSION_SUFFIXES:
        return "".join(suffixes[-2:])
    return path.suffix


def _reserve_temporary(path: Path) -> Path:
    """Create an empty, uniquely named ``.tmp-*`` file next to ``path`` (permissions follow the umask)."""
    suffix = _temporary_suffix(path)
    while True:
        tmp = path.parent / f".tmp-{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        os.close(fd)
        return tmp


def atomic_write(path: PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write a file atomically: ``write_fn(tmp)`` writes a temporary file that is then renamed to ``path``.

    The temporary file lives in the destination folder (so the rename is atomic on POSIX and Windows), is named
    ``.tmp-<random><suffix>`` where ``<suffix>`` is the final suffix of ``path`` (e.g. ``.png``, or ``.nii.gz``), so
    writers that infer the format from the file name work, and exists (empty) when ``write_fn`` is called. Parent
    folders of ``path`` are created. If ``write_fn`` or the rename raises (any exception, including
    ``KeyboardInterrupt``), the temporary file is removed and the exception re-raised: ``path`` then keeps its previous
    content, or still does not exist. (Atomic with respect to the process failing; no ``fsync`` is done.)

    Args:
        path: the final file name.
        write_fn: called with the temporary path; must write the complete content there (its return value is ignored).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temporary(path)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Recursively convert ``obj`` to plain JSON types.

    numpy / torch scalars become Python ``int`` / ``float`` / ``bool``, numpy arrays and tensors become (nested)
    lists, tuples and sets become lists, paths become strings, and mapping keys that are numpy scalars or paths become
    plain keys. Anything else is returned unchanged (``json`` then raises ``TypeError`` if it cannot encode it).
    """
    if obj is None or (isinstance(obj, (str, bool, int, float)) and not isinstance(obj, np.generic)):
        return obj
    if isinstance(obj, torch.Tensor):
        return to_jsonable(as_tensor(obj).detach().cpu().tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    return obj


def _json_key(key: Any) -> Any:
    if isinstance(key, torch.Tensor) and key.numel() == 1:
        return key.item()
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, PurePath):
        return str(key)
    return key


def _write_text(path: Path, text: str) -> None:
    """The text writer used by the atomic writers of this module (UTF-8)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with the header ``columns`` (other keys ignored) atomically; returns the path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: _write_text(Path(tmp), text))


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, UTF-8, trailing newline) atomically; see :func:`to_jsonable` for conversions.

    The content is serialised before anything is written, so an unserialisable object leaves no file behind.
    Non-finite floats (NaN, Infinity) are refused with ``ValueError``: they are not JSON, and a result holding them
    must not look like a result.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    try:
        text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    except ValueError as err:
        raise ValueError(f"{path}: refusing to write non-finite values (NaN / Inf) as JSON ({err}).") from err
    return atomic_write(path, lambda tmp: _write_text(tmp, text))


# ----------------------------------------------------------------------------------------------------------------------
# ITK transform files


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = as_tensor(x).detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _check_affine_matrix(matrix: Any, what: str) -> np.ndarray:
    """``matrix`` as a float64 ``(4, 4)`` homogeneous affine (finite, last row ``(0, 0, 0, 1)``) or ValueError."""
    try:
        m = _as_numpy(matrix).astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected {what} as a 4 x 4 numeric matrix, got {type(matrix).__name__}: {err}") from err
    if m.shape != (4, 4):
        raise ValueError(f"expected {what} of shape (4, 4), got shape {m.shape}.")
    if not np.isfinite(m).all():
        raise ValueError(f"expected a finite {what}, got non-finite entries: {m.tolist()}.")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-9):
        raise ValueError(f"expected {what} with last row (0, 0, 0, 1) (an affine), got last row {m[3].tolist()}.")
    m[3] = [0.0, 0.0, 0.0, 1.0]
    return m


def _format_floats(values: np.ndarray) -> str:
    return " ".join(repr(float(v)) for v in np.ravel(values))  # shortest repr that round-trips exactly


def write_itk_affine(path: PathLike, fixed_to_moving_ras: np.ndarray | torch.Tensor) -> Path:
    """Write a world ``fixed_to_moving`` affine as an ITK text transform file (``.tfm``), atomically.

    ITK's physical space is LPS+ and an ITK registration transform maps points of the fixed image to points of the
    moving image (the direction ``itk::ResampleImageFilter`` / ``sitk.Resample(moving, fixed, transform)`` expects,
    as ANTs and elastix also write it), so the file holds ``L @ T @ L`` with ``L = diag(-1, -1, 1, 1)``: one
    ``AffineTransform_double_3_3`` whose ``Parameters`` are the 3 x 3 matrix row-major then the translation, with
    ``FixedParameters: 0 0 0`` (centre of rotation at the origin). Numbers are written at full double precision.

    Args:
        path: output file; ITK picks the format from the suffix, which must be ``.tfm`` or ``.txt`` (text format).
        fixed_to_moving_ras: ``(4, 4)`` matrix mapping fixed RAS+ world mm to moving RAS+ world mm (numpy or torch).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if the matrix is not a finite ``(4, 4)`` affine with last row ``(0, 0, 0, 1)``, or the suffix is
            not a text-transform suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in _ITK_TEXT_SUFFIXES:
        raise ValueError(
            f"ITK chooses the transform file format from the suffix; use one of {_ITK_TEXT_SUFFIXES} for the text "
            f"format, got {path.name!r}."
        )
    t_ras = _check_affine_matrix(fixed_to_moving_ras, "fixed_to_moving_ras")
    t_lps = _LPS_FROM_RAS @ t_ras @ _LPS_FROM_RAS  # exact: only sign flips
    text = (
        f"{_ITK_HEADER}\n"
        "#Transform 0\n"
        f"Transform: {_ITK_WRITE_TYPE}\n"
        f"Parameters: {_format_floats(t_lps[:3, :3])} {_format_floats(t_lps[:3, 3])}\n"
        "FixedParameters: 0 0 0\n"
    )
    return atomic_write(path, lambda tmp: _write_text(tmp, text))


def _parse_floats(values: str, count: int, key: str, path: Path, line_no: int) -> np.ndarray:
    try:
        out = np.array([float(v) for v in values.split()], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: line {line_no}: {key} must be numbers, got {values!r}.") from err
    if out.shape != (count,):
        raise ValueError(f"{path}: line {line_no}: expected {count} {key}, got {out.size}.")
    if not np.isfinite(out).all():
        raise ValueError(f"{path}: line {line_no}: {key} contain non-finite values: {values!r}.")
    return out


def read_itk_affine(path: PathLike) -> np.ndarray:
    """Read an ITK text transform file holding one affine; returns the ``(4, 4)`` ``fixed_to_moving`` RAS+ matrix.

    The inverse of :func:`write_itk_affine`. Accepts any ITK text file (``#Insight Transform File V1.0``) with exactly
    one ``AffineTransform_double_3_3`` or ``MatrixOffsetTransformBase_double_3_3`` (or their ``float`` variants), whose
    ``FixedParameters`` (the centre ``c``, default ``0 0 0``) may be non-zero: ITK's transform is
    ``T(x) = M (x - c) + c + t`` in LPS+, i.e. the homogeneous matrix ``[[M, t + c - M c], [0, 1]]``, returned as
    ``L @ T @ L`` (RAS+) with ``L = diag(-1, -1, 1, 1)``.

    Args:
        path: a ``.tfm`` / ``.txt`` ITK text transform file.

    Returns:
        float64 ``(4, 4)`` matrix mapping fixed RAS+ world mm to moving RAS+ world mm.

    Raises:
        ValueError: naming the file, for binary files, other or several transforms, or malformed parameters.
        OSError: if the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not an ITK text transform file (binary content; .mat / .h5 transforms are not supported)."
        ) from err

    transforms: list[dict[str, Any]] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("Transform", "Parameters", "FixedParameters"):
            raise ValueError(f"{path}: line {line_no}: not an ITK text transform file line: {line[:80]!r}.")
        if key == "Transform":
            transforms.append({"Transform": value, "line": line_no})
            continue
        if not transforms:
            raise ValueError(f"{path}: line {line_no}: {key} before any 'Transform:' line.")
        if key in transforms[-1]:
            raise ValueError(f"{path}: line {line_no}: duplicate {key} for one transform.")
        transforms[-1][key] = (value, line_no)

    if len(transforms) != 1:
        kinds = ", ".join(t["Transform"] for t in transforms) or "none"
        raise ValueError(f"{path}: expected exactly one ITK transform, found {len(transforms)} ({kinds}).")
    entry = transforms[0]
    kind = entry["Transform"]
    if kind not in _ITK_READ_TYPES:
        raise ValueError(f"{path}: unsupported ITK transform type {kind!r}; expected one of {_ITK_READ_TYPES}.")
    if "Parameters" not in entry:
        raise ValueError(f"{path}: the {kind} has no 'Parameters:' line.")
    params = _parse_floats(entry["Parameters"][0], 12, "Parameters", path, entry["Parameters"][1])
    if "FixedParameters" in entry:
        centre = _parse_floats(entry["FixedParameters"][0], 3, "FixedParameters", path, entry["FixedParameters"][1])
    else:
        centre = np.zeros(3)

    matrix = params[:9].reshape(3, 3)
    t_lps = np.eye(4)
    t_lps[:3, :3] = matrix
    t_lps[:3, 3] = params[9:] + centre - matrix @ centre
    return _LPS_FROM_RAS @ t_lps @ _LPS_FROM_RAS


# ----------------------------------------------------------------------------------------------------------------------
# registration preview PNG


def _volume(x: Any, name: str) -> np.ndarray:
    """A 3D float32 array from numpy / torch input, dropping singleton leading or trailing (``(I, J, K, 1)``) axes."""
    a = _as_numpy(x)
    while a.ndim > 3 and (a.shape[0] == 1 or a.shape[-1] == 1):
        a = a[0] if a.shape[0] == 1 else a[..., 0]
    if a.ndim != 3 or min(a.shape) < 1:
        raise ValueError(f"expected {name} as a 3D array (I, J, K), got shape {tuple(_as_numpy(x).shape)}.")
    return np.asarray(a, dtype=np.float32)


def _points(x: Any, name: str) -> np.ndarray:
    p = _as_numpy(x).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"expected {name} of shape (K, 3) in world mm, got shape {p.shape}.")
    return p


def _robust_range(img: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Intensity percentiles of a volume (on a subsample of at most ~1e6 voxels, ignoring non-finite values)."""
    step = max(1, int(math.ceil((img.size / 1e6) ** (1 / 3))))
    sub = img[::step, ::step, ::step]
    sub = sub[np.isfinite(sub)]
    if sub.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sub, [low, high]))
    if hi <= lo:  # e.g. a mostly empty image: fall back to the full range
        lo, hi = float(sub.min()), float(sub.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _normalise(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.nan_to_num((x - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _intensity_centre(volume: np.ndarray, lo: float, hi: float, slab_voxels: int = 1 << 22) -> tuple[int, int, int]:
    """Voxel index of the intensity-weighted centre of ``volume`` scaled by :func:`_normalise` with ``(lo, hi)``
    (grid centre if empty). The scaled volume is never held whole: it is built slab by slab along axis 0, so a large
    field of view costs no full-size float copies."""
    profiles = [np.zeros(n, dtype=np.float64) for n in volume.shape]
    step = max(1, slab_voxels // max(1, volume.shape[1] * volume.shape[2]))
    for i0 in range(0, volume.shape[0], step):
        norm = _normalise(volume[i0 : i0 + step], lo, hi)
        profiles[0][i0 : i0 + norm.shape[0]] += norm.sum(axis=(1, 2), dtype=np.float64)
        profiles[1] += norm.sum(axis=(0, 2), dtype=np.float64)
        profiles[2] += norm.sum(axis=(0, 1), dtype=np.float64)
    total = float(profiles[0].sum())
    centre = []
    for n, profile in zip(volume.shape, profiles):
        if total <= 0.0:
            centre.append((n - 1) // 2)
            continue
        centre.append(int(np.clip(round(float(profile @ np.arange(n)) / total), 0, n - 1)))
    return centre[0], centre[1], centre[2]


def _keypoint_palette(count: int) -> np.ndarray:
    """``(count, 4)`` RGBA colours from qualitative colormaps, indexed by keypoint (repeats after 60)."""
    from matplotlib import colormaps

    colours = []
    for name in ("tab20", "tab20b", "tab20c"):
        cmap = colormaps[name]
        # the strong shade of every hue first, then the light ones, so neighbouring indices differ in hue
        colours += [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]
    palette = np.asarray(colours, dtype=np.float64)
    return palette[np.arange(count) % len(palette)]


def _axis_codes(affine: np.ndarray) -> list[str]:
    from nibabel.orientations import aff2axcodes

    return [c if c is not None else "?" for c in aff2axcodes(affine)]


def _draw_panel(
    ax: Any,
    image2d: np.ndarray,
    slice_axis: int,
    index: int,
    affine: np.ndarray,
    codes: list[str],
    title: str,
    keypoints_vox: np.ndarray | None = None,
    colours: np.ndarray | None = None,
    areas: np.ndarray | None = None,
    depth: int = 1,
) -> None:
    """Draw one slice (``image2d`` is ``(n_a, n_b)`` or ``(n_a, n_b, 3)`` over the two remaining voxel axes).

    ``keypoints_vox`` are ``(K, 3)`` voxel coordinates of the image; ``depth`` is its size along ``slice_axis``.
    """
    a, b = (d for d in range(3) if d != slice_axis)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)  # voxel sizes (column norms)
    # axis a horizontal (increasing to the right), axis b vertical (increasing upwards)
    ax.imshow(
        np.swapaxes(image2d, 0, 1),
        origin="lower",
        cmap="gray" if image2d.ndim == 2 else None,
        vmin=0.0,
        vmax=1.0,
        aspect=float(spacing[b] / spacing[a]),
        interpolation="nearest",
    )
    if keypoints_vox is not None and len(keypoints_vox):
        # distance (mm) of each keypoint from the slice plane {voxel[c] = index}; the plane normal in voxel space is
        # row c of inv(linear), so the distance is |dc| / |row c|, exact for oblique and sheared grids
        normal = np.linalg.inv(linear)[slice_axis]
        dist = np.abs(keypoints_vox[:, slice_axis] - index) / np.linalg.norm(normal)
        plane_spacing = 1.0 / np.linalg.norm(normal)
        fade = max(0.15 * depth, 2.0) * plane_spacing  # depth = number of slices along the slice axis
        alpha = 0.15 + 0.85 * np.exp(-0.5 * (dist / fade) ** 2)
        ok = np.isfinite(keypoints_vox).all(axis=1)
        order = np.argsort(-dist, kind="stable")  # nearest keypoints drawn last (on top)
        order = order[ok[order]]
        filled = order[areas[order] > 0]
        hollow = order[areas[order] <= 0]
        if filled.size:
            face = colours[filled].copy()
            face[:, 3] = alpha[filled]
            edge = np.zeros_like(face)
            edge[:, 3] = alpha[filled]
            ax.scatter(
                keypoints_vox[filled, a],
                keypoints_vox[filled, b],
                s=areas[filled],
                c=face,
                edgecolors=edge,
                linewidths=0.5,
                marker="o",
            )
        if hollow.size:
            edge = colours[hollow].copy()
            edge[:, 3] = alpha[hollow]
            ax.scatter(
                keypoints_vox[hollow, a],
                keypoints_vox[hollow, b],
                s=16.0,
                facecolors="none",
                edgecolors=edge,
                linewidths=1.0,
                marker="o",
            )
    n_a, n_b = image2d.shape[:2]
    ax.set_xlim(-0.5, n_a - 0.5)
    ax.set_ylim(-0.5, n_b - 0.5)
    ax.set_xlabel(f"voxel axis {a} \u2192 \u2248{codes[a]}", fontsize=8)
    ax.set_ylabel(f"voxel axis {b} \u2192 \u2248{codes[b]}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def registration_figure(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    keypoints_fixed: np.ndarray,
    keypoints_moving: np.ndarray,
    weights: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Build the registration preview figure (see :func:`save_registration_png`) without any global matplotlib state.

    The figure is a :class:`matplotlib.figure.Figure` with an Agg canvas attached, not registered with ``pyplot``, so
    it needs no backend switch and is freed once unreferenced. Arguments as in :func:`save_registration_png`.
    ``fig.axes`` holds the nine panels row by row (fixed, moving, overlay) and, within a row, slice axis 0, 1, 2.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = _volume(fixed, "fixed")
    moving = _volume(moving, "moving")
    warped = _volume(warped, "warped")
    if warped.shape != fixed.shape:
        raise ValueError(
            f"warped must be on the fixed grid: expected shape {fixed.shape}, got {warped.shape} (moving grid is "
            f"{moving.shape})."
        )
    a_fix = _check_affine_matrix(fixed_affine, "fixed_affine")
    a_mov = _check_affine_matrix(moving_affine, "moving_affine")
    for name, a in (("fixed_affine", a_fix), ("moving_affine", a_mov)):
        if abs(np.linalg.det(a[:3, :3])) < 1e-12:
            raise ValueError(f"{name} is singular: {a.tolist()}.")
    kp_fix = _points(keypoints_fixed, "keypoints_fixed")
    kp_mov = _points(keypoints_moving, "keypoints_moving")
    if kp_fix.shape != kp_mov.shape:
        raise ValueError(f"keypoints_fixed {kp_fix.shape} and keypoints_moving {kp_mov.shape} must have equal shapes.")
    count = kp_fix.shape[0]
    if weights is None:
        w = np.ones(count)
    else:
        w = _as_numpy(weights).astype(np.float64).reshape(-1)
        if w.shape != (count,) or not np.isfinite(w).all() or (w < 0).any():
            got = _as_numpy(weights)
            detail = f"min {got.min()}" if got.size and np.isfinite(got).all() else "non-finite values"
            raise ValueError(f"expected {count} finite non-negative weights, got shape {got.shape} ({detail}).")
    areas = _MAX_MARKER_AREA * w / w.max() if count and w.max() > 0 else np.zeros(count)
    areas = np.where(areas > 0, np.maximum(areas, 4.0), 0.0)  # tiny positive weights stay visible
    colours = _keypoint_palette(count)

    def to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(affine)
        return points @ inv[:3, :3].T + inv[:3, 3]

    vox_fix, vox_mov = to_voxel(kp_fix, a_fix), to_voxel(kp_mov, a_mov)
    range_fix, range_mov = _robust_range(fixed), _robust_range(moving)
    # only the shown slices are scaled (a full-size scaled copy of a 512 x 512 x 400 volume would cost GBs)
    centre_fix, centre_mov = _intensity_centre(fixed, *range_fix), _intensity_centre(moving, *range_mov)
    codes_fix, codes_mov = _axis_codes(a_fix), _axis_codes(a_mov)

    fig = Figure(figsize=_FIGSIZE, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 3)
    rows = (
        ("fixed", fixed, range_fix, centre_fix, a_fix, codes_fix, vox_fix),
        ("moving", moving, range_mov, centre_mov, a_mov, codes_mov, vox_mov),
    )
    for r, (name, volume, value_range, centre, affine, codes, vox) in enumerate(rows):
        for c in range(3):
            s = centre[c]
            image2d = _normalise(np.take(volume, s, axis=c), *value_range)
            _draw_panel(
                axes[r, c],
                image2d,
                c,
                s,
                affine,
                codes,
                f"{name}: voxel axis {c} = {s}",
                vox,
                colours,
                areas,
                volume.shape[c],
            )
    for c in range(3):
        s = centre_fix[c]
        # warped moving intensities on the moving image's scale (the zero padding would bias its own percentiles)
        w2d = _normalise(np.take(warped, s, axis=c), *range_mov)
        # fixed in green, warped in magenta: aligned structures of similar contrast look grey
        overlay = np.stack([w2d, _normalise(np.take(fixed, s, axis=c), *range_fix), w2d], axis=-1)
        _draw_panel(axes[2, c], overlay, c, s, a_fix, codes_fix, f"fixed (green) + warped (magenta): axis {c} = {s}")
    fig.supxlabel(
        f"{count} keypoints; colour = keypoint index (the same in fixed and moving), marker area \u221d weight, "
        "hollow = weight 0, fainter = farther from the slice plane.\nAxes are voxel axes, labelled with the "
        "approximate anatomical direction of increasing index.",
        fontsize=8,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_registration_png(
    path: PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    keypoints_fixed: np.ndarray,
    keypoints_moving: np.ndarray,
    weights: np.ndarray | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write a 3 x 3 registration preview PNG atomically and return its path.

    Rows: the fixed image with its keypoints, the moving image with its keypoints, and the overlay after registration
    (fixed in green, warped moving in magenta, scaled by the robust 1st-99.5th intensity percentiles of the fixed and
    of the moving image respectively, so aligned structures of similar contrast look grey). Columns: the three
    orthogonal slices perpendicular to voxel axis 0, 1 and 2 of that row's image, through its intensity-weighted
    centre (the overlay uses the fixed image's slices). Each slice is shown with its first remaining voxel axis
    horizontal (increasing to the right) and the second vertical (increasing upwards), with the true voxel-size
    aspect ratio; axis labels give the voxel axis and the approximate anatomical direction of increasing index
    (``nibabel.orientations.aff2axcodes``, exact only for non-oblique grids).

    Keypoint ``k`` has the same colour in the fixed and the moving row; every keypoint is projected onto every slice,
    with opacity fading with its distance (mm) from the slice plane, marker area proportional to its weight (largest
    60 pt^2, at least 4 pt^2 so that tiny weights stay visible) and zero-weight keypoints as small hollow circles.
    Matplotlib is imported lazily and used without ``pyplot`` (an Agg canvas on a standalone figure), so neither
    importing this module nor calling this function changes the global matplotlib backend or state.

    Args:
        path: output PNG file (parent folders are created).
        fixed: ``(I, J, K)`` fixed image (numpy or torch; singleton batch / channel axes are accepted).
        moving: ``(I', J', K')`` moving image.
        warped: the moving image resampled onto the fixed grid, ``(I, J, K)``.
        fixed_affine: ``(4, 4)`` voxel-to-world (RAS+ mm) affine of the fixed grid (also that of ``warped``).
        moving_affine: ``(4, 4)`` voxel-to-world affine of the moving image.
        keypoints_fixed: ``(K, 3)`` keypoints of the fixed image in world mm.
        keypoints_moving: ``(K, 3)`` corresponding keypoints of the moving image in world mm.
        weights: ``(K,)`` non-negative keypoint weights, or ``None`` (all equal).
        title: optional figure title.
        dpi: resolution; the figure is 11 x 11 inches (1100 x 1100 pixels at the default 100 dpi).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = registration_figure(
        fixed, moving, warped, fixed_affine, moving_affine, keypoints_fixed, keypoints_moving, weights, title
    )
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        fig.clear()
