"""The network's preprocessing as MONAI dictionary transforms: brain masking, isotropic spacing, foreground crop,
intensity scaling and the cube; every step keeps each image's voxel-to-world affine (world mm, RAS after the
orientation step; see :mod:`custom_nets.geometry`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CropForegroundd,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Transform,
)
from monai.utils import ensure_tuple

from .checks import CheckLabelGridd, CheckWorldOverlapd, LoadVolumed

__all__ = [
    "AbovePercentile",
    "ForegroundCropd",
    "IsotropicSpacingd",
    "BrainMaskd",
    "brainmask_key",
    "dilate_mask",
    "mask_agreement_key",
    "preprocessing_transforms",
    "refine_key",
    "user_mask_key",
]


def brainmask_key(image_key: str) -> str:
    """Key of the brain mask :class:`BrainMaskd` stores for ``<side>_image``: ``<side>_brainmask`` (not a key that
    starts with ``<side>_image_``, which MONAI 1.6 would take for the image's metadata)."""
    return image_key.replace("_image", "") + "_brainmask"


def user_mask_key(image_key: str) -> str:
    """Key of a brain mask the user gives for ``<side>_image`` (a file path): ``<side>_mask``."""
    return image_key.replace("_image", "") + "_mask"


def mask_agreement_key(image_key: str) -> str:
    """Key under which :class:`BrainMaskd` stores, for ``<side>_image``, the Dice of the user's brain mask with the
    brain extractor's (``NaN`` where not measured): ``<side>_mask_agreement``."""
    return image_key.replace("_image", "") + "_mask_agreement"


class BrainMaskd(MapTransform):
    """Keep the brain only: multiply each (loaded) image by its brain mask, and store the mask.

    The mask is the user's, when the item has one under ``<side>_mask`` (a file path: any grid; it is resampled onto
    the image's grid through world coordinates, nearest neighbour, voxels ``> 0`` count), else the ``extractor``'s
    (:func:`~custom_nets.brainmask.extract_brain_mask`: raw heads, any contrast), else the image is left as it is.
    Raw heads (skull, scalp, face, neck, background) then look like the skull-stripped brains the detector was trained
    on, and the refinement and the quality measures see the brain only. The extractor's mask is dilated by
    ``margin_mm`` first, so that a mask a little too tight does not cut cortex. It is applied only to a head: where
    less than ``head_fraction`` of the image's foreground lies outside the dilated mask, the image is taken to be
    skull-stripped already and left as it is (the extractor is less exact than a brain's own edge). The mask is
    stored as a ``uint8``
    ``MetaTensor`` ``(1, I, J, K)`` on the image's grid under ``<side>_brainmask`` (:func:`brainmask_key`), for the
    outputs. Where the user gives a mask and an extractor is at hand, the extractor runs too and the Dice of the two
    masks (undilated extractor mask) is stored under ``<side>_mask_agreement`` (:func:`mask_agreement_key`; ``NaN``
    where not measured), for the quality verdict: a mask of the wrong place or person agrees poorly (see
    ``QualityThresholds.min_mask_agreement``).

    Args:
        keys: image keys (``fixed_image``, ``moving_image``).
        extractor: a brain-extraction network, or ``None`` (only user masks are applied).
        margin_mm: dilation of the extractor's mask (mm; user masks are used as they are).
        head_fraction: fraction of the foreground outside the extractor's (dilated) mask from which an image is a
            head to be masked.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: a mask file that cannot be read, or a mask with no brain voxel on the image (naming the file).
    """

    def __init__(
        self,
        keys: KeysCollection,
        extractor: torch.nn.Module | None = None,
        margin_mm: float = 3.0,
        head_fraction: float = 0.2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.extractor, self.margin_mm, self.head_fraction = extractor, float(margin_mm), float(head_fraction)
        self._loader = LoadVolumed(["mask"], reject_constant=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ..brainmask import extract_brain_mask, foreground_threshold, mask_dice
        from ..geometry import resample

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            affine = torch.as_tensor(img.affine, dtype=torch.float64)
            given = d.get(user_mask_key(str(key)))
            name = str(img.meta.get("filename_or_obj", key)) if isinstance(img, MetaTensor) else str(key)
            d[mask_agreement_key(str(key))] = float("nan")
            if given:
                loaded = self._loader({"mask": given})["mask"]
                mask = resample(
                    (loaded.as_tensor() > 0).float()[None],
                    torch.eye(4, dtype=torch.float64),
                    img.shape[1:],
                    affine,
                    torch.as_tensor(loaded.affine, dtype=torch.float64),
                    mode="nearest",
                )[0]
                source = str(given)
                if self.extractor is not None:
                    with torch.no_grad():
                        found = extract_brain_mask(self.extractor, img.as_tensor().float(), affine)
                    d[mask_agreement_key(str(key))] = mask_dice(mask, found)
            elif self.extractor is not None:
                plain = img.as_tensor().float()
                with torch.no_grad():
                    mask = dilate_mask(extract_brain_mask(self.extractor, plain, affine), affine, self.margin_mm)
                source = "the brain extractor"
                foreground = plain > foreground_threshold(plain)
                outside = float((foreground & (mask == 0)).sum()) / max(1.0, float(foreground.sum()))
                if outside < self.head_fraction:
                    continue  # skull-stripped already: the image's own edge is the brain's
            else:
                continue
            if not bool(mask.any()):
                raise ValueError(
                    f"{name}: the brain mask from {source} holds no voxel of the image; expected a mask of the brain "
                    "on the same subject and field of view."
                )
            masked = img * mask.to(img.dtype)
            d[key] = masked
            d[brainmask_key(str(key))] = MetaTensor(mask.to(torch.uint8), affine=img.affine.clone())
        return d


def dilate_mask(mask: torch.Tensor, affine: torch.Tensor, margin_mm: float) -> torch.Tensor:
    """Dilate a ``(1, I, J, K)`` mask by about ``margin_mm`` along each voxel axis (a box of each axis's spacing)."""
    spacing = affine[:3, :3].norm(dim=0).tolist()
    radius = [max(0, round(margin_mm / max(s, 1e-6))) for s in spacing]
    if not any(radius):
        return mask
    out = mask[None].float()
    for axis, r in enumerate(radius):  # a box is separable: one axis at a time
        if r:
            kernel, pad = [1, 1, 1], [0, 0, 0]
            kernel[axis], pad[axis] = 2 * r + 1, r
            out = torch.nn.functional.max_pool3d(out, kernel, stride=1, padding=pad)
    return out[0]


class IsotropicSpacingd(MapTransform):
    """Resample images to isotropic ``pixdim`` voxels on a grid anchored at each image's first voxel.

    The output affine is ``A @ diag(pixdim / spacing)`` (``spacing``: the column norms of the input affine ``A``), so
    the output keeps the input's axis directions and its voxel 0, with ``round((n - 1) * spacing / pixdim + 1)`` voxels
    per axis (as MONAI's ``Spacing``); values are sampled with :func:`custom_nets.geometry.resample` (trilinear or
    nearest, zeros outside, float32: a large input is not copied to float64). For images whose axes are aligned with
    the world this is MONAI's ``Spacing`` grid (the same values to 1e-5); unlike ``Spacing``, which centres the grid
    instead when floating-point noise in an oblique header (NIfTI stores it in float32) makes its corner test fail, the
    grid here depends only on the voxel data and the voxel sizes, so the same scan under a rotated or shifted header
    gives the same network input (to float rounding, ~1e-6).

    Args:
        keys: image / label keys (``MetaTensor`` ``(C, I, J, K)`` with affines).
        pixdim: output voxel size (mm).
        mode: ``bilinear`` or ``nearest``, one for all keys or one per key.
        output_keys: where each resampled image goes (one per key; default: back to its own key). With other keys
            the input stays as it was, so a second resolution of an image costs no copy of the input.
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: float,
        mode: str | Sequence[str] = "bilinear",
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixdim = float(pixdim)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"IsotropicSpacingd: expected one mode or {len(self.keys)}, got {mode!r}.")
        self.modes = dict(zip(self.keys, modes))
        outs = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(outs) != len(self.keys):
            raise ValueError(f"IsotropicSpacingd: expected {len(self.keys)} output keys, got {output_keys!r}.")
        self.output_keys = dict(zip(self.keys, outs))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ..geometry import resample

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            a_in = torch.as_tensor(getattr(img, "affine", torch.eye(4)), dtype=torch.float64).cpu()
            spacing = a_in[:3, :3].norm(dim=0)
            scale = self.pixdim / spacing
            a_out = a_in @ torch.diag(torch.cat([scale, torch.ones(1, dtype=torch.float64)]))
            shape = [max(1, int(np.round((int(n) - 1) / float(f) + 1.0))) for n, f in zip(img.shape[1:], scale)]
            x = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
            if not x.is_floating_point():
                x = x.float()
            out = resample(x[None], torch.eye(4, dtype=torch.float64), shape, a_out, a_in, mode=self.modes[key])[0]
            meta = dict(getattr(img, "meta", {}))
            meta.pop("affine", None)
            d[self.output_keys[key]] = MetaTensor(out, affine=a_out.to(torch.float64), meta=meta)
        return d


class AbovePercentile:
    """Foreground selection for ``CropForeground``: voxels above the ``percentile`` of the whole image (by more than
    1e-4 of the image's range above it).

    With the 0.5th percentile this is the foreground that percentile intensity scaling would keep above 0, computed
    before the scaling, so that the scaling percentiles can then be taken inside the foreground box (a small brain in
    a large, mostly empty field of view is not saturated by percentiles of the empty space)."""

    def __init__(self, percentile: float = 0.5) -> None:
        self.percentile = float(percentile)

    def __call__(self, img: Any) -> Any:
        x = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        low = float(np.percentile(x, self.percentile))
        # 1e-4 of the range above it: interpolation rounding (1e-7 of a neighbour leaking into an empty voxel) is not
        # foreground, or the same content would crop differently on differently placed grids
        return img > low + 1e-4 * (float(x.max()) - low)


def preprocessing_transforms(
    image_keys: KeysCollection = ("fixed_image", "moving_image"),
    label_keys: KeysCollection = (),
    pixdim: float = 2.0,
    spatial_size: int = 128,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    source_keys: Mapping[str, str] | None = None,
    on_disjoint: str = "warn",
    refine_pixdim: float | None = None,
    brain_extractor: torch.nn.Module | None = None,
    brain_margin_mm: float = 3.0,
) -> list[Transform]:
    """The preprocessing that brings any NIfTI to the network's input, keeping each image's world affine.

    Load (checked) -> world-overlap check of the two images -> RAS orientation -> isotropic ``pixdim`` spacing
    (:class:`IsotropicSpacingd`, anchored at voxel 0 whatever the header's rotation) ->
    crop to the foreground (voxels above the image's ``lower_percentile``) -> robust intensity scaling to [0, 1]
    (percentiles inside that foreground box) -> centre-pad / crop to a ``spatial_size`` cube. With the defaults the
    cube spans 256 mm, so a brain rotated by any angle about its centre is not cropped. Every step updates the
    ``MetaTensor`` affine, so network-space keypoints map back to each original image exactly.

    The percentiles are taken inside the foreground box rather than over the whole field of view, so that a brain in a
    large, mostly empty field of view (e.g. 512 x 512 x 400 voxels) is scaled like the same brain in a tight one.
    Resampling runs in float32 (the input of a large field of view is not copied to float64).

    Args:
        image_keys: image keys.
        label_keys: label keys (nearest-neighbour resampling, no intensity scaling).
        pixdim: output voxel size (mm).
        spatial_size: output cube side (voxels).
        lower_percentile, upper_percentile: intensity percentiles mapped to 0 and 1 (clipped).
        source_keys: for each label key, the image key whose foreground defines the crop (default: the label
            key with ``_label`` replaced by ``_image``).
        on_disjoint: with two image keys, what to do when their fields of view do not overlap in world space
            (``warn``, ``error`` or ``ignore``; see :class:`CheckWorldOverlapd`).
        refine_pixdim: if given, each image key ``<side>_image`` is also resampled (after the RAS step) into
            ``refine_<side>`` at ``refine_pixdim`` mm voxels (no copy of the full-resolution input), cropped to its
            foreground and scaled like the network input, but not padded to the cube: the finer images an
            intensity-based refinement polishes on.
        brain_extractor: a brain-extraction network: after the RAS step, each image is multiplied by its brain mask
            (:class:`BrainMaskd`), the user's ``<side>_mask`` file where the item has one. Without it, only user masks
            are applied.
        brain_margin_mm: dilation of the extractor's masks (mm).

    Note:
        MONAI 1.6 treats every key that starts with ``<image key>_`` as that image's metadata dictionary, so image
        keys must not be prefixes of other keys (hence ``fixed_image`` / ``fixed_label``, not ``fixed`` /
        ``fixed_label``).

    Returns:
        A list of MONAI transforms (to put in a ``Compose``).
    """
    image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    keys = image_keys + label_keys
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    source_keys = dict(source_keys or {})
    out: list[Transform] = [LoadVolumed(image_keys, allow_missing_keys=True)]
    if len(image_keys) == 2:
        out.append(CheckWorldOverlapd(image_keys, on_disjoint=on_disjoint, allow_missing_keys=True))
    sources = [source_keys.get(lab, lab.replace("_label", "_image")) for lab in label_keys]
    if label_keys:
        out.append(LoadVolumed(label_keys, allow_missing_keys=True, reject_constant=False))
        out.append(CheckLabelGridd(label_keys, sources))
    out += [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        BrainMaskd(image_keys, brain_extractor, brain_margin_mm, allow_missing_keys=True),
        IsotropicSpacingd(keys, pixdim=pixdim, mode=modes, allow_missing_keys=True),
    ]
    followers = {key: [lab for lab, src in zip(label_keys, sources) if src == key] for key in image_keys}
    out.append(ForegroundCropd(image_keys, lower_percentile, followers, allow_missing_keys=True))
    out += [
        ScaleIntensityRangePercentilesd(
            image_keys, lower_percentile, upper_percentile, 0.0, 1.0, clip=True, allow_missing_keys=True
        ),
        ResizeWithPadOrCropd(keys, spatial_size=spatial_size, allow_missing_keys=True),
    ]
    if refine_pixdim is not None:
        refine_keys = [refine_key(k) for k in image_keys]
        steps: list[Transform] = [
            IsotropicSpacingd(
                image_keys, pixdim=float(refine_pixdim), output_keys=refine_keys, allow_missing_keys=True
            ),
        ]
        steps.append(ForegroundCropd(refine_keys, lower_percentile, allow_missing_keys=True))
        steps.append(
            ScaleIntensityRangePercentilesd(
                refine_keys, lower_percentile, upper_percentile, 0.0, 1.0, clip=True, allow_missing_keys=True
            )
        )
        at = next(i for i, t in enumerate(out) if isinstance(t, BrainMaskd)) + 1  # the masked RAS images
        out = out[:at] + steps + out[at:]
    return out


class ForegroundCropd(MapTransform):
    """Crop each image key to the box of its own foreground (voxels above its ``lower_percentile``: see
    :class:`AbovePercentile`), and the keys that follow it (e.g. its label map) to the same box.

    A ``MetaTensor``'s affine is updated by the crop (MONAI's ``CropForegroundd`` does each crop), so world
    coordinates are kept.

    Args:
        keys: image keys, each cropped to its own foreground box.
        lower_percentile: the foreground is above this percentile of the image (by more than 1e-4 of its range).
        followers: ``{image key: keys cropped to that image's box}``, e.g. ``{"fixed_image": ["fixed_label"]}``.
        allow_missing_keys: skip an image key the item lacks (with its followers).
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower_percentile: float = 0.5,
        followers: Mapping[str, Sequence[str]] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        followers = dict(followers or {})
        self.crops = [
            CropForegroundd(
                [key, *followers.get(str(key), ())],
                source_key=str(key),
                select_fn=AbovePercentile(lower_percentile),
                start_coord_key=None,
                end_coord_key=None,
                allow_missing_keys=True,
            )
            for key in self.keys
        ]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, crop in zip(self.keys, self.crops):
            if key in d:
                d = crop(d)
            elif not self.allow_missing_keys:
                raise KeyError(f"ForegroundCropd: expected key {key!r} in the item, found {sorted(map(str, d))}.")
        return d


def refine_key(image_key: str) -> str:
    """Key of the refinement copy of an image key: ``fixed_image`` -> ``refine_fixed``."""
    return "refine_" + image_key.removesuffix("_image")
