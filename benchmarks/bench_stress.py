"""Stress benchmark: the bundle's real inference on pairs that look like real life, each with an exact truth.

    python benchmarks/bench_stress.py main --mode smoke --out_dir bench_stress_smoke   # 4 pairs (the test's)
    python benchmarks/bench_stress.py main --mode quick --out_dir bench_stress_quick   # 34 pairs
    python benchmarks/bench_stress.py main --mode full --out_dir bench_stress          # 340 pairs
    python benchmarks/bench_stress.py main --mode raw --out_dir bench_stress_raw       # full's 40 raw-head pairs
    python benchmarks/bench_stress.py report --out_dir bench_stress --mode full        # re-score saved runs

Cost, measured on 2 cores shared with other jobs (load about 6): pairs 6-18 s each (thick slices and raw heads the
most), the default inference 66 s per pair (quick mode: 6 min of pairs, 37 min for ``keymorph_refine``); full mode
is 10x quick. Disk: about 3 MB per pair, plus about 3 MB per pair and variant (the warped images the bundle writes).

Pairs (``out_dir/pairs/*.nii.gz`` and ``pairs.json``; truth ``fixed_to_moving_ras``, a world RAS mm matrix mapping a
fixed point to the corresponding moving point). Every subject is held out: ``subject_seed("test", 5000 + ...)``,
indices that neither training nor ``bench_registration.py`` (1000-1099) use. Each image of a subject is synthesised in
its own head pose (``BrainSynthesizer.subject(seed, pose)``): the fixed image in a near-upright pose (+-8 degrees per
axis, +-8 mm), the moving image rotated by 0-180 degrees about a random axis (angles stratified per kind), shifted by
up to +-15 mm and scaled by up to +-10 % per axis, so truth = ``pose_moving @ inv(pose_fixed)``. The reported angle is
the rotation angle of that relative transform. Images are stored as int16 in arbitrary scanner units, each on its own
grid cut around its head with a random margin (not on a shared cube).

Image formation and corruption are this file's own code (not ``BrainSynthesizer.image``): tissue intensities mixed
by the tissue probabilities (partial volume), then anisotropic Gaussian blur (world mm), a multiplicative bias field
of another form (a sum of 2-4 random 3D Gaussians, or a quadratic polynomial, in world mm) scaled so that its
max / min over the brain is 1 + r, Rician noise (magnitude of complex Gaussian noise, over the whole grid, so the
background holds Rayleigh noise), a gamma, and a random global scale. Fixed images: T1, bias r 5-15 %, Rician noise
1-2 %. Moving images: mild corruption (bias 5-20 %, noise 1-3 %, blur sigma < 0.6 mm, gamma ~ exp(N(0, 0.08)))
unless the kind says otherwise.

Kinds (source categories), ``per_kind`` pairs each (full 20, quick 2):

* corruption of the moving image (contrast T1 / T2 / PD / FLAIR in turn): ``bias`` (r 10-40 %), ``noise`` (Rician
  sigma 4-12 % of the mean brain intensity), ``blur`` (sigma 1.5-3 mm along one world axis, 0.2-0.8 mm along the
  others), ``gamma`` (exponent 0.5-0.74 or 1.35-2), ``all_corruptions`` (the four at once);
* contrast of the moving image: ``t2`` (CSF > GM > WM), ``pd`` (flat, CSF slightly brightest), ``flair`` (CSF dark, WM
  darker than GM), ``remap`` (a smooth random non-monotone curve applied to the tissue intensities);
* thick slices: ``thick_axial`` (1 x 1 x 5 mm) and ``thick_sagittal`` (5 x 1 x 1 mm): the subject is synthesised on a
  1 mm grid and averaged over each 5 mm slab (the slice profile), stored on the anisotropic grid whose affine places
  each slab's centre exactly; every other one stored LPS (first two voxel axes reversed);
* partial field of view: ``fov_top`` (the top 15 % of the brain's extent along the grid axis nearest the head's
  superior direction cut off) and ``fov_cerebellum`` (everything below the level of template z = -30 ... -20 mm cut
  off: cerebellum and brainstem when the head is upright); the cut image is alternately the fixed (near upright) and
  the moving (rotated: the cut is then oblique to the anatomy, as in a tilted head); the slabs are removed from the
  stored grid in two pairs of three, zeroed in the third;
* ``inter_subject`` (two different subjects) and ``mni_vs_synth`` (the real MNI ICBM152 T1 from nilearn against a
  synthetic subject, alternately as fixed and moving). Their truth is only good to the subjects' own deformation (a
  smooth field of about 3 mm std): reported separately, their "success" is not comparable with the others';
* ``raw_same`` / ``raw_inter`` (raw heads from ``custom_nets.data.heads.HeadSynthesizer``: skull, scalp, neck,
  background; same subject or two subjects), each with a brain-only twin ``twin_same`` / ``twin_inter`` (the same
  heads, poses and corruption, skull-stripped with the truth brain mask). Skipped, with a message, while
  ``heads.py`` is missing.

Methods: ``keymorph_refine`` (the default inference) and ``keymorph`` (``--refine False``) run the way a user runs
them: ONE ``python -m monai.bundle run inference --config_file configs/inference.json --datalist <datalist.json>
--output_dir <dir> --bundle_root <bundle> --write_png False --fail_on_error False`` process per variant (cwd
``bundle/``); each pair's ``<moving stem>.json`` is read (``fixed_to_moving_ras`` and, when present, the ``quality``
block). ``ants`` (antspyx affine, through ``bench_registration.py run_method`` in its own process) runs on every 10th
pair. Time: process wall time / pairs (model load included), and per pair the time between the completion of
consecutive result JSONs (the first from the process start); ANTs' per-pair time is in-process (reading the images to
the matrix). ``--inprocess_timing True`` also times the keymorph variants in process on ANTs' subset (like for like).

Score: mean distance (mm) over the fixed brain voxels (truth labels > 0) between the predicted and the true
``fixed_to_moving``. Reported per kind, per group and overall: success (< 2 mm), median, 95th percentile, gross
failures (> 10 mm, or no result), and how the quality verdict sorts the pairs (of pairs > 2 mm, how many are
``suspect``; of pairs < 2 mm, how many are falsely ``suspect``; a "silent" failure is > 2 mm with verdict ``ok``).
Writes ``results.csv``, ``summary.json``, ``table.md`` and ``error_vs_angle.png``. Pairs are deterministic in
``--seed`` (ANTs itself is not deterministic).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUNDLE = ROOT / "bundle"
BENCH_REGISTRATION = HERE / "bench_registration.py"
THREADS = 2
SUCCESS_MM = 2.0
GROSS_MM = 10.0
SUBJECT_BASE = 5000  # held-out test subject indices; bench_registration.py uses 1000-1099
CENTRE = np.array([0.0, -17.0, 5.0])  # custom_nets.data.template.BRAIN_CENTRE_MNI (not imported: keeps --help light)

#: kind -> (group, short description)
KINDS: dict[str, tuple[str, str]] = {
    "bias": ("corruption", "bias field 10-40 % (Gaussians / polynomial)"),
    "noise": ("corruption", "Rician noise 4-12 %"),
    "blur": ("corruption", "anisotropic blur"),
    "gamma": ("corruption", "gamma 0.5-0.74 / 1.35-2"),
    "all_corruptions": ("corruption", "bias + noise + blur + gamma"),
    "t2": ("contrast", "T2-like"),
    "pd": ("contrast", "PD-like"),
    "flair": ("contrast", "FLAIR-like"),
    "remap": ("contrast", "non-monotone remap"),
    "thick_axial": ("thick", "1 x 1 x 5 mm"),
    "thick_sagittal": ("thick", "5 x 1 x 1 mm"),
    "fov_top": ("fov", "top 15 % cut"),
    "fov_cerebellum": ("fov", "cerebellum cut"),
    "inter_subject": ("inter", "two subjects (truth +- deformation)"),
    "mni_vs_synth": ("inter", "MNI T1 vs synthetic (truth +- deformation)"),
    "raw_same": ("raw", "raw heads, same subject"),
    "twin_same": ("twin", "brain-only twin of raw_same"),
    "raw_inter": ("raw", "raw heads, two subjects (truth +- deformation)"),
    "twin_inter": ("twin", "brain-only twin of raw_inter"),
}
RAW_KINDS = ("raw_same", "raw_inter")
BRAIN_KINDS = tuple(k for k, (g, _) in KINDS.items() if g not in ("raw", "twin"))
GROUPS: dict[str, tuple[str, ...]] = {
    "exact truth, brain-only (corruption, contrast, thick, fov)": tuple(
        k for k, (g, _) in KINDS.items() if g in ("corruption", "contrast", "thick", "fov")
    ),
    "inter-subject, truth +- 3 mm deformation": ("inter_subject", "mni_vs_synth"),
    "raw heads (all)": RAW_KINDS,
    "brain-only twins of the raw heads (all)": ("twin_same", "twin_inter"),
}
APPROXIMATE = ("inter_subject", "mni_vs_synth", "raw_inter", "twin_inter")  # truth +- the subjects' deformation
EXACT_ALL = "every exact-truth pair (one subject: brain-only, raw_same, twin_same)"
APPROX_ALL = "every inter-subject pair (truth +- deformation)"
GROUPS[EXACT_ALL] = tuple(k for k in KINDS if k not in APPROXIMATE)
GROUPS[APPROX_ALL] = APPROXIMATE
MODES: dict[str, dict[str, Any]] = {
    # the test's: one thick (LPS), one cut field of view (slabs removed from the moving grid), one inter-subject and
    # one heavily corrupted pair
    "smoke": {"pairs": (("thick_axial", 0), ("fov_top", 0), ("inter_subject", 0), ("all_corruptions", 0)), "raw": 0},
    "quick": {"per_kind": 2, "raw": 1},
    "full": {"per_kind": 20, "raw": 10},
    # the full mode's raw-head pairs and their brain-only twins alone (40 pairs): to measure a brain-extraction change
    "raw": {"pairs": (), "raw": 10},
}
VARIANTS = {"keymorph_refine": (), "keymorph": ("--refine", "False")}
METHODS = (*VARIANTS, "ants")
#: Tissue means (CSF, GM, WM) before a +-10 % jitter; background is 0.
CONTRAST_MEANS = {
    "t1": (0.25, 0.55, 0.80),
    "t2": (1.00, 0.60, 0.40),
    "pd": (0.85, 0.75, 0.62),
    "flair": (0.08, 0.70, 0.50),
}
QUALITY_FIELDS = (
    "nmi",
    "lncc",
    "foreground_overlap",
    "keypoint_residual_mm",
    "keypoints_used",
    "inverse_consistency_mm",
)


# ------------------------------------------------------------------------------------------------- image formation
def _world_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World mm ``(*shape, 3)`` (float32) of every voxel centre."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)).T.reshape(*shape, 3)


def _bias_field(
    shape: tuple[int, ...], affine: np.ndarray, brain: np.ndarray, form: str, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth multiplicative field whose max / min over the brain is ``1 + ratio`` (world mm, so a field of the
    scanner, not of the grid): ``gaussians`` (sum of 2-4 random 3D Gaussians, sigma 40-110 mm, about the brain) or
    ``polynomial`` (random quadratic in world mm / 80)."""
    world = _world_points(shape, affine).reshape(-1, 3)
    centre = world[brain.reshape(-1)].mean(0) if brain.any() else world.mean(0)
    if form == "gaussians":
        g = np.zeros(world.shape[0], dtype=np.float32)
        for _ in range(int(rng.integers(2, 5))):
            c = centre + rng.uniform(-70.0, 70.0, size=3)
            s = rng.uniform(40.0, 110.0)
            g += rng.uniform(-1.0, 1.0) * np.exp(-((world - c) ** 2).sum(1) / (2 * s * s))
    elif form == "polynomial":
        u = (world - centre) / 80.0
        terms = [u[:, 0], u[:, 1], u[:, 2], u[:, 0] ** 2, u[:, 1] ** 2, u[:, 2] ** 2]
        terms += [u[:, 0] * u[:, 1], u[:, 0] * u[:, 2], u[:, 1] * u[:, 2]]
        g = sum(rng.normal() * t for t in terms)
    else:
        raise ValueError(f"unknown bias form {form!r}.")
    inside = g[brain.reshape(-1)] if brain.any() else g
    lo, hi = float(inside.min()), float(inside.max())
    unit = np.clip((g - lo) / max(hi - lo, 1e-9), -1.0, 2.0)  # 0..1 over the brain; bounded beyond it
    return np.exp(math.log1p(ratio) * unit).reshape(shape).astype(np.float32)


