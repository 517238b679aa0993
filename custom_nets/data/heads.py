"""Synthetic raw heads around the synthetic brains: skull, scalp, face, eyes, neck, background noise, cut views.

A *head* is an integer label map (:data:`HEAD_LABELS`) on an output cube. Its brain labels (1 CSF, 2 GM, 3 WM) are
exactly those of :meth:`BrainSynthesizer.subject` for the same seed and pose (the subject's anatomy); the non-brain
labels are defined procedurally in template (MNI) space, so a ``pose`` moves the whole head exactly like the brain:

* layers by distance outside the template's brain mask (an exact Euclidean distance map, computed once in torch by
  :mod:`custom_nets.data.template_distance`):
  a rim of extra-cerebral CSF, the skull (thickness varying smoothly, marrow / diploe in its middle where it is thick),
  the scalp (fat, then muscle / skin, with muscle patches such as the temporalis);
* a face (soft tissue, fat, bone pieces, a jaw band, sinuses, nose), two eyes in orbital fat, a neck (muscle,
  subcutaneous fat, vertebral bodies with marrow, the spinal cord in CSF continuing the brainstem, the airway),
  sometimes shoulders, and random blobs;
* everything (but the brain) warped by a per-subject smooth random displacement; thicknesses and sizes come from
  smooth random fields and per-subject scalars, so heads differ in size and shape.

Random field-of-view cuts (the neck out, the vertex cut by up to 15 % of the brain height) are slabs of the output grid
perpendicular to the grid axis closest to the head's superior direction; their voxels get :data:`OUT_OF_VIEW` and are
exactly 0 in the images (the scanner saw nothing there).

An *image* of a head draws one intensity per label (``random``: any contrast, SynthStrip-style; or ``t1`` / ``t2`` /
``pd`` / ``flair`` presets: brain tissues as :data:`~custom_nets.data.synth.CONTRAST_PRESETS`, head tissues plausible:
skull dark everywhere, fat bright on T1, CSF and eyes bright on T2, dark on FLAIR), a smooth texture per label, blur
(sometimes anisotropic, like thick slices), a multiplicative bias field, a gamma change and Rician noise, which is
non-zero in the background too.

Everything is a deterministic function of an integer seed. Coordinates follow :mod:`custom_nets.geometry`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from ..geometry import apply_affine, voxel_grid, voxel_to_world
from .synth import CONTRAST_PRESETS, BrainSynthesizer
from .template import BRAIN_CENTRE_MNI
from .template_distance import template_brain_geometry

__all__ = [
    "BRAIN_LABELS",
    "HEAD_CENTRE_MNI",
    "HEAD_CONTRASTS",
    "HEAD_LABELS",
    "OUT_OF_VIEW",
    "HeadSynthesizer",
    "brain_mask",
]

#: Label values of a head, in order (0 .. 13).
HEAD_LABELS = (
    "background",  # air around the head
    "csf",  # brain labels 1..3: exactly BrainSynthesizer's tissues
    "gm",
    "wm",
    "extra_csf",  # CSF / dura between brain and skull, CSF around the spinal cord
    "skull",  # cortical bone (also vertebrae, jaw, facial bones)
    "marrow",  # diploe of the skull, vertebral bodies
    "fat",  # scalp, orbital, facial and neck fat
    "muscle",  # muscle and skin
    "eye",  # vitreous
    "soft",  # other soft tissue of the face (glands, tongue, mucosa)
    "air",  # sinuses, nasal cavity, airway
    "cord",  # spinal cord below the template's brainstem
    "blob",  # random blobs (random intensity in every contrast)
)
#: Labels that make the brain mask (the truth of brain extraction).
BRAIN_LABELS = (1, 2, 3)
#: Label of voxels outside the field of view (a cut slab); their image intensity is exactly 0.
OUT_OF_VIEW = -1
#: Contrast names accepted by :meth:`HeadSynthesizer.image`.
HEAD_CONTRASTS = ("t1", "t2", "pd", "flair", "random")
#: Default centre (MNI mm) of the head cube: below the brain centre, so that a 320 mm cube holds head and neck.
HEAD_CENTRE_MNI = (0.0, -12.0, -30.0)

_L = {name: i for i, name in enumerate(HEAD_LABELS)}

#: Mean intensity of the non-brain labels ``HEAD_LABELS[4:13]`` per preset (before jitter); ``blob`` is random.
_HEAD_PRESETS: dict[str, tuple[float, ...]] = {
    #       extra_csf skull marrow fat  muscle eye  soft  air   cord
    "t1": (0.20, 0.05, 0.70, 0.95, 0.35, 0.15, 0.50, 0.02, 0.78),
    "t2": (0.95, 0.04, 0.45, 0.70, 0.25, 0.95, 0.50, 0.02, 0.40),
    "pd": (0.85, 0.06, 0.65, 0.85, 0.50, 0.90, 0.65, 0.02, 0.62),
    "flair": (0.10, 0.05, 0.55, 0.75, 0.30, 0.10, 0.45, 0.02, 0.45),
}
#: FLAIR brain tissues (background, CSF, GM, WM): CSF dark, GM brighter than WM.
_FLAIR_BRAIN = (0.0, 0.10, 0.62, 0.45)

#: Side (mm) of the template-space box of the random fields.
_FIELD_BOX_MM = 320.0


def brain_mask(labels: torch.Tensor) -> torch.Tensor:
    """Brain mask (float32 0 / 1, same shape) of a head label map: labels 1 (CSF), 2 (GM), 3 (WM)."""
    return ((labels >= BRAIN_LABELS[0]) & (labels <= BRAIN_LABELS[-1])).to(torch.float32)


class HeadSynthesizer:
    """Generate synthetic raw heads (label maps) and their images on a cube grid.

    Args:
        spatial_size: voxels per side of the output cube (or 3 ints).
        pixdim: voxel size in mm; the default 80 voxels of 4 mm = 320 mm hold head and neck.
        centre: world (MNI RAS mm) centre of the cube.
        cut_prob: probability that a head's field of view is cut (when :meth:`head` is not told).
        head_deform_mm: standard deviation (mm) of the smooth random displacement of the non-brain head.
        **brain_kwargs: passed to the :class:`BrainSynthesizer` that makes the brain (``deform_mm``, ...).

    Shapes:
        labels ``(1, S, S, S)`` int64 (:data:`HEAD_LABELS`, :data:`OUT_OF_VIEW` outside the field of view); brain masks
        and images ``(1, S, S, S)`` float32, images in [0, 1]. :attr:`affine` (``(4, 4)`` float64 numpy) is their
        voxel-to-world affine, identical to :attr:`brain` ``.affine``.
    """

    def __init__(
        self,
        spatial_size: int | Sequence[int] = 80,
        pixdim: float = 4.0,
        centre: Sequence[float] = HEAD_CENTRE_MNI,
        cut_prob: float = 0.4,
        head_deform_mm: float = 5.0,
        **brain_kwargs,
    ) -> None:
        self.brain = BrainSynthesizer(spatial_size, pixdim, centre, **brain_kwargs)
        self.shape, self.pixdim, self.affine = self.brain.shape, self.brain.pixdim, self.brain.affine
        self.cut_prob, self.head_deform_mm = float(cut_prob), float(head_deform_mm)
        vox = voxel_grid(self.shape, dtype=torch.float64).reshape(1, -1, 3)
        self._world = voxel_to_world(vox, torch.from_numpy(self.affine).unsqueeze(0))  # (1, N, 3) float64
        self._dist, self._dist_affine, self._stem = template_brain_geometry()
        self._box_centre = torch.as_tensor(BRAIN_CENTRE_MNI, dtype=torch.float64)

    # ------------------------------------------------------------------------------------------------------------------
    # labels

    def _fields(self, gen: torch.Generator, q: torch.Tensor, channels: int, points: int) -> torch.Tensor:
        """Smooth standard-normal-ish random fields ``(channels, N)`` at template points ``q (N, 3)``."""
        lattice = torch.randn(1, channels, points, points, points, generator=gen)
        grid = ((q - self._box_centre.to(q.dtype)) / (_FIELD_BOX_MM / 2)).flip(-1).to(torch.float32)
        out = F.grid_sample(lattice, grid[None, :, None, None], align_corners=True, padding_mode="border")
        return out[0, :, :, 0, 0]

    def _distance(self, q: torch.Tensor) -> torch.Tensor:
        """Distance (mm) outside the template brain at template points ``q (N, 3)`` (trilinear)."""
        inv = torch.linalg.inv(self._dist_affine)
        vox = apply_affine(inv[None], q[None].to(torch.float64))[0]
        size = torch.tensor([n - 1 for n in self._dist.shape[2:]], dtype=torch.float64)
        grid = (2.0 * vox / size - 1.0).flip(-1).to(torch.float32)
        out = F.grid_sample(self._dist, grid[None, :, None, None], align_corners=True, padding_mode="border")
        return out[0, 0, :, 0, 0]

    def head(self, seed: int, pose: np.ndarray | torch.Tensor | None = None, cut: bool | None = None) -> torch.Tensor:
        """Head labels ``(1, S, S, S)`` int64 of the subject with this seed (deterministic).

        Args:
            seed: subject seed (the brain is ``BrainSynthesizer.subject(seed, pose)``).
            pose: optional ``(4, 4)`` world matrix: template point ``p`` appears at world ``pose @ p`` (as in
                :meth:`BrainSynthesizer.subject`); the whole head follows it.
            cut: cut the field of view (``True``), never (``False``), or at random with :attr:`cut_prob` (``None``).
        """
        seed = int(seed)
        probs = self.brain.subject(seed, None if pose is None else np.asarray(pose, dtype=np.float64))
        brain = BrainSynthesizer.labels(probs)[0].reshape(-1).long()
        rng = np.random.default_rng([seed, 101])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        world = self._world
        pose_t = torch.eye(4, dtype=torch.float64) if pose is None else torch.as_tensor(pose, dtype=torch.float64)
        q = apply_affine(torch.linalg.inv(pose_t)[None], world)[0]  # template points (N, 3) float64
        q = q + self._fields(gen, q, 3, 4).T.to(torch.float64) * self.head_deform_mm
        d = self._distance(q)
        f = self._fields(gen, q, 8, 6)  # smooth unit fields for thicknesses and tissue patches
        q = q.to(torch.float32)
        x, y, z = q.unbind(-1)
        u = rng.uniform
        lab = torch.zeros_like(brain)

        # layers outside the brain: extra-cerebral CSF, skull, scalp
        s1 = (u(1.0, 3.5) + 0.7 * f[0]).clamp(0.5, 8.0)
        skull_t = (u(4.0, 8.0) + 1.5 * f[1]).clamp(2.5, 12.0)
        s2 = s1 + skull_t
        scalp_t = (u(4.0, 12.0) + 2.5 * f[2]).clamp(2.0, 20.0)
        s3 = s2 + scalp_t
        fat_frac = (u(0.3, 0.8) + 0.15 * f[3]).clamp(0.1, 0.9)

        # face: an ellipsoid anterior-inferior to the brain, plus a nose
        cf = torch.tensor([u(-3, 3), u(35, 55), u(-70, -50)], dtype=torch.float32)
        rf = torch.tensor([u(50, 68), u(45, 60), u(45, 62)], dtype=torch.float32)
        r_face = (((q - cf) / rf) ** 2).sum(-1).sqrt() + 0.05 * f[4]
        cn = torch.tensor([u(-2, 2), cf[1] + rf[1] - u(5, 15), u(-40, -25)], dtype=torch.float32)
        r_nose = (((q - cn) / torch.tensor([u(8, 14), u(15, 25), u(18, 28)], dtype=torch.float32)) ** 2).sum(-1).sqrt()
        face = (r_face < 1) | (r_nose < 1)

        # neck: an elliptic cylinder below the brain, sometimes widening into shoulders
        neck_xy = torch.tensor([u(-3, 3), u(-30, -10)], dtype=torch.float32)
        neck_r = torch.tensor([u(45, 62), u(45, 58)], dtype=torch.float32)
        z_sh = u(-200, -140)
        widen = torch.where(z < z_sh, (z_sh - z) * u(1.0, 2.5), 0.0) if rng.random() < 0.6 else torch.zeros_like(z)
        rx = neck_r[0] + widen
        r_neck = (((x - neck_xy[0]) / rx) ** 2 + ((y - neck_xy[1]) / neck_r[1]) ** 2).sqrt() + 0.05 * f[5]
        neck = (r_neck < 1) & (z < u(-70, -40))

        lab[(d < s3) | face | neck] = _L["muscle"]
        # scalp: fat under the skin, muscle patches (temporalis and the like)
        scalp = (d >= s2) & (d < s3)
        lab[scalp & (d < s2 + fat_frac * scalp_t)] = _L["fat"]
        lab[scalp & (f[6] > u(0.6, 1.6))] = _L["muscle"]
        # neck interior (outside the skull layers): muscle, subcutaneous fat, fat patches
        neck_in = neck & (d >= s2) & ~face
        lab[neck_in & ((r_neck > 1 - u(0.08, 0.2)) | (f[7] > u(0.8, 1.6)))] = _L["fat"]
        # face interior: soft tissue, fat, bone pieces, a jaw band, subcutaneous fat and skin, sinuses
        face_in = face & (d >= s2)
        lab[face_in] = _L["soft"]
        lab[face_in & (f[7] > u(0.0, 0.8))] = _L["fat"]
        lab[face_in & (f[6] < -u(0.9, 1.5))] = _L["skull"]
        lab[face_in & (r_face > 0.78) & (r_face < 0.78 + u(0.05, 0.12)) & (z < cf[2] - 0.15 * rf[2])] = _L["skull"]
        lab[face_in & (r_face > 1 - u(0.05, 0.12))] = _L["fat"]
        lab[face_in & (r_face > 0.97)] = _L["muscle"]
        for sx in (-1.0, 1.0):  # maxillary sinuses
            c = torch.tensor([sx * u(18, 28), cf[1] + u(0, 15), u(-65, -45)], dtype=torch.float32)
            lab[face_in & ((((q - c) / torch.tensor([u(8, 14), u(10, 16), u(10, 16)])) ** 2).sum(-1) < 1)] = _L["air"]
        c = torch.tensor([0.0, cn[1] - u(15, 30), cn[2] - u(5, 15)], dtype=torch.float32)  # nasal cavity
        lab[face_in & ((((q - c) / torch.tensor([u(5, 9), u(15, 25), u(10, 18)])) ** 2).sum(-1) < 1)] = _L["air"]

        # eyes in orbital fat, outside the skull layers
        r_eye = u(10.5, 13.0)
        for sx in (-1.0, 1.0):
            c = torch.tensor([sx * u(28, 36), u(50, 62), u(-42, -30)], dtype=torch.float32)
            r = (q - c).norm(dim=-1)
            lab[(r < r_eye + u(3, 7)) & (d >= s2)] = _L["fat"]
            lab[(r < r_eye) & (d >= s2)] = _L["eye"]

        # random blobs in the non-brain head
        for _ in range(int(rng.integers(0, 4))):
            direction = rng.normal(size=3)
            c = torch.tensor(np.asarray(BRAIN_CENTRE_MNI) + direction / np.linalg.norm(direction) * u(60, 110))
            radii = torch.tensor(u(5, 20, size=3))
            inside = (((q - c.float()) / radii.float()) ** 2).sum(-1) < 1
            lab[inside & (lab > 0) & (d >= s2)] = _L["blob"]

        # skull layers around the brain (marrow in the middle of thick skull), CSF rim
        lab[d < s2] = _L["skull"]
        mid = (d >= s1 + 0.3 * skull_t) & (d < s1 + 0.7 * skull_t) & (skull_t > 4.5)
        lab[mid] = _L["marrow"]
        lab[d < s1] = _L["extra_csf"]

        # neck structures below the brainstem: spinal cord in CSF, vertebral bodies, airway
        sx_, sy_, sz_, sr_ = (float(v) for v in self._stem)
        cord_r, canal_r = sr_ * u(0.55, 0.8), sr_ * u(1.0, 1.3) + 2.0
        low = (z < sz_ + 6.0) & neck
        r_c = ((x - sx_) ** 2 + (y - sy_) ** 2).sqrt()
        vy = sy_ + canal_r + u(10, 16)
        r_v = ((x - sx_) ** 2 + (y - vy) ** 2).sqrt()
        vr = u(8, 13)
        lab[low & (z < sz_ - 8.0) & (r_v < vr + 2.0)] = _L["skull"]
        lab[low & (z < sz_ - 8.0) & (r_v < vr)] = _L["marrow"]
        lab[low & (r_c < canal_r + 2.5)] = _L["skull"]
        lab[low & (r_c < canal_r)] = _L["extra_csf"]
        lab[low & (r_c < cord_r)] = _L["cord"]
        ay = vy + vr + u(8, 15)
        lab[neck & (z < sz_ + u(-10, 10)) & (((x - sx_) ** 2 + (y - ay) ** 2).sqrt() < u(5, 9))] = _L["air"]

        # the brain wins
        lab = torch.where(brain > 0, brain, lab).reshape(1, *self.shape)

        if (self.cut_prob > 0 and rng.random() < self.cut_prob) if cut is None else cut:
            lab = self._cut(lab, pose_t, rng)
        return lab

    def _cut(self, lab: torch.Tensor, pose: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Cut the field of view: slabs beyond a level along the grid axis closest to the head's superior axis."""
        sup = pose[:3, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        axis = int(sup.abs().argmax())
        sign = 1 if float(sup[axis]) > 0 else -1
        brain = brain_mask(lab)[0]
        if brain.sum() == 0:
            return lab
        along = torch.nonzero(brain.sum(tuple(a for a in range(3) if a != axis)))[:, 0].float() * sign
        lo, hi = float(along.min()), float(along.max())  # brain extent in signed voxel units (superior = larger)
        coord = torch.arange(self.shape[axis], dtype=torch.float32) * sign
        kind = rng.choice(["neck", "top", "both"], p=[0.5, 0.25, 0.25])
        out = torch.zeros(self.shape[axis], dtype=torch.bool)
        if kind in ("neck", "both"):
            out |= coord < lo - rng.uniform(0.0, 60.0) / self.pixdim
        if kind in ("top", "both"):
            out |= coord > hi - rng.uniform(0.0, 0.15) * (hi - lo)
        view = [1, 1, 1]
        view[axis] = -1
        out = out.view(1, *view).expand_as(lab)
        return lab.masked_fill(out, OUT_OF_VIEW)

    @staticmethod
    def brain_mask(labels: torch.Tensor) -> torch.Tensor:
        """Brain mask ``(1, S, S, S)`` float32 of head labels (see :func:`brain_mask`)."""
        return brain_mask(labels)

    # ------------------------------------------------------------------------------------------------------------------
    # images

    def contrast_means(self, contrast: str | Sequence[float], seed: int) -> np.ndarray:
        """Mean intensity per head label ``(14,)`` for a preset name, ``"random"``, or explicit values (no jitter)."""
        rng = np.random.default_rng([int(seed), 17])
        n = len(HEAD_LABELS)
        if isinstance(contrast, str):
            if contrast == "random":
                means = rng.uniform(0.0, 1.0, size=n)
                means[0] = rng.uniform(0.0, 0.08)
            elif contrast in _HEAD_PRESETS:
                brain = _FLAIR_BRAIN if contrast == "flair" else CONTRAST_PRESETS[contrast]
                means = np.array([*brain, *_HEAD_PRESETS[contrast], rng.uniform(0.0, 1.0)])
                means *= 1 + rng.uniform(-0.1, 0.1, size=n)
            else:
                raise ValueError(f"expected a contrast in {HEAD_CONTRASTS} or {n} intensities, got {contrast!r}.")
        else:
            means = np.asarray(contrast, dtype=np.float64)
            if means.shape != (n,):
                raise ValueError(f"expected {n} label intensities {HEAD_LABELS}, got shape {means.shape}.")
        return means.astype(np.float32)

    def image(self, labels: torch.Tensor, contrast: str | Sequence[float], seed: int) -> torch.Tensor:
        """An image ``(1, S, S, S)`` float32 in [0, 1] of head ``labels`` (deterministic in ``seed``).

        ``labels``: ``(1, S, S, S)`` integer head labels (from :meth:`head`). Voxels labelled :data:`OUT_OF_VIEW`
        are exactly 0; everywhere else (background included) carries Rician noise.
        """
        if labels.ndim != 4 or labels.shape[0] != 1:
            raise ValueError(f"expected head labels of shape (1, I, J, K), got {tuple(labels.shape)}.")
        if labels.is_floating_point() and bool((labels != labels.round()).any()):
            raise ValueError(f"expected integer head labels (from head()), got non-integer {labels.dtype} values.")
        rng = np.random.default_rng([int(seed), 19])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        shape = tuple(labels.shape[1:])
        lab = labels[0].long()
        oov = lab < 0
        lab = lab.clamp_min(0)
        means = torch.from_numpy(self.contrast_means(contrast, seed))
        n = len(HEAD_LABELS)
        # a smooth texture per label
        tex = F.interpolate(torch.randn(1, n, 5, 5, 5, generator=gen), size=shape, mode="trilinear", align_corners=True)
        tex_std = torch.from_numpy(rng.uniform(0.0, 0.12, size=n).astype(np.float32))
        idx = lab[None, None]
        img = means[lab] * torch.exp(tex_std[lab] * tex.gather(1, idx)[0, 0])
        img = img[None]
        # blur: sometimes anisotropic (thick slices)
        sigma = rng.uniform(0.3, 1.0, size=3)
        if rng.random() < 0.3:
            sigma[rng.integers(3)] = rng.uniform(1.0, 2.0)
        img = GaussianFilter(3, sigma.tolist())(img[None])[0]
        # multiplicative bias field
        lattice = torch.randn(1, 1, 4, 4, 4, generator=gen) * float(rng.uniform(0.0, 0.35))
        img = img * torch.exp(F.interpolate(lattice, size=shape, mode="trilinear", align_corners=True)[0])
        head = (lab > 0) & ~oov
        ref = img[0][head]
        top = torch.quantile(ref[:: max(1, ref.numel() // 200_000)], 0.995) if ref.numel() else torch.tensor(1.0)
        img = (img / top.clamp_min(1e-6)).clamp(0.0, 1.0) ** float(np.exp(rng.normal(0.0, 0.2)))
        # Rician noise, also in the background
        noise = float(rng.uniform(0.005, 0.06))
        n1 = torch.randn(img.shape, generator=gen) * noise
        n2 = torch.randn(img.shape, generator=gen) * noise
        img = ((img + n1) ** 2 + n2**2).sqrt()
        return img.masked_fill(oov[None], 0.0).clamp(0.0, 1.0).to(torch.float32)
