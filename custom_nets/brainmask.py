"""Brain extraction for raw heads (skull, face, neck, background) of any contrast and orientation.

:class:`BrainExtractor` is a small MONAI ``UNet`` (1 input channel, 1 logit) trained on synthetic heads
(:class:`~custom_nets.data.heads.HeadSynthesizer`: random intensity per label, any pose, cut fields of view, some
already skull-stripped brains; see :mod:`custom_nets.brainmask_train`). :func:`extract_brain_mask` runs it on an image
of any grid and returns the brain mask on that same grid.

Coordinates follow :mod:`custom_nets.geometry`: voxel centres at integer indices, world mm through the ``(4, 4)``
voxel-to-world affine, ``grid_sample(align_corners=True)``. The network sees a ``size^3`` cube of ``pixdim`` mm (320 mm
by default: head and neck), axis-aligned in world, centred on the centre of the image's foreground box.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from .data.template import cube_affine
from .geometry import as_tensor, resample, voxel_to_world

__all__ = [
    "BrainExtractor",
    "DEFAULT_BRAIN_EXTRACTOR_WEIGHTS",
    "brain_cube",
    "clean_mask",
    "extract_brain_mask",
    "foreground_threshold",
    "load_brain_extractor",
    "mask_dice",
]

#: The shipped weights (a plain state dict of the default :class:`BrainExtractor`), listed in
#: ``bundle/large_files.yml`` with their SHA-256.
DEFAULT_BRAIN_EXTRACTOR_WEIGHTS = Path(__file__).resolve().parents[1] / "bundle" / "models" / "brain_extractor.pt"

#: Total downsampling of the network: the cube side must be a multiple of it.
_NET_STRIDE = 16


class BrainExtractor(UNet):
    """A 3D UNet (MONAI ``UNet``, residual units, instance norm) mapping ``(B, 1, S, S, S)`` images scaled to [0, 1]
    to ``(B, 1, S, S, S)`` brain logits. ``S`` must be a multiple of 16 (four stride-2 levels)."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 48, 64, 64),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm="instance",
        )


def _spacing(affine: torch.Tensor) -> torch.Tensor:
    """Voxel sizes (mm) along the three voxel axes of a ``(4, 4)`` affine."""
    return affine[:3, :3].norm(dim=0)


