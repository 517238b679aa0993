"""Pair datasets: synthetic pair items, the configs' pair dataset, the pairs to register and the fail-safe dataset
of batch inference."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import Compose

from .augment import RandAffineMovingd, RandFieldOfViewCutd
from .checks import check_image_headers
from .datalists import load_datalist, load_pair_list
from .pair_transforms import RandPaird, SynthPaird
from .transforms import preprocessing_transforms

__all__ = [
    "synthetic_pairs",
    "SyntheticPairDataset",
    "build_pair_dataset",
    "evaluation_items",
    "inference_pairs",
    "FailSafeDataset",
    "collate_pairs",
    "failure_message",
    "FAILURE_KEY",
    "FAILURES_KEY",
]

logger = logging.getLogger(__name__)

#: Key of the failure record an item of :class:`FailSafeDataset` carries when it could not be loaded.
FAILURE_KEY = "failure"
#: Key under which :func:`collate_pairs` lists the failed items of a batch.
FAILURES_KEY = "failures"


class UnseededItems(Sequence):
    """``num_items`` items ``{"seed": None}`` without storing them: a training epoch of any length costs no memory
    (each access returns a new dict, as transforms may add keys to it)."""

    def __init__(self, num_items: int) -> None:
        if int(num_items) < 0:
            raise ValueError(f"expected num_items >= 0, got {num_items}.")
        self.num_items = int(num_items)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [{"seed": None} for _ in range(*index.indices(self.num_items))]
        i = int(index)
        if not -self.num_items <= i < self.num_items:
            raise IndexError(f"item {index} of {self.num_items}")
        return {"seed": None}


def synthetic_pairs(num_pairs: int, seed: int | None = 0) -> Sequence[dict[str, Any]]:
    """Items for a synthetic pair dataset: ``[{"seed": s_0}, ...]``; ``seed=None`` gives unseeded items (training:
    a new pair at every access, drawn from the transforms' random state), as an :class:`UnseededItems` sequence that
    stores nothing."""
    if seed is None:
        return UnseededItems(num_pairs)
    rng = np.random.default_rng([int(seed), 2])
    return [{"seed": int(s)} for s in rng.integers(2**31, size=int(num_pairs))]


class SyntheticPairDataset(Dataset):
    """A MONAI ``Dataset`` of synthetic pairs: :class:`SynthPaird` then :class:`RandAffineMovingd`.

    Args:
        num_pairs: length of the dataset.
        seed: ``None`` for fresh random pairs at every access (training); an int for a fixed, reproducible set
            (evaluation): item ``i`` is then the same pair whenever and wherever it is loaded.
        split: subject stream (``train`` / ``validation`` / ``test``).
        pair: keyword arguments of :class:`SynthPaird` (synthesizer settings, contrasts, probabilities).
        augment: keyword arguments of :class:`RandAffineMovingd`, or ``None`` for no misalignment.
    """

    def __init__(
        self,
        num_pairs: int,
        seed: int | None = 0,
        split: str = "train",
        pair: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        transforms = [SynthPaird(split=split, **dict(pair or {}))]
        if augment is not None:
            transforms.append(RandAffineMovingd(**dict(augment)))
        super().__init__(synthetic_pairs(num_pairs, seed), transform=Compose(transforms))


def evaluation_items(
    angles_deg: Sequence[float] = (0, 45, 90, 135, 180), pairs_per_angle: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """Seeded items of a held-out evaluation set: ``pairs_per_angle`` pairs at each rotation angle (degrees, about a
    random axis, with the augmentation's scale, shear and translation)."""
    rng = np.random.default_rng([int(seed), 9])
    return [
        {"seed": int(rng.integers(2**31)), "rotation_angle_deg": float(a)}
        for a in angles_deg
        for _ in range(int(pairs_per_angle))
    ]


def build_pair_dataset(
    num_pairs: int = 100,
    seed: int | None = None,
    datalist: str | Path | None = None,
    split: str = "training",
    spatial_size: int = 128,
    pixdim: float = 2.0,
    contrasts: Sequence[str] = ("t1", "t2", "pd"),
    cross_contrast_prob: float = 0.5,
    same_subject_prob: float = 0.5,
    synth: Mapping[str, Any] | None = None,
    augment: Mapping[str, Any] | None = None,
    alt_contrast: bool = False,
    items: Sequence[Mapping[str, Any]] | None = None,
    fov_cut: Mapping[str, Any] | None = None,
) -> Dataset:
    """The pair dataset the bundle's configs use: synthetic pairs, or pairs drawn from a datalist of real images.

    Without ``datalist``, pairs are synthesised on the network grid (``spatial_size`` voxels of ``pixdim`` mm) from
    the subject stream of ``split``. With a ``datalist`` (see :func:`load_datalist`), pairs of its ``split`` images are
    drawn at random and preprocessed with :func:`~custom_nets.data.preprocessing_transforms` onto the same grid. Either
    way the moving image is then misaligned by :class:`RandAffineMovingd` (``augment``: its keyword arguments;
    ``None`` for the defaults, ``False`` for none).

    Args:
        num_pairs: dataset length (pairs per epoch).
        seed: ``None``: new random pairs at every access (training); int: a fixed, reproducible set.
        datalist: optional datalist JSON of real images.
        split: ``training`` / ``validation`` / ``test`` (synthetic subject streams or datalist split).
        spatial_size, pixdim: the network grid.
        contrasts, cross_contrast_prob, same_subject_prob: pair sampling (contrasts apply to synthetic data).
        synth: extra :class:`~custom_nets.data.BrainSynthesizer` arguments (deformation, noise, ...).
        augment: :class:`RandAffineMovingd` arguments.
        alt_contrast: synthetic pairs also carry ``moving_image_alt`` (keypoint consistency).
        items: explicit items (e.g. :func:`evaluation_items`) instead of ``num_pairs`` / ``seed``.
        fov_cut: :class:`RandFieldOfViewCutd` arguments (``prob``, ``min_fraction``, ``max_fraction``), applied to
            each image of the pair independently after the misalignment (planes in ``fixed_fov`` / ``moving_fov``);
            ``None`` for no cuts.
    """
    if items is None:
        items = synthetic_pairs(num_pairs, seed)
    stream = {"training": "train", "train": "train", "validation": "validation", "test": "test"}
    if split not in stream:
        raise ValueError(f"expected split in {sorted(stream)}, got {split!r}.")
    if datalist is None:
        synth_args = {"spatial_size": spatial_size, "pixdim": pixdim, **dict(synth or {})}
        first = [
            SynthPaird(
                synth_args,
                contrasts=contrasts,
                cross_contrast_prob=cross_contrast_prob,
                same_subject_prob=same_subject_prob,
                split=stream[split],
                alt_contrast=alt_contrast,
            )
        ]
    else:
        records = load_datalist(datalist, "training" if split == "train" else split)
        check_image_headers([p for r in records for p in (r["image"], r.get("label")) if p])
        pick = RandPaird(records, same_subject_prob=same_subject_prob, cross_contrast_prob=cross_contrast_prob)
        label_keys = ("fixed_label", "moving_label") if pick.with_labels else ()
        first = [pick, *preprocessing_transforms(("fixed_image", "moving_image"), label_keys, pixdim, spatial_size)]
    transforms = list(first)
    if augment is not False:
        transforms.append(RandAffineMovingd(**dict(augment or {})))
    if fov_cut is not None:
        cut = dict(fov_cut)
        transforms += [
            RandFieldOfViewCutd(("fixed_image", "fixed_label"), "fixed_fov", salt=1, **cut),
            RandFieldOfViewCutd(("moving_image", "moving_label", "moving_image_alt"), "moving_fov", salt=2, **cut),
        ]
    data = items if isinstance(items, UnseededItems) else [dict(i) for i in items]
    return Dataset(data, transform=Compose(transforms))


def inference_pairs(
    moving: str | None = None,
    fixed: str | None = None,
    datalist: str | Path | None = None,
    moving_label: str | None = None,
    key: str = "test_pairs",
    moving_mask: str | None = None,
    fixed_mask: str | None = None,
) -> list[dict[str, Any]]:
    """The pairs to register: one ``moving`` / ``fixed`` pair given on the command line, else a pair list JSON.

    Returns items with ``moving_image``, ``fixed_image`` (paths) and, when known, ``moving_label`` and brain masks
    ``moving_mask`` / ``fixed_mask`` (given on the command line with the pair, or per pair in the list). Files of a
    pair list need not exist: a missing one is reported as that pair's failure when it is loaded (see
    :class:`FailSafeDataset`), so the other pairs are still registered.

    Raises:
        ValueError: only one of ``moving`` / ``fixed`` is given, or neither they nor a datalist.
        FileNotFoundError: a file given on the command line does not exist.
    """
    if moving is not None or fixed is not None:
        if moving is None or fixed is None:
            raise ValueError(f"give both --moving and --fixed (got moving={moving!r}, fixed={fixed!r}).")
        item = {"moving_image": str(moving), "fixed_image": str(fixed)}
        for k, v in (("moving_label", moving_label), ("moving_mask", moving_mask), ("fixed_mask", fixed_mask)):
            if v:
                item[k] = str(v)
        for k, v in item.items():
            if not Path(v).is_file():
                raise FileNotFoundError(f"{v}: no such file (--{k.replace('_image', '')}).")
        return [item]
    if datalist is None:
        raise ValueError("nothing to register: give --moving and --fixed, or --datalist with a list of pairs.")
    pairs = load_pair_list(datalist, key, must_exist=False)  # a missing file fails its pair, not the whole run
    if moving_mask or fixed_mask:
        raise ValueError("--moving_mask / --fixed_mask go with --moving / --fixed; give a pair list's masks per pair.")
    keep = ("moving_image", "fixed_image", "moving_label", "moving_mask", "fixed_mask")
    return [{k: p[k] for k in keep if p.get(k)} for p in pairs]


def failure_message(err: BaseException) -> str:
    """``"<Type>: <message>"`` of the exception that explains a failed item.

    MONAI wraps every transform error in ``RuntimeError("applying transform ...")``; those wrappers are unwrapped, so
    the message is the one that names the file and the problem (e.g. from :class:`LoadVolumed`)."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def _describe(item: Any) -> dict[str, Any]:
    """The plain (path / scalar) fields of a data item, for a failure record."""
    if not isinstance(item, Mapping):
        return {"item": str(item)}
    return {str(k): v for k, v in item.items() if isinstance(v, (str, int, float, bool)) or v is None}


class FailSafeDataset(Dataset):
    """A MONAI ``Dataset`` whose items that fail to load or validate become failure records instead of raising.

    Batch inference uses it so that one unreadable pair does not stop the run: the failed item is returned as its
    input fields (e.g. the ``fixed_image`` / ``moving_image`` paths) plus ``{FAILURE_KEY: {"stage": "load",
    "error": "<Type>: <message naming the file and the problem>"}}``, an error is logged, and :func:`collate_pairs`
    moves it out of the batch into the batch's ``failures`` list. ``KeyboardInterrupt`` and other non-``Exception``
    errors still propagate.

    Args:
        data: the items (e.g. from :func:`inference_pairs`).
        transform: the preprocessing (e.g. :func:`~custom_nets.data.preprocessing_transforms` in a ``Compose``).
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            record = _describe(self.data[index])
            record[FAILURE_KEY] = {"stage": "load", "error": failure_message(err)}
            logger.error("item %d could not be loaded: %s", index, record[FAILURE_KEY]["error"])
            return record


def collate_pairs(batch: Sequence[Any]) -> dict[str, Any]:
    """``collate_fn`` for :class:`FailSafeDataset`: MONAI's ``list_data_collate`` of the items that loaded, with the
    failure records listed under ``FAILURES_KEY`` (always present, possibly empty). A batch in which every item failed
    holds only that list.

    Tensors that differ in shape from item to item (each image's refinement copy and brain mask keep their own grid)
    cannot be stacked: such a key holds the list of the items' tensors (each ``(C, ...)`` with its own affine), so
    pairs of any grids batch together; the network inputs (one cube) are stacked as usual. A key that only some
    items have (a mask given for some pairs) holds the list of the items' values, ``None`` where absent."""
    failed = [dict(b) for b in batch if isinstance(b, Mapping) and FAILURE_KEY in b]
    good = [b for b in batch if not (isinstance(b, Mapping) and FAILURE_KEY in b)]
    keys = {k for b in good for k in b}
    ragged = {
        k
        for k in keys
        if any(k not in b for b in good)
        or (all(isinstance(b[k], torch.Tensor) for b in good) and len({tuple(b[k].shape) for b in good}) > 1)
    }
    stackable = [{k: v for k, v in b.items() if k not in ragged} for b in good]
    out: dict[str, Any] = dict(list_data_collate(stackable)) if good else {}
    out.update({k: [b.get(k) for b in good] for k in sorted(ragged, key=str)})
    out[FAILURES_KEY] = failed
    return out