def _acquire(signal: np.ndarray, affine: np.ndarray, brain: np.ndarray, spec: dict, rng: np.random.Generator):
    """Blur (world mm), bias, Rician noise, gamma and a global scale; returns the int16 image (scanner units)."""
    from scipy.ndimage import gaussian_filter

    img = np.asarray(signal, dtype=np.float32)
    if spec.get("blur_mm") is not None:
        # voxel axis a runs along world axis argmax |affine[:3, a]| (axis-aligned grids here)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        world_axis = np.abs(affine[:3, :3]).argmax(0)
        sigma = [spec["blur_mm"][world_axis[a]] / spacing[a] for a in range(3)]
        img = gaussian_filter(img, sigma, mode="constant").astype(np.float32)
    if spec.get("bias") is not None:
        img = img * _bias_field(img.shape, affine, brain, spec["bias"]["form"], spec["bias"]["ratio"], rng)
    ref = float(img[brain].mean()) if brain.any() else float(img.mean())
    sigma = spec["noise"] * ref
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag)
    top = float(np.percentile(img[brain], 99.5)) if brain.any() else float(img.max())
    img = img / max(top, 1e-9)
    if spec.get("gamma") is not None:
        img = img ** np.float32(spec["gamma"])
    return np.clip(np.rint(img * spec["scale"]), 0, 32767).astype(np.int16)


