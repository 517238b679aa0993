"""Preview PNGs: a registration's keypoints over orthogonal slices of both images and the overlay after it; a
groupwise template with its keypoints and aligned scans.

World coordinates follow :mod:`custom_nets.geometry` (RAS+ mm, each image's 4 x 4 voxel-to-world affine); the PNG is
written atomically (:func:`custom_nets.fileio.atomic_write`). matplotlib is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fileio import PathLike, as_numpy, atomic_write, check_affine_matrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["registration_figure", "save_registration_png", "save_template_png"]

#: Size of the registration preview figure in inches (the PNG has ``dpi`` pixels per inch).
_FIGSIZE = (11.0, 11.0)
#: Marker area (points^2) of the keypoint with the largest weight.
_MAX_MARKER_AREA = 60.0


def _volume(x: Any, name: str) -> np.ndarray:
    """A 3D float32 array from numpy / torch input, dropping singleton leading or trailing (``(I, J, K, 1)``) axes."""
    a = as_numpy(x)
    while a.ndim > 3 and (a.shape[0] == 1 or a.shape[-1] == 1):
        a = a[0] if a.shape[0] == 1 else a[..., 0]
    if a.ndim != 3 or min(a.shape) < 1:
        raise ValueError(f"expected {name} as a 3D array (I, J, K), got shape {tuple(as_numpy(x).shape)}.")
    return np.asarray(a, dtype=np.float32)


def _points(x: Any, name: str) -> np.ndarray:
    p = as_numpy(x).astype(np.float64)
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
    a_fix = check_affine_matrix(fixed_affine, "fixed_affine")
    a_mov = check_affine_matrix(moving_affine, "moving_affine")
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
        w = as_numpy(weights).astype(np.float64).reshape(-1)
        if w.shape != (count,) or not np.isfinite(w).all() or (w < 0).any():
            got = as_numpy(weights)
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


def save_template_png(
    path: PathLike,
    template: np.ndarray,
    affine: np.ndarray,
    keypoints: np.ndarray,
    aligned: list[tuple[str, np.ndarray]],
) -> Path:
    """Template montage: one row for the template with its keypoints (projected onto each slice), one per aligned
    scan; columns: the three orthogonal slices through the template grid's centre."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [("template", template)] + list(aligned)
    fig = Figure(figsize=(9.0, 3.0 * len(rows)))
    FigureCanvasAgg(fig)
    centre = [n // 2 for n in template.shape]
    vox = (np.c_[keypoints, np.ones(len(keypoints))] @ np.linalg.inv(affine).T)[:, :3]
    hi = float(np.percentile(template[template > 0], 99.5)) if (template > 0).any() else 1.0
    for r, (name, volume) in enumerate(rows):
        for axis in range(3):
            ax = fig.add_subplot(len(rows), 3, 3 * r + axis + 1)
            plane = np.take(volume, centre[axis], axis=axis)
            ax.imshow(plane.T, origin="lower", cmap="gray", vmin=0.0, vmax=hi)
            if r == 0:
                other = [d for d in range(3) if d != axis]
                ax.scatter(vox[:, other[0]], vox[:, other[1]], s=8, c="tab:orange")
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_ylabel(name)
    fig.suptitle("groupwise template (row 1, keypoints in orange) and aligned scans")
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    finally:
        fig.clear()
