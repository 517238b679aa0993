"""Files out and in: atomic writing, SHA-256, JSON / CSV, ITK affine transform files.

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
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from .geometry import LPS_FROM_RAS, as_tensor

__all__ = [
    "PathLike",
    "as_numpy",
    "atomic_write",
    "check_affine_matrix",
    "read_itk_affine",
    "sha256_file",
    "to_jsonable",
    "write_csv",
    "write_itk_affine",
    "write_json",
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


def as_numpy(x: Any) -> np.ndarray:
    """``x`` (a tensor, MetaTensor, array or nested sequence) as a numpy array; floating tensors as float64."""
    if isinstance(x, torch.Tensor):
        x = as_tensor(x).detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def check_affine_matrix(matrix: Any, what: str) -> np.ndarray:
    """``matrix`` as a float64 ``(4, 4)`` homogeneous affine (finite, last row ``(0, 0, 0, 1)``) or ValueError."""
    try:
        m = as_numpy(matrix).astype(np.float64)
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
    t_ras = check_affine_matrix(fixed_to_moving_ras, "fixed_to_moving_ras")
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