def _tissue_means(contrast: str, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(CONTRAST_MEANS["t1" if contrast == "remap" else contrast], dtype=np.float64)
    return np.concatenate([[0.0], base * (1 + rng.uniform(-0.1, 0.1, size=3))])


def _render(probs: np.ndarray, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Noise-free signal of tissue probabilities ``(4, ...)`` (partial volume). ``remap``: the brain part's T1-like
    intensity goes through a smooth random non-monotone curve (a natural cubic spline through 6 random knots)."""
    means = _tissue_means(contrast, rng)
    if contrast != "remap":
        return np.tensordot(means, probs, axes=1).astype(np.float32)
    from scipy.interpolate import CubicSpline

    brain = 1.0 - probs[0]
    x = np.tensordot(means[1:], probs[1:], axes=1) / np.maximum(brain, 1e-6)
    curve = CubicSpline(np.linspace(0.0, 1.0, 6), rng.uniform(0.1, 1.0, size=6), bc_type="natural")
    lut_x = np.linspace(0.0, 1.0, 1025)
    lut = np.clip(curve(lut_x), 0.03, 1.2)
    return (brain * np.interp(np.clip(x, 0.0, 1.0), lut_x, lut)).astype(np.float32)


def _corruption(kind: str, j: int, rng: np.random.Generator, fixed: bool = False) -> dict[str, Any]:
    """The acquisition of one image: this kind's corruption of the moving image, or the mild default."""
    forms = ("gaussians", "polynomial")
    if fixed:
        return {"bias": {"form": "gaussians", "ratio": float(rng.uniform(0.05, 0.15))},
                "noise": float(rng.uniform(0.01, 0.02)), "blur_mm": None, "gamma": None,
                "scale": float(rng.uniform(300, 3000))}  # fmt: skip
    spec: dict[str, Any] = {
        "bias": {"form": forms[int(rng.integers(2))], "ratio": float(rng.uniform(0.05, 0.20))},
        "noise": float(rng.uniform(0.01, 0.03)),
        "blur_mm": [float(s) for s in rng.uniform(0.0, 0.6, size=3)],
        "gamma": float(np.exp(rng.normal(0.0, 0.08))),
        "scale": float(rng.uniform(300, 3000)),
    }
    strong_bias = {"form": forms[j % 2], "ratio": float(rng.uniform(0.10, 0.40))}
    strong_noise = float(rng.uniform(0.04, 0.12))
    blur = rng.uniform(0.2, 0.8, size=3)
    blur[int(rng.integers(3))] = rng.uniform(1.5, 3.0)
    strong_gamma = float(np.exp(rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.7)))
    if kind in ("bias", "all_corruptions"):
        spec["bias"] = strong_bias
    if kind in ("noise", "all_corruptions"):
        spec["noise"] = strong_noise
    if kind in ("blur", "all_corruptions"):
        spec["blur_mm"] = [float(s) for s in blur]
    if kind in ("gamma", "all_corruptions"):
        spec["gamma"] = strong_gamma
    if kind.startswith("thick"):
        spec["blur_mm"] = None  # the slab is the blur
    return spec


# ------------------------------------------------------------------------------------------------------------ grids
class _Factory:
    """What every pair shares: the 2 mm synthesis cube, the template, its brain points (for head boxes)."""

    def __init__(self) -> None:
        import torch

        from custom_nets.data import BrainSynthesizer
        from custom_nets.data.template import load_tissue_template

        self.torch = torch
        self.synth = BrainSynthesizer(spatial_size=128, pixdim=2.0)
        self.cube_affine = np.asarray(self.synth.affine, dtype=np.float64)
        self.template = load_tissue_template()
        t = self.template
        brain = np.argwhere(t.probs[0] < 0.5)[::7].astype(np.float64)
        self.brain_points = brain @ t.affine[:3, :3].T + t.affine[:3, 3]
        self.t1 = torch.from_numpy(np.ascontiguousarray(t.t1))[None, None]
        self.t_affine = torch.as_tensor(t.affine, dtype=torch.float64)
        self._t_labels = None

    @property
    def t_labels(self) -> Any:
        """The template's arg-max tissue labels ``(1, 1, I, J, K)`` (computed when first needed)."""
        if self._t_labels is None:
            labels = self.template.probs.argmax(0).astype(np.float32)
            self._t_labels = self.torch.from_numpy(labels)[None, None]
        return self._t_labels

    def head_box(
        self, pose: np.ndarray, rng: np.random.Generator, pad: float = 12.0, margin: tuple = (6.0, 20.0)
    ) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi) around the posed brain: +``pad`` mm for the subject's deformation and a random margin
        (mm, per side; background the scanner would see)."""
        pts = self.brain_points @ pose[:3, :3].T + pose[:3, 3]
        return pts.min(0) - pad - rng.uniform(*margin, size=3), pts.max(0) + pad + rng.uniform(*margin, size=3)

    def cube_crop(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
        """Slices of the 2 mm cube covering the world box (clipped to the cube) and the crop's exact affine."""
        a = self.cube_affine
        i0 = np.clip(np.floor((lo - a[:3, 3]) / 2.0), 0, 127).astype(int)
        i1 = np.clip(np.ceil((hi - a[:3, 3]) / 2.0), 0, 127).astype(int)
        crop = a.copy()
        crop[:3, 3] = a[:3, 3] + 2.0 * i0
        return tuple(slice(int(s), int(e) + 1) for s, e in zip(i0, i1)), crop

    def subject(self, seed: int, pose: np.ndarray, sl: tuple[slice, ...]) -> np.ndarray:
        """Tissue probabilities ``(4, ...)`` of the subject in this pose, on the cube crop ``sl``."""
        return self.synth.subject(seed, pose=pose)[(slice(None), *sl)].numpy()

    def mni(self, pose: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The real MNI T1 (nilearn) and its tissue labels, posed (template point p at world pose @ p)."""
        from custom_nets.geometry import resample

        torch = self.torch
        pull = torch.linalg.inv(torch.as_tensor(pose, dtype=torch.float64))
        grid = torch.as_tensor(affine, dtype=torch.float64)
        t1 = resample(self.t1, pull, shape, grid, self.t_affine)[0, 0].numpy()
        lab = resample(self.t_labels, pull, shape, grid, self.t_affine, mode="nearest")[0, 0].numpy()
        return np.clip(t1, 0.0, None), lab.astype(np.uint8)


def _lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with voxel axes 0 and 1 reversed (an LPS grid); world content unchanged."""
    flip = np.eye(4)
    for ax in (0, 1):
        flip[ax, ax], flip[ax, 3] = -1.0, data.shape[ax] - 1
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip


def _thick(factory: _Factory, seed: int, pose: np.ndarray, axis: int, rng: np.random.Generator, contrast: str):
    """A thick-slice image: synthesised at 1 mm, averaged over 5 mm slabs along ``axis``; returns (signal, probs-
    averaged labels, affine of the stored grid). Stored voxel s along ``axis`` holds fine voxels 5 s .. 5 s + 4, so
    its centre is fine voxel 5 s + 2: ``A_stored = A_fine @ M`` with ``M`` = scale 5, offset 2 along ``axis``."""
    from custom_nets.data import BrainSynthesizer

    lo, hi = factory.head_box(pose, rng, margin=(0.0, 2.0))  # synthesised tightly; background margin added below
    lo, hi = np.floor(lo), np.ceil(hi)
    n = (hi - lo).astype(int) + 1
    n[axis] = 5 * int(math.ceil(n[axis] / 5))
    fine = BrainSynthesizer(spatial_size=tuple(int(v) for v in n), pixdim=1.0, centre=lo + (n - 1) / 2.0)
    probs = fine.subject(seed, pose=pose).numpy()
    fine_affine = np.asarray(fine.affine, dtype=np.float64)
    signal = _render(probs, contrast, rng)
    shape = list(probs.shape[1:])
    shape[axis : axis + 1] = [shape[axis] // 5, 5]
    signal = signal.reshape(shape).mean(axis + 1)
    probs = probs.reshape(4, *shape).mean(axis + 2)
    m = np.eye(4)
    m[axis, axis], m[axis, 3] = 5.0, 2.0
    labels = probs.argmax(0).astype(np.uint8)
    # the scanner's field of view: 4-18 mm of background around the synthesised box, in whole stored voxels
    spacing = np.ones(3)
    spacing[axis] = 5.0
    before, after = (np.ceil(rng.uniform(4.0, 18.0, size=3) / spacing).astype(int) for _ in range(2))
    widths = [(int(b), int(a)) for b, a in zip(before, after)]
    shift = np.eye(4)
    shift[:3, 3] = -before
    return np.pad(signal, widths), np.pad(labels, widths), fine_affine @ m @ shift


def _cut(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, pose: np.ndarray, part: str, remove: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Cut the field of view perpendicular to the grid axis nearest the head's superior direction: ``top`` (the top
    15 % of the brain's extent along it) or ``cerebellum`` (below the level of template z in [-30, -20] mm). Slabs
    are removed from the grid (``remove``; affine shifted exactly) or zeroed."""
    up = np.linalg.inv(affine[:3, :3]) @ (pose[:3, :3] @ np.array([0.0, 0.0, 1.0]))  # superior, in voxel axes
    axis = int(np.abs(up).argmax())
    sign = 1 if up[axis] > 0 else -1
    n = image.shape[axis]
    occupied = np.nonzero((labels > 0).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    lo, hi = int(occupied.min()), int(occupied.max())
    if part == "top":
        level = lo + 0.85 * (hi - lo) if sign > 0 else hi - 0.85 * (hi - lo)
        info = {"fraction_of_extent": 0.15}
    else:
        z = float(rng.uniform(-30.0, -20.0))
        point = pose @ np.array([0.0, -17.0, z, 1.0])
        level = float((np.linalg.inv(affine) @ point)[axis])
        info = {"template_z_mm": z}
    keep_low = (part == "top") == (sign > 0)  # keep the voxels below the level (index-wise)
    keep = (0, int(math.floor(level))) if keep_low else (int(math.ceil(level)), n - 1)
    keep = (max(0, keep[0]), min(n - 1, keep[1]))
    sl = [slice(None)] * 3
    sl[axis] = slice(keep[0], keep[1] + 1)
    sl = tuple(sl)
    brain_before = int((labels > 0).sum())
    if remove:
        offset = np.zeros(3)
        offset[axis] = keep[0]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
        image, labels = np.ascontiguousarray(image[sl]), np.ascontiguousarray(labels[sl])
        keep = (0, keep[1] - keep[0])
    else:
        mask = np.zeros(image.shape, dtype=bool)
        mask[sl] = True
        image, labels = np.where(mask, image, 0).astype(image.dtype), np.where(mask, labels, 0).astype(labels.dtype)
    removed = 1.0 - int((labels > 0).sum()) / max(brain_before, 1)
    return image, labels, affine, {"part": part, "axis": axis, "keep": list(keep), "removed_slabs": remove,
                                   "brain_fraction_removed": removed, **info}  # fmt: skip


def _rotation_angle(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation part (polar decomposition) of a 4 x 4 affine."""
    u, _, vt = np.linalg.svd(np.asarray(matrix)[:3, :3])
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def _poses(rng: np.random.Generator, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed pose (near upright) and moving pose (``angle`` about a random axis, shift, scale), about the brain."""
    from custom_nets.data import random_affine_matrix

    pose_f = random_affine_matrix(rng, rotate_deg=8.0, scale=0.0, shear=0.0, translate_mm=8.0, centre=CENTRE)
    pose_m = random_affine_matrix(rng, 0.0, 0.1, 0.0, 15.0, rotation_angle_deg=float(angle), centre=CENTRE)
    return pose_f, pose_m


# ------------------------------------------------------------------------------------------------------------ pairs
def pair_plan(mode: str) -> list[tuple[str, int]]:
    """The (kind, index) pairs of a mode, in order (raw kinds each followed by their twins)."""
    if mode not in MODES:
        raise ValueError(f"expected mode in {tuple(MODES)}, got {mode!r}.")
    cfg = MODES[mode]
    plan = list(cfg["pairs"]) if "pairs" in cfg else [(k, j) for k in BRAIN_KINDS for j in range(cfg["per_kind"])]
    for kind in RAW_KINDS:
        for j in range(cfg["raw"]):
            plan += [(kind, j), (kind.replace("raw", "twin"), j)]
    return plan


def _angle(seed: int, kind: str, j: int, n: int, rng: np.random.Generator) -> float:
    """Rotation angle of pair j of a kind: 0-180 degrees in n strata, the strata in a random order per kind."""
    order = np.random.default_rng([seed, list(KINDS).index(kind), 99]).permutation(max(n, j + 1))
    return float(180.0 * (order[j] + rng.uniform()) / max(n, j + 1))


def _subject_index(seed: int, kind: str, j: int, second: bool = False) -> int:
    k = list(KINDS).index(kind.replace("twin", "raw"))
    return SUBJECT_BASE + 100_000 * int(seed) + 1000 * k + 2 * j + int(second)


def _build_brain_pair(factory: _Factory, kind: str, j: int, n: int, seed: int) -> dict[str, Any]:
    """Images, labels and truth of one brain-only pair (see the module docstring)."""
    from custom_nets.data import subject_seed

    rng = np.random.default_rng([seed, list(KINDS).index(kind), j])
    angle = _angle(seed, kind, j, n, rng)
    pose_f, pose_m = _poses(rng, angle)
    sid_f = subject_seed("test", _subject_index(seed, kind, j))
    sid_m = subject_seed("test", _subject_index(seed, kind, j, second=True)) if kind == "inter_subject" else sid_f
    rec: dict[str, Any] = {"subject_fixed": sid_f, "subject_moving": sid_m}
    group = KINDS[kind][0]
    cycle = ("t1", "t2", "pd", "flair", "remap")
    contrast = kind if group == "contrast" else cycle[j % (4 if group == "corruption" else 5)]

    # fixed: near-upright T1 (or the MNI template), 2 mm, on its own head box
    sl_f, aff_f = factory.cube_crop(*factory.head_box(pose_f, rng))
    mni_side = ("fixed", "moving")[j % 2] if kind == "mni_vs_synth" else None
    if mni_side == "fixed":
        shape = tuple(s.stop - s.start for s in sl_f)
        fixed, lab_f = factory.mni(pose_f, shape, aff_f)
        fixed = np.clip(np.rint(fixed / max(float(np.percentile(fixed[lab_f > 0], 99.5)), 1e-6) * 1000), 0, 32767)
        fixed, acq_f = fixed.astype(np.int16), {"image": "MNI ICBM152 T1 (nilearn), as shipped"}
    else:
        probs = factory.subject(sid_f, pose_f, sl_f)
        lab_f = probs.argmax(0).astype(np.uint8)
        acq_f = _corruption(kind, j, rng, fixed=True)
        fixed = _acquire(_render(probs, "t1", rng), aff_f, lab_f > 0, acq_f, rng)
        acq_f["contrast"] = "t1"

    # moving: rotated, corrupted, in its kind's storage
    acq_m = _corruption(kind, j, rng)
    if kind.startswith("thick"):
        axis = 2 if kind == "thick_axial" else 0
        signal, lab_m, aff_m = _thick(factory, sid_m, pose_m, axis, rng, contrast)
        moving = _acquire(signal, aff_m, lab_m > 0, acq_m, rng)
        lps = j % 2 == 0
        if lps:
            moving, _ = _lps(moving, aff_m)
            lab_m, aff_m = _lps(lab_m, aff_m)
        rec["storage"] = {"spacing_mm": [float(v) for v in np.linalg.norm(aff_m[:3, :3], axis=0)],
                          "orientation": "LPS" if lps else "RAS", "slice_profile": "boxcar over 5 x 1 mm"}  # fmt: skip
    else:
        sl_m, aff_m = factory.cube_crop(*factory.head_box(pose_m, rng))
        if mni_side == "moving":
            shape = tuple(s.stop - s.start for s in sl_m)
            signal, lab_m = factory.mni(pose_m, shape, aff_m)
            contrast = "mni_t1"
        else:
            probs = factory.subject(sid_m, pose_m, sl_m)
            lab_m = probs.argmax(0).astype(np.uint8)
            signal = _render(probs, contrast, rng)
        moving = _acquire(signal, aff_m, lab_m > 0, acq_m, rng)
    if mni_side == "fixed":
        contrast = f"{contrast} (fixed: MNI T1)"

    if group == "fov":
        side = ("moving", "fixed")[j % 2]
        remove = j % 3 != 2
        part = "top" if kind == "fov_top" else "cerebellum"
        if side == "moving":
            moving, lab_m, aff_m, cut = _cut(moving, lab_m, aff_m, pose_m, part, remove, rng)
        else:
            fixed, lab_f, aff_f, cut = _cut(fixed, lab_f, aff_f, pose_f, part, remove, rng)
        rec["cut"] = {"image": side, **cut}
    truth = pose_m @ np.linalg.inv(pose_f)
    rec.update({"contrast": contrast, "angle": _rotation_angle(truth), "pose_angle": angle,
                "acquisition_fixed": acq_f, "acquisition_moving": acq_m, "mni": mni_side,
                "fixed_to_moving_ras": truth.tolist(), "pose_fixed": pose_f.tolist(),
                "pose_moving": pose_m.tolist()})  # fmt: skip
    return {"arrays": (fixed, moving, lab_f, lab_m), "affines": (aff_f, aff_m), "record": rec}


def _heads_module() -> Any | None:
    """``custom_nets.data.heads`` if it exists and offers ``HeadSynthesizer``, else None."""
    try:
        if importlib.util.find_spec("custom_nets.data.heads") is None:
            return None
        import custom_nets.data.heads as heads
    except Exception as err:  # noqa: BLE001 - a half-written module must not stop the brain-only benchmark
        print(f"raw heads: custom_nets.data.heads does not import ({type(err).__name__}: {err}); skipped.", flush=True)
        return None
    return heads if hasattr(heads, "HeadSynthesizer") else None


RAW_CENTRE = (0.0, -17.0, -5.0)  # world centre of the raw heads' 256 mm field of view (a little below the brain)


def _build_raw_pair(factory: _Factory, heads: Any, synth: Any, kind: str, j: int, n: int, seed: int) -> dict:
    """A raw-head pair and its brain-only twin: the same heads, poses and acquisitions, the twin's images multiplied by
    the truth brain mask (labels CSF / GM / WM of the head). Heads come from ``HeadSynthesizer.head`` (labels; the
    brain exactly ``BrainSynthesizer.subject(seed, pose)``) on a 256 mm, 2 mm field of view; images are rendered here
    from the head labels with ``HeadSynthesizer.contrast_means`` (per-label intensities) and this file's corruption
    (not ``HeadSynthesizer.image``). The moving head's field of view is cut (neck and / or vertex, by the head
    generator) in one pair of three; voxels out of view are exactly 0."""
    from custom_nets.data import subject_seed

    rng = np.random.default_rng([seed, list(KINDS).index(kind), j])
    angle = _angle(seed, kind, j, n, rng)
    pose_f, pose_m = _poses(rng, angle)
    sid_f = subject_seed("test", _subject_index(seed, kind, j))
    sid_m = subject_seed("test", _subject_index(seed, kind, j, second=True)) if kind == "raw_inter" else sid_f
    contrast = ("t1", "t2", "pd", "flair")[j % 4]
    cut_moving = j % 3 == 1
    affine = np.asarray(synth.affine, dtype=np.float64)
    images, labels, acqs = [], [], []
    for sid, pose, con, cut, fixed in (
        (sid_f, pose_f, "t1", False, True),
        (sid_m, pose_m, contrast, cut_moving, False),
    ):
        lab = synth.head(sid, pose=pose, cut=cut)[0].numpy()
        brain = (lab >= 1) & (lab <= 3)
        means = np.asarray(synth.contrast_means(con, int(rng.integers(2**31))), dtype=np.float32)
        # partial volume at the brain's edge: the brain tissues' fractions (the head's own BrainSynthesizer, whose
        # arg-max the head's brain labels are) mixed with the non-brain tissue there (extra-cerebral CSF in the brain)
        probs = synth.brain.subject(sid, pose=pose).numpy()
        outside = np.where(brain, 4, np.clip(lab, 0, None))
        signal = probs[0] * means[outside] + np.tensordot(means[1:4], probs[1:], axes=1)
        acq = _corruption(kind, j, rng, fixed=fixed)
        acq["blur_mm"] = [float(v) for v in rng.uniform(0.4, 1.2, size=3)]  # the scanner's point spread
        image = _acquire(signal, affine, brain, acq, rng)
        image[lab < 0] = 0  # out of view: the scanner saw nothing
        acq.update({"contrast": con, "fov_cut": bool(cut), "out_of_view_voxels": int((lab < 0).sum())})
        images.append(image)
        labels.append(np.where(brain, lab, 0).astype(np.uint8))
        acqs.append(acq)
    truth = pose_m @ np.linalg.inv(pose_f)
    rec = {"subject_fixed": sid_f, "subject_moving": sid_m, "contrast": contrast, "angle": _rotation_angle(truth),
           "pose_angle": angle, "acquisition_fixed": acqs[0], "acquisition_moving": acqs[1], "mni": None,
           "fixed_to_moving_ras": truth.tolist(), "pose_fixed": pose_f.tolist(),
           "pose_moving": pose_m.tolist()}  # fmt: skip
    twin_images = [np.where(lab > 0, img, 0).astype(np.int16) for img, lab in zip(images, labels)]
    twin = kind.replace("raw", "twin")
    return {
        "raw": {"arrays": (*images, *labels), "affines": (affine, affine),
                "record": {**rec, "head": "raw (skull, scalp, face, neck, background)", "twin": f"{twin}_{j:03d}"}},
        "twin": {"arrays": (*twin_images, *labels), "affines": (affine, affine),
                 "record": {**rec, "head": "skull-stripped with the truth brain mask", "twin": f"{kind}_{j:03d}"}},
    }  # fmt: skip


def make_pairs(out_dir: str | Path, mode: str = "quick", seed: int = 0) -> list[dict[str, Any]]:
    """Write the pairs (NIfTI), ``pairs.json`` (records with truth) and ``datalist.json`` (``test_pairs`` for the
    bundle); returns the records."""
    import torch

    from custom_nets.data import save_nifti
    from custom_nets.fileio import write_json

    torch.set_num_threads(THREADS)
    plan = pair_plan(mode)
    out = Path(out_dir)
    folder = out / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    factory = _Factory()
    n = MODES[mode].get("per_kind", 1)
    heads = _heads_module() if any(k in KINDS and KINDS[k][0] in ("raw", "twin") for k, _ in plan) else None
    if heads is None and any(KINDS[k][0] in ("raw", "twin") for k, _ in plan):
        print("raw heads: custom_nets.data.heads.HeadSynthesizer is not available yet; the raw source is skipped.",
              flush=True)  # fmt: skip
    records: list[dict[str, Any]] = []
    raw_cache: dict[tuple[str, int], dict[str, Any]] = {}
    head_synth = heads.HeadSynthesizer(128, 2.0, centre=RAW_CENTRE, cut_prob=0.0) if heads is not None else None
    n_raw = max(1, MODES[mode]["raw"])
    t0 = time.perf_counter()
    for kind, j in plan:
        group = KINDS[kind][0]
        if group in ("raw", "twin"):
            if heads is None:
                continue
            key = (kind.replace("twin", "raw"), j)
            if key not in raw_cache:
                raw_cache.clear()
                raw_cache[key] = _build_raw_pair(factory, heads, head_synth, key[0], j, n_raw, seed)
            built = raw_cache[key][group]
        else:
            built = _build_brain_pair(factory, kind, j, n, seed)
        pid = f"{kind}_{j:03d}"
        rec = {"id": pid, "kind": kind, "group": group, **built["record"]}
        fixed, moving, lab_f, lab_m = built["arrays"]
        aff_f, aff_m = built["affines"]
        for name, data, affine, dtype in (
            ("fixed_image", fixed, aff_f, np.int16),
            ("moving_image", moving, aff_m, np.int16),
            ("fixed_label", lab_f, aff_f, np.uint8),
            ("moving_label", lab_m, aff_m, np.uint8),
        ):
            stem = f"{pid}_{name.replace('_image', '')}"
            rec[name] = str(save_nifti(data, affine, folder / f"{stem}.nii.gz", dtype=dtype).resolve())
        records.append(rec)
        print(f"pair {len(records)}/{len(plan)} {pid} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    write_json(out / "pairs.json", records)
    datalist = [{"moving_image": r["moving_image"], "fixed_image": r["fixed_image"]} for r in records]
    write_json(out / "datalist.json", {"test_pairs": datalist})
    return records


# ---------------------------------------------------------------------------------------------------------- methods
def _code_state() -> dict[str, Any]:
    """The commit and the uncommitted files of the package and the bundle (read-only git), so a table says which code
    it measured."""
    state: dict[str, Any] = {}
    try:
        git = ["git", "-C", str(ROOT)]
        state["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--", "custom_nets", "bundle/configs"],
                                capture_output=True, text=True).stdout  # fmt: skip
        state["uncommitted"] = [line[3:] for line in status.splitlines() if line.strip()]
    except OSError:
        pass
    return state


def run_bundle(variant: str, out_dir: str | Path) -> dict[str, Any]:
    """One ``python -m monai.bundle run inference`` process over every pair (cwd ``bundle/``), as a user runs it."""
    out = Path(out_dir).resolve()
    results = out / variant
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--datalist", str(out / "datalist.json"), "--output_dir", str(results), "--bundle_root", str(BUNDLE),
           "--write_png", "False", "--fail_on_error", "False", "--resume", "False",  # timed: every pair
           *VARIANTS[variant]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONWARNINGS": "ignore"}
    start = time.time()
    with open(out / f"run_{variant}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=BUNDLE, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    n = len(json.loads((out / "datalist.json").read_text())["test_pairs"])
    run = {"method": variant, "command": " ".join(cmd), "returncode": proc.returncode, "start_epoch": start,
           "wall_s": wall, "pairs": n, "s_per_pair_process": wall / max(n, 1), "code": _code_state()}  # fmt: skip
    (out / f"run_{variant}.json").write_text(json.dumps(run, indent=2))
    print(
        f"{variant}: exit {proc.returncode}, {wall:.0f} s for {n} pairs ({wall / max(n, 1):.1f} s / pair)", flush=True
    )
    return run


def run_inprocess(method: str, out_dir: str | Path, every: int = 10) -> dict[str, Any]:
    """``bench_registration.py run_method`` (ANTs, or a keymorph variant in process) on every ``every``-th pair, in
    its own process; the process wall time is kept too."""
    out = Path(out_dir).resolve()
    pairs = json.loads((out / "pairs.json").read_text())
    subset = [{"id": p["id"], "fixed_image": p["fixed_image"], "moving_image": p["moving_image"]}
              for p in pairs[::every]]  # fmt: skip
    subset_json = out / f"subset_every{every}.json"
    subset_json.write_text(json.dumps(subset))
    result = out / f"inprocess_{method}.json"
    cmd = [sys.executable, str(BENCH_REGISTRATION), "run_method", method, str(subset_json), str(result)]
    start = time.time()
    with open(out / f"inprocess_{method}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.time() - start
    run = json.loads(result.read_text()) if result.is_file() else {"pairs": []}
    run.update({"returncode": proc.returncode, "wall_s": wall, "s_per_pair_process": wall / max(len(subset), 1)})
    result.write_text(json.dumps(run))
    print(f"{method} (in process, {len(subset)} pairs): exit {proc.returncode}, {wall:.0f} s", flush=True)
    return run


# ---------------------------------------------------------------------------------------------------------- scoring
def score(pair: dict[str, Any], matrix: Any) -> dict[str, float]:
    """Mean error (mm) over the fixed brain (truth labels > 0, every voxel) between ``matrix`` and the truth, and
    the mean CSF / GM / WM Dice of the moving truth labels warped by ``matrix``."""
    import nibabel as nib
    import torch

    from custom_nets.geometry import resample
    from custom_nets.metrics import transform_error_mm

    if matrix is None:
        return {"error_mm": float("nan"), "dice": float("nan")}
    lab_f, lab_m = nib.load(pair["fixed_label"]), nib.load(pair["moving_label"])
    a_f = torch.as_tensor(lab_f.affine, dtype=torch.float64)
    a_m = torch.as_tensor(lab_m.affine, dtype=torch.float64)
    fixed = torch.as_tensor(np.asarray(lab_f.dataobj, dtype=np.float32))[None, None]
    moving = torch.as_tensor(np.asarray(lab_m.dataobj, dtype=np.float32))[None, None]
    pred = torch.as_tensor(np.asarray(matrix, dtype=np.float64))[None]
    truth = torch.as_tensor(np.asarray(pair["fixed_to_moving_ras"], dtype=np.float64))[None]
    error = float(transform_error_mm(pred, truth, fixed, a_f[None], max_points=None)[0])
    warped = resample(moving, pred, fixed.shape[2:], a_f, a_m, mode="nearest")
    dice = []
    for c in (1, 2, 3):
        p, t = warped == c, fixed == c
        if int(t.sum()):
            dice.append(float(2 * (p & t).sum() / max(1, int(p.sum() + t.sum()))))
    return {"error_mm": error, "dice": float(np.mean(dice)) if dice else float("nan")}


def _stem(path: str) -> str:
    from custom_nets.volumes import output_stem

    return output_stem(path)


def read_bundle_run(out_dir: str | Path, variant: str, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair of a bundle run: matrix (or None), status / error from ``results.csv``, the ``quality`` block (None
    when absent) and the per-pair time between consecutive result JSONs (the first from the process start)."""
    import csv

    out = Path(out_dir)
    folder = out / variant
    run_file = out / f"run_{variant}.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    status: dict[str, dict[str, str]] = {}
    if (folder / "results.csv").is_file():
        with open(folder / "results.csv", newline="") as f:
            for row in csv.DictReader(f):
                status[_stem(row.get("moving") or "")] = row
    rows, previous = [], run.get("start_epoch")
    for pair in pairs:
        stem = _stem(pair["moving_image"])
        path = folder / f"{stem}.json"
        row: dict[str, Any] = {"id": pair["id"], "matrix": None, "quality": None, "seconds": float("nan")}
        st = status.get(stem, {})
        row["status"] = st.get("status", "missing" if not path.is_file() else "ok")
        row["failure"] = f"{st.get('stage', '')}: {st.get('error', '')}" if st.get("status") == "failed" else ""
        if path.is_file():
            rec = json.loads(path.read_text())
            row["matrix"] = rec.get("fixed_to_moving_ras")
            if row["matrix"] is None and rec.get("fixed_to_moving_affine_part_ras") is not None:
                row["matrix"] = rec["fixed_to_moving_affine_part_ras"]
            row["quality"] = rec.get("quality") if isinstance(rec.get("quality"), dict) else None
            done = path.stat().st_mtime
            if previous is not None:
                row["seconds"] = done - previous
            previous = done
        rows.append(row)
    return rows


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _stats(rows: list[dict[str, Any]], ants_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Success, median, p95, gross failures, no-result count, verdict sorting and time of a set of scored rows."""
    e = np.array([_finite(r["error_mm"]) for r in rows], dtype=np.float64)
    e_inf = np.nan_to_num(e, nan=np.inf)
    n = len(rows)
    s: dict[str, Any] = {"n": n}
    if not n:
        return s
    s["success"] = float(np.mean(e_inf < SUCCESS_MM))
    s["median_mm"] = float(np.median(e_inf))
    s["p95_mm"] = float(np.percentile(e_inf, 95, method="higher"))
    s["gross"] = int(np.sum(e_inf > GROSS_MM))
    s["no_result"] = int(np.sum(~np.isfinite(e)))
    judged = [r for r, err in zip(rows, e) if np.isfinite(err) and r.get("verdict") in ("ok", "suspect")]
    bad = [r for r in judged if _finite(r["error_mm"]) > SUCCESS_MM]
    good = [r for r in judged if _finite(r["error_mm"]) <= SUCCESS_MM]
    s["with_verdict"] = len(judged)
    s["verdict_missing"] = int(np.sum(np.isfinite(e))) - len(judged)
    s["wrong"] = len(bad)
    s["wrong_suspect"] = sum(r["verdict"] == "suspect" for r in bad)
    s["silent_wrong"] = sum(r["verdict"] == "ok" for r in bad)
    s["right"] = len(good)
    s["right_suspect"] = sum(r["verdict"] == "suspect" for r in good)
    sec = [_finite(r.get("seconds")) for r in rows]
    sec = [x for x in sec if np.isfinite(x)]
    s["seconds_per_pair"] = float(np.median(sec)) if sec else None
    if ants_rows is not None:
        ants_sec = [_finite(r.get("seconds")) for r in ants_rows]
        ants_sec = [x for x in ants_sec if np.isfinite(x)]
        if ants_sec and sec:
            s["time_vs_ants"] = s["seconds_per_pair"] / float(np.median(ants_sec))
    return s


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt_mm(v: Any) -> str:
    return "-" if v is None else ("no result" if not np.isfinite(v) else f"{v:.2f}")


def _category_table(stats: dict[str, dict[str, Any]], with_verdict: bool, labels: dict[str, str]) -> list[str]:
    head = "| category | pairs | success (< 2 mm) | median (mm) | p95 (mm) | gross (> 10 mm or none) | no result |"
    sep = "|---|---|---|---|---|---|---|"
    if with_verdict:
        head += " suspect of > 2 mm | silent (> 2 mm, ok) | false suspect of < 2 mm | no verdict |"
        sep += "---|---|---|---|"
    head += " s / pair | vs ANTs |"
    sep += "---|---|"
    lines = [head, sep]
    for name, s in stats.items():
        if not s.get("n"):
            continue
        cells = [labels.get(name, name), str(s["n"]), f"{100 * s['success']:.0f} %", _fmt_mm(s["median_mm"]),
                 _fmt_mm(s["p95_mm"]), str(s["gross"]), str(s["no_result"])]  # fmt: skip
        if with_verdict:
            if s["with_verdict"]:
                cells += [f"{s['wrong_suspect']} / {s['wrong']}", str(s["silent_wrong"]),
                          f"{s['right_suspect']} / {s['right']}", str(s["verdict_missing"])]  # fmt: skip
            else:
                cells += ["-", "-", "-", str(s["verdict_missing"])]
        sec = s.get("seconds_per_pair")
        cells += ["-" if sec is None else f"{sec:.1f}",
                  f"{s['time_vs_ants']:.2f}x" if s.get("time_vs_ants") else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summarise(pairs: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> tuple[list[dict], dict]:
    by_id = {p["id"]: p for p in pairs}
    rows: list[dict[str, Any]] = []
    for method, results in runs.items():
        for r in results:
            pair = by_id[r["id"]]
            q = r.get("quality") or {}
            row = {"method": method, "id": r["id"], "kind": pair["kind"], "group": pair["group"],
                   "angle": pair["angle"], "contrast": pair["contrast"],
                   "cut": (f"{pair['cut']['image']} {pair['cut']['part']} "
                           f"{'removed' if pair['cut']['removed_slabs'] else 'zeroed'}") if pair.get("cut") else "",
                   "storage": (f"{'x'.join(f'{v:g}' for v in pair['storage']['spacing_mm'])} "
                               f"{pair['storage']['orientation']}") if pair.get("storage") else "",
                   "status": r.get("status", ""), "failure": r.get("failure", ""),
                   "seconds": r.get("seconds"), **score(pair, r["matrix"]),
                   "verdict": q.get("verdict", "") if q else "",
                   "reasons": "; ".join(str(x) for x in q.get("reasons", [])) if q else ""}  # fmt: skip
            for f in QUALITY_FIELDS:
                row[f] = q.get(f) if q else None
            rows.append(row)
    ants = [r for r in rows if r["method"] == "ants"]
    kinds = [k for k in KINDS if any(p["kind"] == k for p in pairs)]
    summary: dict[str, Any] = {"methods": {}}
    for method in runs:
        mine = [r for r in rows if r["method"] == method]
        per_kind = {}
        for k in kinds:
            ants_k = [r for r in ants if r["kind"] == k] if method != "ants" else None
            per_kind[k] = _stats([r for r in mine if r["kind"] == k], ants_k)
        per_group = {}
        for g, ks in GROUPS.items():
            ants_g = [r for r in ants if r["kind"] in ks] if method != "ants" else None
            per_group[g] = _stats([r for r in mine if r["kind"] in ks], ants_g)
        per_group["all pairs"] = _stats(mine, ants if method != "ants" else None)
        summary["methods"][method] = {"by_kind": per_kind, "by_group": per_group}
        if method != "ants" and ants:
            subset = {r["id"] for r in ants}
            summary["methods"][method]["on_ants_subset"] = _stats([r for r in mine if r["id"] in subset], ants)
    # raw heads against their brain-only twins, pair by pair
    twins = {}
    for method in runs:
        mine = {r["id"]: r for r in rows if r["method"] == method}
        for raw in RAW_KINDS:
            twin = raw.replace("raw", "twin")
            matched = [(mine[i], mine[i.replace(raw, twin)]) for i in mine
                       if i.startswith(raw + "_") and i.replace(raw, twin) in mine]  # fmt: skip
            if not matched:
                continue
            er = np.nan_to_num(np.array([_finite(a["error_mm"]) for a, _ in matched]), nan=np.inf)
            et = np.nan_to_num(np.array([_finite(b["error_mm"]) for _, b in matched]), nan=np.inf)
            twins.setdefault(method, {})[raw] = {
                "pairs": len(matched),
                "raw": _stats([a for a, _ in matched]),
                "twin": _stats([b for _, b in matched]),
                "raw_worse_by_1mm": int(np.sum(er > et + 1.0)),
                "twin_worse_by_1mm": int(np.sum(et > er + 1.0)),
            }
    summary["raw_vs_twin"] = twins
    # which quality checks fire: on the wrong answers (> 2 mm: caught) and on the right ones (< 2 mm: false alarms)
    for method in runs:
        judged = [r for r in rows if r["method"] == method and r["verdict"] == "suspect" and np.isfinite(r["error_mm"])]
        counts: dict[str, dict[str, int]] = {"wrong": {}, "right": {}}
        for r in judged:
            side = "wrong" if r["error_mm"] > SUCCESS_MM else "right"
            for reason in filter(None, r["reasons"].split("; ")):
                key = reason.split(":")[0].strip()
                counts[side][key] = counts[side].get(key, 0) + 1
        if judged:
            summary["methods"][method]["suspect_reasons"] = counts
    return rows, summary


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    from custom_nets.fileio import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(5, len(kinds))
    nrows = int(math.ceil(len(kinds) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), dpi=110, squeeze=False, sharey=True)
    colours = {m: c for m, c in zip(methods, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"))}
    for ax, kind in zip(axes.ravel(), kinds):
        for m in methods:
            mine = [r for r in rows if r["kind"] == kind and r["method"] == m]
            for verdict, marker in (("ok", "o"), ("suspect", "x"), ("", "s")):
                sel = [r for r in mine if (r.get("verdict") or "") == verdict]
                if not sel:
                    continue
                err = [min(max(_finite(r["error_mm"]), 0.01), 300.0) if np.isfinite(_finite(r["error_mm"])) else 300.0
                       for r in sel]  # fmt: skip
                ax.scatter([r["angle"] for r in sel], err, marker=marker, s=18, color=colours[m], linewidths=1,
                           label=f"{m}{' (' + verdict + ')' if verdict else ''}")  # fmt: skip
        ax.axhline(SUCCESS_MM, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(GROSS_MM, color="grey", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlim(-5, 185)
        ax.set_title(f"{kind} ({KINDS[kind][0]})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(kinds) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("error over the brain (mm)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("rotation (deg)", fontsize=8)
    handles, labels = {}, {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    fig.suptitle("Error against rotation angle per source (o: verdict ok, x: suspect, square: no verdict; no result "
                 "at 300 mm; dashed 2 mm, dotted 10 mm)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _notes(mode: str, pairs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from collections import Counter

    kinds = Counter(p["kind"] for p in pairs)
    runs = meta.get("runs", {})
    lines = [f"# Stress benchmark ({mode} mode, seed {meta.get('seed', 0)}): {len(pairs)} pairs", ""]
    lines.append("Pairs per kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ".")
    if meta.get("raw_skipped"):
        lines.append(
            "Raw heads: skipped (custom_nets.data.heads.HeadSynthesizer not available when the pairs were made)."
        )
    lines += [
        "",
        f"Error: mean distance over the fixed brain between the predicted and the true fixed_to_moving (mm); success "
        f"< {SUCCESS_MM:g} mm, gross > {GROSS_MM:g} mm or no result. Verdict columns: of the pairs above 2 mm, how "
        "many the quality block marks `suspect`; `silent` = above 2 mm and `ok` (a wrong answer given as right); "
        "of the pairs below 2 mm, how many are falsely `suspect`; `no verdict` = a result without a quality block.",
        "**Inter-subject rows (inter_subject, mni_vs_synth, raw_inter, twin_inter): the truth is only good to the "
        "subjects' own deformation (a smooth field of about 3 mm std), so their errors and success are not "
        "comparable with the exact-truth rows; read them as a sanity bound.**",
        "Time: `s / pair` per kind is the median time between the completion of consecutive result JSONs of the one "
        "bundle process (loading, registration, quality and writing the warped image; the first pair carries the "
        "model load); ANTs' per-pair time is in process (reading the images to the matrix) on every 10th pair. The "
        "overall rows below also give the process wall time / pairs.",
    ]
    for m, run in runs.items():
        if "wall_s" in run:
            lines.append(f"- {m}: process wall {run['wall_s']:.0f} s / {run.get('pairs', '?')} pairs = "
                         f"{run['s_per_pair_process']:.1f} s per pair (exit {run.get('returncode')}).")  # fmt: skip
    return "\n".join(lines) + "\n"


def report(out_dir: str = "bench_stress", mode: str = "quick", methods: str | tuple = METHODS) -> dict:
    """Score the saved runs in ``out_dir`` and write ``results.csv``, ``summary.json``, ``table.md`` and the PNG."""
    from custom_nets.fileio import atomic_write, write_csv

    methods = tuple(methods.split(",")) if isinstance(methods, str) else tuple(methods)
    out = Path(out_dir)
    pairs = json.loads((out / "pairs.json").read_text())
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    runs: dict[str, list[dict[str, Any]]] = {}
    run_meta: dict[str, Any] = {}
    for m in methods:
        if m in VARIANTS and (out / f"run_{m}.json").is_file():
            runs[m] = read_bundle_run(out, m, pairs)
            run_meta[m] = json.loads((out / f"run_{m}.json").read_text())
        elif m == "ants" and (out / "inprocess_ants.json").is_file():
            data = json.loads((out / "inprocess_ants.json").read_text())
            runs[m] = [{"id": r["id"], "matrix": r["matrix"], "seconds": r["seconds"], "quality": None,
                        "status": "ok" if r["matrix"] is not None else "failed", "failure": r.get("error") or ""}
                       for r in data["pairs"]]  # fmt: skip
            run_meta[m] = {k: data.get(k) for k in ("wall_s", "s_per_pair_process", "returncode")}
            run_meta[m]["pairs"] = len(data["pairs"])
    inproc = {}
    for m in VARIANTS:
        f = out / f"inprocess_{m}.json"
        if f.is_file():
            data = json.loads(f.read_text())
            sec = [r["seconds"] for r in data.get("pairs", []) if r.get("matrix") is not None]
            inproc[m] = float(np.median(sec)) if sec else None
    meta["runs"] = run_meta
    rows, summary = _summarise(pairs, runs)
    summary.update({"mode": mode, "pairs": len(pairs), "seed": meta.get("seed"), "runs": run_meta,
                    "inprocess_seconds_per_pair": inproc, "success_mm": SUCCESS_MM, "gross_mm": GROSS_MM,
                    "note": "inter-subject truth (inter_subject, mni_vs_synth, raw_inter, twin_inter) is only good to "
                            "the subjects' own deformation (~3 mm std field)."})  # fmt: skip
    ants_proc = run_meta.get("ants", {}).get("s_per_pair_process")
    for m in VARIANTS:
        if m in run_meta and ants_proc:
            summary["methods"][m]["process_time_vs_ants"] = run_meta[m]["s_per_pair_process"] / ants_proc
        if inproc.get(m) and "ants" in runs:
            ants_sec = [r["seconds"] for r in runs["ants"] if r["matrix"] is not None]
            if ants_sec:
                summary["methods"][m]["inprocess_time_vs_ants"] = inproc[m] / float(np.median(ants_sec))
    columns = ["method", "id", "kind", "group", "angle", "contrast", "cut", "storage", "status", "failure",
               "error_mm", "dice", "verdict", "reasons", *QUALITY_FIELDS, "seconds"]  # fmt: skip
    write_csv(out / "results.csv", [_jsonable(r) for r in rows], columns)
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    labels = {k: f"{k} ({d})" for k, (_, d) in KINDS.items()}
    text = [_notes(mode, pairs, meta)]
    text += ["## Overall", ""]
    text.append(
        "| method | pairs | success (< 2 mm) | median (mm) | p95 (mm) | gross | suspect of > 2 mm | silent wrong "
        "| false suspect of < 2 mm | process s / pair | vs ANTs (process) | per-pair s (ANTs subset) "
        "| vs ANTs (per pair) |"
    )
    text.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in runs:
        sub = summary["methods"][m].get("on_ants_subset", {})
        proc = run_meta.get(m, {}).get("s_per_pair_process")
        ratio = summary["methods"][m].get("process_time_vs_ants")
        for label, group in (("exact truth", EXACT_ALL), ("inter-subject (approx.)", APPROX_ALL)):
            s = summary["methods"][m]["by_group"][group]
            if not s.get("n"):
                continue
            judged = bool(s.get("with_verdict"))
            cells = [f"{m}, {label}", str(s["n"]), f"{100 * s['success']:.0f} %", _fmt_mm(s["median_mm"]),
                     _fmt_mm(s["p95_mm"]), str(s["gross"]),
                     f"{s['wrong_suspect']} / {s['wrong']}" if judged else "-",
                     str(s["silent_wrong"]) if judged else "-",
                     f"{s['right_suspect']} / {s['right']}" if judged else "-",
                     "-" if proc is None else f"{proc:.1f}", f"{ratio:.2f}x" if ratio else "-",
                     f"{sub['seconds_per_pair']:.1f}" if sub.get("seconds_per_pair") else "-",
                     f"{sub['time_vs_ants']:.2f}x" if sub.get("time_vs_ants") else "-"]  # fmt: skip
            text.append("| " + " | ".join(cells) + " |")
    for m, v in inproc.items():
        if v:
            ratio = summary["methods"][m].get("inprocess_time_vs_ants")
            text.append(f"\nIn-process timing ({m}, ANTs' subset, bench_registration's runner): {v:.1f} s / pair"
                        f"{f', {ratio:.2f}x ANTs' if ratio else ''}.")  # fmt: skip
    for m in runs:
        text += ["", f"## {m}", ""]
        text += _category_table(summary["methods"][m]["by_kind"], m != "ants", labels)
        text += ["", "By group:", ""]
        text += _category_table(summary["methods"][m]["by_group"], m != "ants", {})
    reasons = {m: v["suspect_reasons"] for m, v in summary["methods"].items() if v.get("suspect_reasons")}
    if reasons:
        text += ["", "## Why pairs were marked suspect (reason: count among > 2 mm / among < 2 mm)", ""]
        for m, counts in reasons.items():
            keys = sorted(set(counts["wrong"]) | set(counts["right"]))
            cells = [f"{k}: {counts['wrong'].get(k, 0)} / {counts['right'].get(k, 0)}" for k in keys]
            text.append(f"- {m}: " + "; ".join(cells))
    if summary["raw_vs_twin"]:
        text += ["", "## Raw heads against their brain-only twins (same heads, poses, corruption)", ""]
        text.append("| method | pairs | raw: success / median / p95 / gross / silent | twin: success / median / p95 / "
                    "gross / silent | raw worse by > 1 mm | twin worse by > 1 mm |")  # fmt: skip
        text.append("|---|---|---|---|---|---|")
        for m, by in summary["raw_vs_twin"].items():
            for raw, s in by.items():
                cells = []
                for side in ("raw", "twin"):
                    t = s[side]
                    silent = t["silent_wrong"] if t.get("with_verdict") else "-"
                    cells.append(f"{100 * t['success']:.0f} % / {_fmt_mm(t['median_mm'])} / {_fmt_mm(t['p95_mm'])} / "
                                 f"{t['gross']} / {silent}")  # fmt: skip
                text.append(f"| {m} ({raw}) | {s['pairs']} | {cells[0]} | {cells[1]} | {s['raw_worse_by_1mm']} | "
                            f"{s['twin_worse_by_1mm']} |")  # fmt: skip
    body = "\n".join(text) + "\n"
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(body))
    if rows:
        _plot(rows, out / "error_vs_angle.png")
    print(body)
    return summary


def main(
    mode: str = "quick",
    out_dir: str = "bench_stress",
    methods: str | tuple = METHODS,
    seed: int = 0,
    ants_every: int = 10,
    inprocess_timing: bool = False,
    reuse_pairs: bool = False,
) -> dict:
    """Build the pairs, run each method in its own process, score, and write the report (see the module docstring).

    Args:
        mode: ``smoke`` (4 pairs), ``quick`` (~34), ``full`` (340 with the raw heads) or ``raw`` (full's 40 raw-head
            pairs and their twins).
        out_dir: output folder (pairs, bundle outputs, logs, report).
        methods: comma-separated subset of ``keymorph_refine,keymorph,ants``.
        seed: the pairs are a deterministic function of it (and of the mode).
        ants_every: ANTs runs on every n-th pair.
        inprocess_timing: also time the keymorph variants in process on ANTs' subset.
        reuse_pairs: keep the pairs already in ``out_dir`` if they were made with the same mode and seed.
    """
    from custom_nets.options import parse_bool

    inprocess_timing = parse_bool(inprocess_timing, "--inprocess_timing")  # fire passes `false` as a string
    reuse_pairs = parse_bool(reuse_pairs, "--reuse_pairs")
    methods = tuple(methods.split(",")) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"expected methods from {METHODS}, got {bad}.")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "meta.json"
    old = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    t = time.perf_counter()
    if reuse_pairs and old.get("mode") == mode and old.get("seed") == seed and (out / "pairs.json").is_file():
        pairs = json.loads((out / "pairs.json").read_text())
        print(f"{len(pairs)} pairs reused", flush=True)
    else:
        pairs = make_pairs(out, mode, seed)
        print(f"{len(pairs)} pairs written in {time.perf_counter() - t:.0f} s", flush=True)
    raw_planned = any(KINDS[k][0] == "raw" for k, _ in pair_plan(mode))
    raw_skipped = raw_planned and not any(p["group"] == "raw" for p in pairs)
    meta = {"mode": mode, "seed": seed, "raw_skipped": raw_skipped, "pair_seconds": time.perf_counter() - t}
    meta_file.write_text(json.dumps(meta, indent=2))
    for m in methods:
        if m in VARIANTS:
            run_bundle(m, out)
            if inprocess_timing:
                run_inprocess(m, out, ants_every)
        else:
            run_inprocess("ants", out, ants_every)
    return report(str(out), mode, methods)


def _cli(fn: Any) -> Any:
    """``fn`` for the command line: its return value (a summary, the records) is not echoed by fire."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)

    return run


if __name__ == "__main__":
    fire.Fire({name: _cli(fn) for name, fn in (("main", main), ("make_pairs", make_pairs), ("report", report))})
