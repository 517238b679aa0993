"""MONAI dictionary transforms: synthetic pairs, checked NIfTI loading and the network preprocessing."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CropForegroundd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Randomizable,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Transform,
)
from monai.utils import ensure_tuple

from .synth import CONTRASTS, BrainSynthesizer, subject_seed

__all__ = [
    "SynthPaird",
    "RandPaird",
    "LoadVolumed",
    "CheckLabelGridd",
    "CheckWorldOverlapd",
    "AbovePercentile",
    "IsotropicSpacingd",
    "BrainMaskd",
    "brainmask_key",
    "dilate_mask",
    "mask_agreement_key",
    "world_bounding_box",
    "preprocessing_transforms",
    "refine_key",
]

logger = logging.getLogger(__name__)


class SynthPaird(Randomizable, Transform):
    """Make a synthetic (fixed, moving) pair of brains with labels and ground truth, from a seed.

    Output keys: ``fixed_image``, ``moving_image`` (``MetaTensor`` ``(1, S, S, S)`` in [0, 1] with the cube affine),
    ``fixed_label``, ``moving_label`` (tissue indices, float32), ``fixed_to_moving`` (``(4, 4)`` float64 world
    ground truth: identity, since both subjects are in template alignment before augmentation), ``fixed_contrast``,
    ``moving_contrast`` (names), ``fixed_subject``, ``moving_subject`` (subject seeds) and ``seed``.

    The item is a deterministic function of ``data["seed"]`` if present (reproducible evaluation sets), else of a seed
    drawn from the transform's random state (training).

    Args:
        synthesizer: a :class:`BrainSynthesizer` (grid, deformation and appearance settings); or its keyword
            arguments as a dict.
        contrasts: contrast names to draw from (``t1``, ``t2``, ``pd``, ``random``).
        cross_contrast_prob: probability that the two images have different contrasts.
        same_subject_prob: probability that both images show the same subject.
        split: subject stream (``train`` / ``validation`` / ``test``): held-out splits never share subjects.
        num_subjects: size of the subject pool (``None``: a new subject almost every time).
        alt_contrast: also make ``moving_image_alt``, the moving subject in another contrast (same pose), for a
            keypoint-consistency loss.
    """

    def __init__(
        self,
        synthesizer: BrainSynthesizer | Mapping[str, Any] | None = None,
        contrasts: Sequence[str] = ("t1", "t2", "pd"),
        cross_contrast_prob: float = 0.5,
        same_subject_prob: float = 0.5,
        split: str = "train",
        num_subjects: int | None = None,
        alt_contrast: bool = False,
    ) -> None:
        if synthesizer is None or isinstance(synthesizer, Mapping):
            synthesizer = BrainSynthesizer(**dict(synthesizer or {}))
        self.synth = synthesizer
        bad = [c for c in contrasts if c not in CONTRASTS]
        if bad or not contrasts:
            raise ValueError(f"expected contrasts from {CONTRASTS}, got {tuple(contrasts)}.")
        self.contrasts = tuple(contrasts)
        self.cross_contrast_prob, self.same_subject_prob = float(cross_contrast_prob), float(same_subject_prob)
        subject_seed(split, 0)  # validates the split name
        self.split, self.num_subjects, self.alt_contrast = split, num_subjects, bool(alt_contrast)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, Any] | None = None) -> dict[Hashable, Any]:
        d = dict(data or {})
        if d.get("seed") is None:
            self.randomize()
            d["seed"] = self._seed
        rng = np.random.default_rng([int(d["seed"]), 1])
        pool = self.num_subjects or 2**31
        subj_f = subject_seed(self.split, int(rng.integers(pool)))
        subj_m = subj_f
        if rng.random() >= self.same_subject_prob:
            others = [i for i in range(pool) if subject_seed(self.split, i) != subj_f] if pool < 64 else None
            subj_m = subject_seed(self.split, int(rng.choice(others) if others else rng.integers(pool)))
        con_f = self.contrasts[int(rng.integers(len(self.contrasts)))]
        con_m = con_f
        if len(self.contrasts) > 1 and rng.random() < self.cross_contrast_prob:
            con_m = self.contrasts[int(rng.choice([i for i, c in enumerate(self.contrasts) if c != con_f]))]
        affine = torch.as_tensor(self.synth.affine)
        probs_f = self.synth.subject(subj_f)
        probs_m = probs_f if subj_m == subj_f else self.synth.subject(subj_m)
        # a "random" contrast shared by both images uses the same intensities (same seed for the means)
        means_seed_f = int(rng.integers(2**31))
        means_seed_m = means_seed_f if con_m == con_f else int(rng.integers(2**31))
        img_f = self.synth.image(probs_f, self.synth.contrast_means(con_f, means_seed_f), int(rng.integers(2**31)))
        img_m = self.synth.image(probs_m, self.synth.contrast_means(con_m, means_seed_m), int(rng.integers(2**31)))
        d.update(
            fixed_image=MetaTensor(img_f, affine=affine),
            moving_image=MetaTensor(img_m, affine=affine),
            fixed_label=MetaTensor(self.synth.labels(probs_f), affine=affine),
            moving_label=MetaTensor(self.synth.labels(probs_m), affine=affine),
            fixed_to_moving=torch.eye(4, dtype=torch.float64),
            fixed_contrast=con_f,
            moving_contrast=con_m,
            fixed_subject=subj_f,
            moving_subject=subj_m,
        )
        if self.alt_contrast:
            others = [c for c in self.contrasts if c != con_m] or [con_m]
            con_alt = others[int(rng.integers(len(others)))]
            means_alt = self.synth.contrast_means(con_alt, int(rng.integers(2**31)))
            d["moving_image_alt"] = MetaTensor(
                self.synth.image(probs_m, means_alt, int(rng.integers(2**31))), affine=affine
            )
            d["moving_alt_contrast"] = con_alt
        return d


class RandPaird(Randomizable, Transform):
    """Draw a (fixed, moving) pair of image records (paths) at random: the real-data counterpart of :class:`SynthPaird`.

    Output keys: ``fixed_image``, ``moving_image`` (paths), ``fixed_label`` / ``moving_label`` (when every record has
    a label), ``fixed_modality``, ``moving_modality``, ``fixed_subject``, ``moving_subject``, ``fixed_to_moving`` when
    every record carries ``world_from_template`` (so that every item of a batch has the same keys), and ``seed``.
    Deterministic in ``data["seed"]`` if present.

    Args:
        records: image records as returned by :func:`custom_nets.data.load_datalist`.
        same_subject_prob, cross_contrast_prob: pairing probabilities (see :func:`custom_nets.data.sample_pairs`).
    """

    def __init__(
        self, records: Sequence[Mapping[str, Any]], same_subject_prob: float = 0.5, cross_contrast_prob: float = 0.5
    ) -> None:
        if not records:
            raise ValueError("RandPaird: no image records to draw pairs from.")
        self.records = list(records)
        self.same_subject_prob, self.cross_contrast_prob = float(same_subject_prob), float(cross_contrast_prob)
        self.with_labels = all(r.get("label") for r in self.records)  # batches need the same keys in every item
        self.with_truth = all("world_from_template" in r for r in self.records)
        if not self.with_truth and any("world_from_template" in r for r in self.records):
            missing = sum("world_from_template" not in r for r in self.records)
            logger.warning(
                "RandPaird: %d of %d records have no world_from_template; no pair carries a ground truth (error "
                "metrics are nan).",
                missing,
                len(self.records),
            )

    def __call__(self, data: Mapping[Hashable, Any] | None = None) -> dict[Hashable, Any]:
        from .datasets import sample_pairs

        d = dict(data or {})
        if d.get("seed") is None:
            d["seed"] = int(self.R.randint(2**31))
        pair = sample_pairs(self.records, 1, self.same_subject_prob, self.cross_contrast_prob, seed=int(d["seed"]))[0]
        if not self.with_labels:
            pair.pop("fixed_label", None)
            pair.pop("moving_label", None)
        if not self.with_truth:
            pair.pop("fixed_to_moving", None)
        if "fixed_to_moving" in pair:
            pair["fixed_to_moving"] = torch.as_tensor(pair["fixed_to_moving"], dtype=torch.float64)
        d.update(pair)
        return d


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


_NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".hdr", ".img")


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
        keys: exactly two image keys (loaded ``MetaTensor`` with affines, channel first).
        on_disjoint: ``"warn"`` (log a warning naming both files), ``"error"`` (``ValueError`` naming both files)
            or ``"ignore"``.
        allow_missing_keys: skip the check if a key is missing.
    """

    _MODES = ("warn", "error", "ignore")

    def __init__(self, keys: KeysCollection, on_disjoint: str = "warn", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"CheckWorldOverlapd: expected two image keys, got {self.keys}.")
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
    for key in image_keys:
        crop_keys = [key] + [lab for lab, src in zip(label_keys, sources) if src == key]
        out.append(_foreground_crop(crop_keys, key, lower_percentile))
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
        steps += [_foreground_crop([key], key, lower_percentile) for key in refine_keys]
        steps.append(
            ScaleIntensityRangePercentilesd(
                refine_keys, lower_percentile, upper_percentile, 0.0, 1.0, clip=True, allow_missing_keys=True
            )
        )
        at = next(i for i, t in enumerate(out) if isinstance(t, BrainMaskd)) + 1  # the masked RAS images
        out = out[:at] + steps + out[at:]
    return out


def _foreground_crop(keys: list[str], source_key: str, lower_percentile: float) -> CropForegroundd:
    """Crop ``keys`` to the box of ``source_key``'s voxels above its ``lower_percentile``."""
    return CropForegroundd(
        keys,
        source_key=source_key,
        select_fn=AbovePercentile(lower_percentile),
        start_coord_key=None,
        end_coord_key=None,
        allow_missing_keys=True,
    )


def refine_key(image_key: str) -> str:
    """Key of the refinement copy of an image key: ``fixed_image`` -> ``refine_fixed``."""
    return "refine_" + image_key.removesuffix("_image")
