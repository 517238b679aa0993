"""Random affine misalignment of the moving image (KeyMorph's augmentation), with its ground truth in world mm."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from ..geometry import resample

__all__ = ["random_affine_matrix", "rotation_matrix", "RandAffineMovingd", "RandFieldOfViewCutd"]


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """3 x 3 rotation by ``angle_deg`` degrees about ``axis`` (right-handed, Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(angle_deg)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def _euler(angles_deg: Sequence[float]) -> np.ndarray:
    rx, ry, rz = (rotation_matrix(ax, ang) for ax, ang in zip(np.eye(3), angles_deg))
    return rz @ ry @ rx


def random_affine_matrix(
    rng: np.random.Generator,
    rotate_deg: float = 180.0,
    scale: float = 0.2,
    shear: float = 0.1,
    translate_mm: Sequence[float] | float = 0.0,
    rotation_angle_deg: float | None = None,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A random 4 x 4 world affine ``C T Sh S R C^-1`` about ``centre`` (mm).

    ``R``: Euler rotations ``Rz Ry Rx`` with each angle ``U(-rotate_deg, rotate_deg)`` (KeyMorph's recipe) or, if
    ``rotation_angle_deg`` is given, a rotation by exactly that angle about a uniformly random axis (for evaluation by
    angle). ``S``: per-axis scale ``U(1 - scale, 1 + scale)``; ``Sh``: upper-triangular shear ``U(-shear, shear)``;
    ``T``: translation ``U(-translate_mm, translate_mm)`` per axis.
    """
    if rotation_angle_deg is None:
        rot = _euler(rng.uniform(-rotate_deg, rotate_deg, size=3))
    else:
        rot = rotation_matrix(rng.normal(size=3), rotation_angle_deg)
    s = np.diag(rng.uniform(1 - scale, 1 + scale, size=3))
    sh = np.eye(3)
    sh[0, 1], sh[0, 2], sh[1, 2] = rng.uniform(-shear, shear, size=3)
    lin = sh @ s @ rot
    c = np.asarray(centre, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = rng.uniform(-1, 1, size=3) * np.broadcast_to(np.asarray(translate_mm, dtype=np.float64), (3,))
    out[:3, 3] += c - lin @ c
    return out


class RandAffineMovingd(Randomizable, MapTransform):
    """Misalign the moving image (and its labels) by a random affine; compose it into the pair's ground truth.

    The moving content is pushed forward by a random world affine ``A`` about the centre of its grid (the voxel data
    is resampled, the header is unchanged), so the pair's ``fixed_to_moving`` ground truth becomes ``A @ old``. A pair
    without a ground truth (real images whose records carry no ``world_from_template``) keeps none: ``A`` alone would
    claim that the two images were aligned in world space before, which for two scans is unknown.
    Ranges follow KeyMorph (rotation up to 180 degrees about each axis, scale 20 %, shear 0.1, translation 20 % of half
    the field of view) and are multiplied by :attr:`ramp` (0..1) so they can be ramped in over training.

    If the data dictionary holds an integer ``"seed"``, the draw is a function of it (reproducible, independent of the
    order items are loaded in); otherwise it comes from the transform's random state. A ``"rotation_angle_deg"`` in
    the data dictionary overrides the transform's (per-item angles for evaluation sets).

    Args:
        keys: moving image keys to resample together (absent keys are skipped).
        mode: interpolation per key (``"bilinear"`` / ``"nearest"``).
        transform_key: key of the ``(4, 4)`` ``fixed_to_moving`` ground truth (left absent if absent).
        rotate_deg: maximum Euler angle per axis (degrees).
        scale, shear: maximum relative scale change and shear.
        translate: maximum translation as a fraction of half the field of view per axis.
        rotation_angle_deg: if set, rotate by exactly this angle about a random axis instead of Euler angles.
        ramp: multiplier of every range (and of ``rotation_angle_deg``), 0..1.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "moving_label", "moving_image_alt"),
        mode: Sequence[str] | str = ("bilinear", "nearest", "bilinear"),
        transform_key: str = "fixed_to_moving",
        rotate_deg: float = 180.0,
        scale: float = 0.2,
        shear: float = 0.1,
        translate: float = 0.2,
        rotation_angle_deg: float | None = None,
        ramp: float = 1.0,
        allow_missing_keys: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"expected one mode per key {self.keys}, got {modes}.")
        self.mode = dict(zip(self.keys, modes))
        self.transform_key = transform_key
        self.rotate_deg, self.scale, self.shear, self.translate = rotate_deg, scale, shear, translate
        self.rotation_angle_deg = rotation_angle_deg
        self.ramp = float(ramp)
        self._matrix: np.ndarray | None = None

    def set_ramp(self, ramp: float) -> None:
        """Set the range multiplier (clipped to [0, 1])."""
        self.ramp = float(min(max(ramp, 0.0), 1.0))

    def randomize(self, data: tuple[Sequence[int], np.ndarray, int | None, float | None] | None = None) -> None:
        shape, affine, seed, angle_deg = data if data is not None else ((1, 1, 1), np.eye(4), None, None)
        rng = (
            np.random.default_rng([int(seed), 3]) if seed is not None else np.random.default_rng(self.R.randint(2**31))
        )
        size = np.asarray(shape, dtype=np.float64)
        centre = affine[:3, :3] @ ((size - 1) / 2) + affine[:3, 3]
        half_fov = np.abs(affine[:3, :3]) @ size / 2
        r = self.ramp
        angle_deg = self.rotation_angle_deg if angle_deg is None else angle_deg
        angle = None if angle_deg is None else angle_deg * r
        self._matrix = random_affine_matrix(
            rng, self.rotate_deg * r, self.scale * r, self.shear * r, self.translate * r * half_fov, angle, centre
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        ref = d[first]
        affine = np.asarray(ref.affine if isinstance(ref, MetaTensor) else np.eye(4), dtype=np.float64)
        seed = d.get("seed")
        angle = d.get("rotation_angle_deg")
        self.randomize(
            (ref.shape[1:], affine, None if seed is None else int(seed), None if angle is None else float(angle))
        )
        matrix = torch.from_numpy(self._matrix)
        pullback = torch.linalg.inv(matrix)
        for key in self.key_iterator(d):
            img = d[key]
            a = torch.as_tensor(np.asarray(img.affine, dtype=np.float64)) if isinstance(img, MetaTensor) else None
            plain = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            warped = resample(plain.unsqueeze(0).float(), pullback, plain.shape[1:], a, a, mode=self.mode[key])[0].to(
                plain.dtype
            )
            d[key] = MetaTensor(warped, meta=img.meta) if isinstance(img, MetaTensor) else warped
        if d.get(self.transform_key) is not None:
            d[self.transform_key] = matrix @ torch.as_tensor(d[self.transform_key], dtype=torch.float64)
        return d


class RandFieldOfViewCutd(Randomizable, MapTransform):
    """Cut an image's field of view at random, as scans with the cerebellum, the vertex or a side left out are cut.

    With probability ``prob``, every voxel beyond a plane perpendicular to one voxel axis (chosen at random, either
    end) is set to 0 in the keyed image and its labels, so that a fraction ``U(min_fraction, max_fraction)`` of the
    first key's foreground (voxels above ``threshold``) is removed. A detector trained on whole brains places its
    keypoints partly by what it no longer sees: cutting the cerebellum off (17 % of the brain) moved the shipped
    detector's keypoints by 22 mm on average. Training with cuts is meant to make it place them by the anatomy in
    view (the model card says what a short fine-tune did).

    The cut is recorded in ``plane_key`` as a ``(4,)`` float64 world-mm plane ``(n, d)``: a world point ``x`` was cut
    away when ``n . x > d``. An item left whole gets ``(0, 0, 0, 0)`` (no point is cut). Losses that regress anatomical
    points (:class:`~custom_nets.losses.KeypointPretrainLoss`) leave out the points that fell outside the view.

    If the data dictionary holds an integer ``"seed"``, the draw is a function of it and of ``salt`` (one salt per
    image side, so that the two sides of a pair are cut independently).

    Args:
        keys: the image key first, then its labels (absent keys are skipped).
        plane_key: where the cut plane is stored.
        prob: probability of a cut.
        min_fraction, max_fraction: range of the foreground fraction removed.
        threshold: foreground threshold on the first key's intensities.
        salt: mixed into a seeded draw.
    """

    def __init__(
        self,
        keys: KeysCollection,
        plane_key: str,
        prob: float = 0.3,
        min_fraction: float = 0.05,
        max_fraction: float = 0.35,
        threshold: float = 0.05,
        salt: int = 0,
        allow_missing_keys: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= min_fraction <= max_fraction < 1.0:
            raise ValueError(f"expected 0 <= min_fraction <= max_fraction < 1, got {min_fraction}, {max_fraction}.")
        self.plane_key, self.prob = plane_key, float(prob)
        self.min_fraction, self.max_fraction = float(min_fraction), float(max_fraction)
        self.threshold, self.salt = float(threshold), int(salt)
        self._draw: tuple[bool, int, int, float] = (False, 0, 1, 0.0)

    def randomize(self, data: int | None = None) -> None:
        rng = np.random.default_rng([int(data), 11, self.salt]) if data is not None else None
        u = rng.random(4) if rng is not None else self.R.random_sample(4)
        self._draw = (bool(u[0] < self.prob), int(u[1] * 3) % 3, 1 if u[2] < 0.5 else -1, float(u[3]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        seed = d.get("seed")
        self.randomize(None if seed is None else int(seed))
        cut, axis, side, u = self._draw
        plane = torch.zeros(4, dtype=torch.float64)
        img = d[first]
        fg = torch.nonzero(torch.as_tensor(img)[0] > self.threshold)[:, axis].double() if cut else None
        if fg is not None and fg.numel() > 0:
            fraction = self.min_fraction + (self.max_fraction - self.min_fraction) * u
            # the `fraction` of the foreground at that end goes; the boundary lies half-way between voxel centres
            level = float(torch.quantile(side * fg, 1.0 - fraction)) * side
            level = math.floor(level) + 0.5 if side > 0 else math.ceil(level) - 0.5
            index = torch.arange(img.shape[1 + axis], dtype=torch.float64)
            keep = (side * index < side * level).to(torch.float32)
            view = [1, 1, 1]
            view[axis] = -1
            keep = keep.reshape(1, *view)
            for key in self.key_iterator(d):
                d[key] = d[key] * keep.to(d[key].dtype)
            affine = np.asarray(img.affine if isinstance(img, MetaTensor) else np.eye(4), dtype=np.float64)
            row = np.linalg.inv(affine)[axis]  # world -> voxel coordinate along `axis`
            plane = torch.as_tensor(np.append(side * row[:3], side * (level - row[3])))
        d[self.plane_key] = plane
        return d
