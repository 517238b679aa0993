"""MONAI transforms that make one (fixed, moving) pair item: synthesised from a seed, or drawn from image records.

Both are deterministic in the item's ``seed`` when it has one. Synthetic pairs lie on the cube grid of their
:class:`~custom_nets.data.BrainSynthesizer` (voxel-to-world affine in MNI RAS mm); drawn pairs are paths, loaded and
preprocessed later. A ``fixed_to_moving`` ground truth is a ``(4, 4)`` world (mm) matrix, as in
:mod:`custom_nets.geometry`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable, Transform

from .datalists import sample_pairs
from .synth import CONTRASTS, BrainSynthesizer, subject_seed

__all__ = ["SynthPaird", "RandPaird"]

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