def foreground_threshold(image: torch.Tensor) -> float:
    """An intensity separating the head (or brain) from the background of ``image`` (any shape, any range).

    ``lo + 0.1 (hi - lo)`` with ``lo`` the 0.5th percentile of all voxels (the background / noise floor) and ``hi``
    the 98th percentile of the voxels brighter than the mean (the tissue), robust to how much of the field of view the
    head fills.
    """
    x = image.reshape(-1).float()
    x = x[:: max(1, x.numel() // 2_000_000)]
    lo = torch.quantile(x, 0.005)
    bright = x[x > x.mean()]
    hi = torch.quantile(bright, 0.98) if bright.numel() else x.max()
    return float(lo + 0.1 * (hi - lo))


def _pool_to(image: torch.Tensor, affine: torch.Tensor, pixdim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-alias: average ``image (1, 1, I, J, K)`` by integer factors so its voxels approach ``pixdim`` mm; returns
    the pooled image and its affine (pooled voxel ``u`` is centred at input voxel ``f u + (f - 1) / 2``)."""
    factors = [max(1, int(math.floor(pixdim / float(s) + 1e-6))) for s in _spacing(affine)]
    factors = [min(f, n) for f, n in zip(factors, image.shape[2:])]
    if all(f == 1 for f in factors):
        return image, affine
    pooled = F.avg_pool3d(image, kernel_size=factors, stride=factors)
    scale = torch.eye(4, dtype=torch.float64)
    scale[:3, :3] = torch.diag(torch.tensor(factors, dtype=torch.float64))
    scale[:3, 3] = (torch.tensor(factors, dtype=torch.float64) - 1) / 2
    return pooled, affine @ scale


def brain_cube(
    image: torch.Tensor, affine: torch.Tensor, pixdim: float = 4.0, size: int = 80
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input of :func:`extract_brain_mask`: ``image`` resampled onto a world-aligned cube.

    Args:
        image: ``(1, I, J, K)`` float image, any grid and intensity range.
        affine: ``(4, 4)`` voxel-to-world affine of ``image``.
        pixdim: voxel size (mm) of the cube.
        size: voxels per side of the cube.

    Returns:
        ``(cube, cube_affine)``: ``(1, 1, size, size, size)`` float32 scaled to [0, 1] (0.5th / 99.5th percentiles of
        the foreground at 0 / 1, clipped), and its ``(4, 4)`` float64 voxel-to-world affine (RAS-aligned axes, centred
        on the centre of the image's foreground box: robust 0.2 / 99.8 % quantiles of the foreground's world
        coordinates along each world axis). Outside the image the cube is 0.
    """
    img = as_tensor(image).detach().to("cpu", torch.float32)
    aff = as_tensor(affine).detach().to("cpu", torch.float64)
    img = torch.nan_to_num(img)[None]
    img, aff = _pool_to(img, aff, pixdim)
    threshold = foreground_threshold(img)
    smooth = F.avg_pool3d(img, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    fg = torch.nonzero(smooth > threshold)
    if fg.shape[0] == 0:
        centre = voxel_to_world(((torch.tensor(img.shape[2:], dtype=torch.float64) - 1) / 2)[None, None], aff[None])
        centre = centre[0, 0]
    else:
        fg = fg[:: max(1, fg.shape[0] // 1_000_000)].to(torch.float64)
        world = voxel_to_world(fg[None], aff[None])[0]
        lo = torch.quantile(world, 0.002, dim=0)
        hi = torch.quantile(world, 0.998, dim=0)
        centre = (lo + hi) / 2
    cube_aff = torch.from_numpy(cube_affine(size, pixdim, centre.tolist()))
    cube = resample(img, torch.eye(4, dtype=torch.float64), (size,) * 3, cube_aff, aff)
    values = cube[cube > threshold]
    if values.numel() < 10:
        values = cube.reshape(-1)
    values = values[:: max(1, values.numel() // 2_000_000)]
    lo, hi = torch.quantile(values, 0.005), torch.quantile(values, 0.995)
    cube = ((cube - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    return cube.to(torch.float32), cube_aff


def _run_max(values: torch.Tensor, allowed: torch.Tensor, axis: int) -> torch.Tensor:
    """Replace every ``allowed`` voxel of ``values`` (3D) by the maximum over its run of consecutive ``allowed``
    voxels along ``axis`` (a scatter over run ids: one pass, however long the runs)."""
    v = values.movedim(axis, -1).contiguous()
    m = allowed.movedim(axis, -1).contiguous()
    start = m.clone()
    start[..., 1:] &= ~m[..., :-1]
    run = torch.cumsum(start.reshape(-1), 0).reshape(m.shape)  # unique id per run (lines are contiguous)
    flat_m = m.reshape(-1)
    ids = run.reshape(-1)[flat_m]
    best = torch.zeros(int(run.max()) + 1, dtype=v.dtype).scatter_reduce(
        0, ids, v.reshape(-1)[flat_m], reduce="amax", include_self=False
    )
    out = v.reshape(-1).clone()
    out[flat_m] = best[ids]
    return out.reshape(v.shape).movedim(-1, axis)


def _propagate(values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Spread the maximum of ``values`` over each 6-connected component of ``allowed`` (3D bool): alternate run-max
    sweeps along the three axes until nothing changes (a few sweeps for blob-like shapes)."""
    current = torch.where(allowed, values, torch.zeros_like(values))
    while True:
        previous = current
        for axis in range(3):
            current = _run_max(current, allowed, axis)
        if torch.equal(current, previous):
            return current


def clean_mask(mask: torch.Tensor) -> torch.Tensor:
    """Keep the largest 6-connected component of a bool ``(I, J, K)`` mask and fill its holes (background parts not
    6-connected to the border of the grid). Pure torch (run-max flood fills on the mask's bounding box)."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask (I, J, K), got shape {tuple(mask.shape)}.")
    if not mask.any():
        return mask.clone()
    padded = F.pad(mask.float(), (1, 1, 1, 1, 1, 1)) > 0  # a background margin, also where the mask touches the border
    idx = torch.nonzero(padded)
    box = tuple(slice(int(a) - 1, int(b) + 2) for a, b in zip(idx.min(0).values, idx.max(0).values))
    crop = padded[box]
    ids = torch.arange(1, crop.numel() + 1, dtype=torch.float64).reshape(crop.shape)
    comp = _propagate(ids, crop)
    values, counts = torch.unique(comp[crop], return_counts=True)
    keep = comp == values[counts.argmax()]
    border = torch.ones_like(keep)
    border[1:-1, 1:-1, 1:-1] = False
    outside = _propagate(border.to(torch.float64), ~keep) > 0
    out = torch.zeros_like(padded)
    out[box] = ~outside
    return out[1:-1, 1:-1, 1:-1]


@torch.no_grad()
def extract_brain_mask(
    net: nn.Module, image: torch.Tensor, affine: torch.Tensor, pixdim: float = 4.0, size: int = 80
) -> torch.Tensor:
    """Brain mask of ``image`` on the image's own grid.

    The image is resampled (after integer-factor average pooling when its voxels are smaller than ``pixdim``) onto a
    ``size^3`` cube of ``pixdim`` mm, world-aligned and centred on the image's foreground (:func:`brain_cube`), scaled
    to [0, 1]; the network's probability is thresholded at 0.5, reduced to its largest connected component with holes
    filled (:func:`clean_mask`), and brought back onto the image's grid by linear interpolation of the probability
    (forced to agree with the cleaned mask) and a 0.5 threshold. Voxels outside the cube get 0.

    Args:
        net: a :class:`BrainExtractor` (or any network mapping ``(1, 1, S, S, S)`` to logits of that shape).
        image: ``(1, I, J, K)`` float image: raw head or skull-stripped brain, any contrast, orientation (RAS, LPS,
            oblique), voxel size and intensity range.
        affine: ``(4, 4)`` voxel-to-world affine of ``image`` (float64 preferred).
        pixdim: voxel size (mm) of the network's cube (the one it was trained on: 4 mm).
        size: voxels per side of the cube (a multiple of 16; 80 for the shipped weights: 320 mm holds head and neck).

    Returns:
        ``(1, I, J, K)`` float32 mask with values in {0, 1}, on the device of ``image``.
    """
    image_t = as_tensor(image)
    if image_t.ndim != 4 or image_t.shape[0] != 1:
        raise ValueError(f"expected an image of shape (1, I, J, K), got {tuple(image_t.shape)}.")
    affine_t = torch.as_tensor(as_tensor(affine), dtype=torch.float64).cpu()
    if affine_t.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) voxel-to-world affine, got shape {tuple(affine_t.shape)}.")
    if not torch.isfinite(affine_t).all() or abs(float(torch.linalg.det(affine_t[:3, :3]))) < 1e-9:
        raise ValueError(f"expected an invertible, finite affine, got {affine_t.tolist()}.")
    if size % _NET_STRIDE:
        raise ValueError(f"expected size to be a multiple of {_NET_STRIDE}, got {size}.")
    cube, cube_aff = brain_cube(image_t, affine_t, pixdim, size)
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    try:
        prob = torch.sigmoid(net(cube.to(device)).float()).cpu()
    finally:
        net.train(was_training)
    keep = clean_mask(prob[0, 0] > 0.5)
    soft = torch.where(keep, prob.clamp_min(0.5 + 1e-3), prob.clamp_max(0.5 - 1e-3))
    return _back_to_grid(soft, cube_aff, tuple(image_t.shape[1:]), affine_t).to(image_t.device)


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice overlap of two masks of one shape (voxels ``> 0.5`` count; 1.0 when both are empty). Used against the
    truth in the benchmarks, and as the agreement of a user's brain mask with the extractor's (a mask of another
    place or person agrees poorly)."""
    a, b = a > 0.5, b > 0.5
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _back_to_grid(
    soft: torch.Tensor, cube_aff: torch.Tensor, shape: tuple[int, ...], affine: torch.Tensor, slab: int = 1 << 22
) -> torch.Tensor:
    """Resample the cube's ``(1, 1, S, S, S)`` probability onto the image grid (linear, > 0.5), in slabs along the
    first axis of at most ``slab`` voxels (bounds the sampling grid's memory on large images)."""
    out = torch.zeros((1, *shape), dtype=torch.float32)
    step = max(2, slab // max(1, shape[1] * shape[2]))
    identity = torch.eye(4, dtype=torch.float64)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        start = max(0, min(start, stop - 2))  # no 1-plane slab: a unit-size axis is degenerate for grid_sample
        shift = torch.eye(4, dtype=torch.float64)
        shift[0, 3] = float(start)
        part = resample(soft, identity, (stop - start, *shape[1:]), affine @ shift, cube_aff)
        out[0, start:stop] = (part[0, 0] > 0.5).to(torch.float32)
    return out


def load_brain_extractor(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    large_files: str | os.PathLike | None = None,
) -> BrainExtractor:
    """A :class:`BrainExtractor` with weights loaded after checking their SHA-256 (``weights_only=True``).

    Args:
        weights: a state-dict file; default :data:`DEFAULT_BRAIN_EXTRACTOR_WEIGHTS` (the shipped weights).
        device: device of the returned network (in eval mode).
        large_files: the ``large_files.yml`` holding the expected SHA-256; default: the one of the bundle the weights
            sit in (``<bundle>/models/x.pt`` -> ``<bundle>/large_files.yml``).

    Raises:
        FileNotFoundError: no weights file.
        custom_nets.weights.WeightsIntegrityError: the file's SHA-256 differs from the recorded one, the shipped
            weights have no recorded SHA-256, or the file is not weights of this network (the message names the file).
    """
    from .weights import VerifiedCheckpointLoader, WeightsIntegrityError, expected_sha256

    path = Path(weights) if weights is not None else DEFAULT_BRAIN_EXTRACTOR_WEIGHTS
    listing = Path(large_files) if large_files is not None else path.resolve().parents[1] / "large_files.yml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no brain-extractor weights file (expected a state dict of BrainExtractor; the shipped one is "
            f"{DEFAULT_BRAIN_EXTRACTOR_WEIGHTS}, fetched by python -m monai.bundle download_large_files)."
        )
    sha = expected_sha256(path, listing)
    if sha is None and weights is None:
        raise WeightsIntegrityError(f"{path}: no SHA-256 recorded for the shipped weights in {listing}.")
    net = BrainExtractor()
    VerifiedCheckpointLoader(str(path), {"model": net}, sha256=sha, map_location="cpu").load()
    return net.to(device).eval()


def write_brain_mask(net: nn.Module, image_path: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, Any]:
    """Brain-extract the image file ``image_path`` and write its mask (``uint8``, 1 = brain) as NIfTI on the image's
    own grid (its shape, affine and header codes), atomically, to ``out_path``.

    Returns:
        ``{"brain_voxels", "brain_volume_ml"}`` of the mask.

    Raises:
        ValueError / FileNotFoundError: the image cannot be read (naming the file), or its mask is empty.
    """
    from .data.checks import LoadVolumed
    from .volumes import load_volume, save_like

    img = LoadVolumed(["image"])({"image": str(image_path)})["image"]
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    with torch.no_grad():
        mask = extract_brain_mask(net, img.as_tensor().float(), affine)[0]
    if not bool(mask.any()):
        raise ValueError(f"{image_path}: the brain extractor found no brain in the image.")
    like = load_volume(str(image_path))  # the header the outputs keep (MONAI reads the same grid)
    save_like(mask.numpy(), like, str(out_path), np.uint8)
    voxel_ml = float(abs(torch.linalg.det(affine[:3, :3]))) / 1000.0
    return {"brain_voxels": int(mask.sum()), "brain_volume_ml": round(float(mask.sum()) * voxel_ml, 1)}
