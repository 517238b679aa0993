"""MONAI dictionary transforms: synthetic pairs, checked NIfTI loading and the network preprocessing."""

from __future__ import annotations

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
    Spacingd,
    Transform,
)

from .synth import CONTRASTS, BrainSynthesizer, subject_seed

__all__ = ["SynthPaird", "RandPaird", "LoadVolumed", "preprocessing_transforms"]


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
    both records carry ``world_from_template``, and ``seed``. Deterministic in ``data["seed"]`` if present.

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

    def __call__(self, data: Mapping[Hashable, Any] | None = None) -> dict[Hashable, Any]:
        from .datasets import sample_pairs

        d = dict(data or {})
        if d.get("seed") is None:
            d["seed"] = int(self.R.randint(2**31))
        pair = sample_pairs(self.records, 1, self.same_subject_prob, self.cross_contrast_prob, seed=int(d["seed"]))[0]
        if not self.with_labels:
            pair.pop("fixed_label", None)
            pair.pop("moving_label", None)
        if "fixed_to_moving" in pair:
            pair["fixed_to_moving"] = torch.as_tensor(pair["fixed_to_moving"], dtype=torch.float64)
        d.update(pair)
        return d


class LoadVolumed(MapTransform):
    """Load 3D images with MONAI ``LoadImaged`` (channel first) and fail with the file named on anything unusable.

    Errors (``ValueError`` / ``FileNotFoundError``, message starting with the path): missing file, unreadable or
    corrupt file, not a single-channel 3D volume (2D, 4D / multi-channel), NaN or Inf voxels, and (unless
    ``reject_constant=False``, e.g. for label maps that may be empty) a constant image.
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
            if not torch.isfinite(img).all():
                raise ValueError(f"{path}: contains NaN or Inf voxels.")
            if self.reject_constant and img.numel() and bool(img.max() == img.min()):
                raise ValueError(
                    f"{path}: every voxel is {float(img.min()):g} (a constant image has nothing to register)."
                )
            d[key] = img
        return d


def preprocessing_transforms(
    image_keys: KeysCollection = ("fixed_image", "moving_image"),
    label_keys: KeysCollection = (),
    pixdim: float = 2.0,
    spatial_size: int = 128,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    source_keys: Mapping[str, str] | None = None,
) -> list[Transform]:
    """The preprocessing that brings any NIfTI to the network's input, keeping each image's world affine.

    Load (checked) -> RAS orientation -> isotropic ``pixdim`` spacing -> robust intensity scaling to [0, 1]
    (percentiles) -> crop to the foreground -> centre-pad / crop to a ``spatial_size`` cube. With the defaults the
    cube spans 256 mm, so a brain rotated by any angle about its centre is not cropped. Every step updates the
    ``MetaTensor`` affine, so network-space keypoints map back to each original image exactly.

    Args:
        image_keys: image keys.
        label_keys: label keys (nearest-neighbour resampling, no intensity scaling).
        pixdim: output voxel size (mm).
        spatial_size: output cube side (voxels).
        lower_percentile, upper_percentile: intensity percentiles mapped to 0 and 1 (clipped).
        source_keys: for each label key, the image key whose foreground defines the crop (default: the label
            key with ``_label`` replaced by ``_image``).

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
    if label_keys:
        out.append(LoadVolumed(label_keys, allow_missing_keys=True, reject_constant=False))
    out += [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        Spacingd(keys, pixdim=pixdim, mode=modes, padding_mode="zeros", allow_missing_keys=True),
        ScaleIntensityRangePercentilesd(
            image_keys, lower_percentile, upper_percentile, 0.0, 1.0, clip=True, allow_missing_keys=True
        ),
    ]
    for key in image_keys:
        crop_keys = [key] + [lab for lab in label_keys if source_keys.get(lab, lab.replace("_label", "_image")) == key]
        out.append(
            CropForegroundd(
                crop_keys, source_key=key, start_coord_key=None, end_coord_key=None, allow_missing_keys=True
            )
        )
    out.append(ResizeWithPadOrCropd(keys, spatial_size=spatial_size, allow_missing_keys=True))
    return out
