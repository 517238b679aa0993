"""Synthetic multi-contrast brains from the MNI tissue template (SynthSeg / SynthMorph-style synthesis).

A *subject* is the template's tissue probability maps deformed by a random smooth displacement field (a new anatomy),
resampled onto the output grid in one interpolation. An *image* of a subject mixes per-tissue intensities by the
tissue probabilities (partial volume), then adds blur, a multiplicative bias field, noise and a gamma change, and is
scaled to [0, 1]. Intensities come from a named preset (``t1``, ``t2``, ``pd``: ordering of CSF / GM / WM as in real
scans, with jitter) or are drawn at random per tissue (``random``: any contrast). Labels are the arg-max tissue of the
same deformed maps, so they are exactly aligned with every image of the subject.

Everything is a deterministic function of an integer seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from ..geometry import apply_affine, voxel_grid, voxel_to_normalized, voxel_to_world, world_to_voxel
from .template import BRAIN_CENTRE_MNI, TISSUES, cube_affine, load_tissue_template

__all__ = ["CONTRAST_PRESETS", "CONTRASTS", "BrainSynthesizer", "subject_seed"]

#: Mean intensity of (background, CSF, GM, WM) for the named contrasts, before jitter, bias, noise and gamma.
CONTRAST_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "t1": (0.0, 0.25, 0.60, 0.85),  # WM brightest, CSF dark
    "t2": (0.0, 0.95, 0.55, 0.35),  # CSF bright, WM dark
    "pd": (0.0, 0.80, 0.72, 0.60),  # flat, CSF slightly brighter
}
#: Contrast names accepted by :meth:`BrainSynthesizer.image`.
CONTRASTS = (*CONTRAST_PRESETS, "random")

#: Side (mm) of the template-space box over which the displacement lattice of a subject is spread.
_DEFORM_BOX_MM = 256.0

_SPLITS = {"train": 0, "validation": 1, "test": 2}


def subject_seed(split: str, index: int) -> int:
    """Seed of synthetic subject ``index`` of ``split`` (``train`` / ``validation`` / ``test``).

    The splits use disjoint seed streams, so held-out subjects are never training subjects.
    """
    if split not in _SPLITS:
        raise ValueError(f"expected split in {tuple(_SPLITS)}, got {split!r}.")
    return int(np.random.SeedSequence([_SPLITS[split], int(index)]).generate_state(1)[0])


def _smooth_field(gen: torch.Generator, points: int, shape: Sequence[int], channels: int, std: float) -> torch.Tensor:
    """A smooth random field ``(channels, *shape)``: Gaussian values on a ``points^3`` lattice, upsampled linearly."""
    lattice = torch.randn(1, channels, points, points, points, generator=gen) * std
    return F.interpolate(lattice, size=tuple(shape), mode="trilinear", align_corners=True)[0]


class BrainSynthesizer:
    """Generate synthetic subjects, images and labels on a cube grid around the brain.

    Args:
        spatial_size: voxels per side of the output cube.
        pixdim: voxel size in mm (the cube covers ``spatial_size * pixdim`` mm, 256 mm by default, enough for the
            brain under any rotation about its centre).
        centre: world (MNI RAS mm) centre of the cube.
        deform_mm: standard deviation (mm) of the random displacements that make a new anatomy.
        deform_points: lattice points per axis of the displacement field (coarser = smoother).
        bias_std: standard deviation of the log bias field.
        blur_max: maximum Gaussian blur sigma, in voxels.
        noise_max: maximum noise standard deviation (intensities are about [0, 1] before scaling).
        gamma_std: standard deviation of the log gamma exponent.
        jitter: relative jitter of the preset tissue intensities.

    Shapes:
        subjects are ``(4, S, S, S)`` tissue probabilities (:data:`~custom_nets.data.template.TISSUES`), images
        ``(1, S, S, S)`` float32 in [0, 1], labels ``(1, S, S, S)`` float32 tissue indices. :attr:`affine` is their
        voxel-to-world affine.
    """

    def __init__(
        self,
        spatial_size: int | Sequence[int] = 128,
        pixdim: float = 2.0,
        centre: Sequence[float] = BRAIN_CENTRE_MNI,
        deform_mm: float = 3.0,
        deform_points: int = 5,
        bias_std: float = 0.25,
        blur_max: float = 0.8,
        noise_max: float = 0.04,
        gamma_std: float = 0.15,
        jitter: float = 0.08,
    ) -> None:
        size = (spatial_size,) * 3 if isinstance(spatial_size, (int, np.integer)) else tuple(spatial_size)
        if len(size) != 3:
            raise ValueError(f"expected spatial_size as an int or 3 ints, got {spatial_size!r}.")
        self.shape, self.pixdim = tuple(int(n) for n in size), float(pixdim)
        self.affine = cube_affine(self.shape, self.pixdim, centre)
        self.deform_mm, self.deform_points = float(deform_mm), int(deform_points)
        self.bias_std, self.blur_max, self.noise_max = float(bias_std), float(blur_max), float(noise_max)
        self.gamma_std, self.jitter = float(gamma_std), float(jitter)
        template = load_tissue_template()
        # one voxel of pure background around the template, so that border padding continues background only (the
        # template's last axial slice cuts the brainstem, which would otherwise extend to the edge of the grid)
        probs = torch.from_numpy(template.probs).unsqueeze(0)  # (1, 4, I, J, K)
        self._template = F.pad(probs, (1, 1, 1, 1, 1, 1))
        self._template[:, 0] += F.pad(torch.ones_like(probs[:, 0]), (1, 1, 1, 1, 1, 1), value=0.0).eq(0).float()
        shift = np.eye(4)
        shift[:3, 3] = -1.0
        self._template_affine = torch.from_numpy(template.affine @ shift).unsqueeze(0)
        vox = voxel_grid(self.shape, dtype=torch.float64).reshape(1, -1, 3)
        self._world = voxel_to_world(vox, torch.from_numpy(self.affine).unsqueeze(0))  # (1, N, 3) float64
        self._centre = torch.as_tensor(BRAIN_CENTRE_MNI, dtype=torch.float64)

    def subject(self, seed: int, pose: np.ndarray | None = None) -> torch.Tensor:
        """Tissue probabilities ``(4, S, S, S)`` of the subject with this seed (deterministic).

        ``pose``: optional ``(4, 4)`` world matrix placing the subject's head in the output grid's world: template
        point ``p`` appears at world ``pose @ p`` (a head position in the scanner). Default: template alignment.
        The anatomy (the displacement field, defined in template space) is the same in every pose and on every grid,
        so two images of one subject differ by exactly ``pose_b @ inv(pose_a)``.
        """
        gen = torch.Generator().manual_seed(int(seed))
        points = self.deform_points
        lattice = torch.randn(1, 3, points, points, points, generator=gen, dtype=torch.float64) * self.deform_mm
        world = self._world
        if pose is not None:
            world = apply_affine(torch.linalg.inv(torch.as_tensor(pose, dtype=torch.float64)).unsqueeze(0), world)
        # template point q; the lattice spans a fixed 256 mm box about the brain centre (in template mm)
        box = (world - self._centre) / (_DEFORM_BOX_MM / 2)
        disp = F.grid_sample(lattice, box.flip(-1)[:, :, None, None], align_corners=True, padding_mode="border")
        world = world + disp[0, :, :, 0, 0].T.unsqueeze(0)
        vox = world_to_voxel(world, self._template_affine)
        grid = voxel_to_normalized(vox, self._template.shape[2:]).to(torch.float32).reshape(1, *self.shape, 3)
        probs = F.grid_sample(self._template, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return probs / probs.sum(0, keepdim=True).clamp_min(1e-6)

    @staticmethod
    def labels(probs: torch.Tensor) -> torch.Tensor:
        """Arg-max tissue labels ``(1, S, S, S)`` (float32 values 0..3) of subject probabilities ``(4, S, S, S)``."""
        return probs.argmax(0, keepdim=True).to(torch.float32)

    def contrast_means(self, contrast: str | Sequence[float], seed: int) -> np.ndarray:
        """Mean intensity per tissue ``(4,)`` for a preset name, ``"random"``, or explicit values (no jitter)."""
        rng = np.random.default_rng([int(seed), 7])
        if isinstance(contrast, str):
            if contrast == "random":
                means = np.concatenate([[0.0], rng.uniform(0.05, 1.0, size=3)])
            elif contrast in CONTRAST_PRESETS:
                base = np.asarray(CONTRAST_PRESETS[contrast])
                means = base * (1 + rng.uniform(-self.jitter, self.jitter, size=4))
            else:
                raise ValueError(f"expected a contrast in {CONTRASTS} or {len(TISSUES)} intensities, got {contrast!r}.")
        else:
            means = np.asarray(contrast, dtype=np.float64)
            if means.shape != (len(TISSUES),):
                raise ValueError(f"expected {len(TISSUES)} tissue intensities {TISSUES}, got {means.shape}.")
        return means.astype(np.float32)

    def image(self, probs: torch.Tensor, contrast: str | Sequence[float], seed: int) -> torch.Tensor:
        """An image ``(1, S, S, S)`` in [0, 1] of subject ``probs`` with the given contrast (deterministic in seed)."""
        rng = np.random.default_rng([int(seed), 11])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        means = torch.from_numpy(self.contrast_means(contrast, seed))
        img = (probs * means.view(-1, 1, 1, 1)).sum(0, keepdim=True)  # partial-volume mixture
        sigma = float(rng.uniform(0.0, self.blur_max))
        if sigma > 0.05:
            img = GaussianFilter(3, sigma)(img.unsqueeze(0))[0]
        img = img * torch.exp(_smooth_field(gen, 4, self.shape, 1, self.bias_std))
        brain = 1.0 - probs[:1]
        noise = float(rng.uniform(0.0, self.noise_max))
        img = (img + torch.randn(img.shape, generator=gen) * noise * brain).clamp_min(0.0) * brain
        top = torch.quantile(img[brain > 0.5][:: max(1, int((brain > 0.5).sum()) // 200_000)], 0.995)
        img = (img / top.clamp_min(1e-6)).clamp(0.0, 1.0)
        return img ** float(np.exp(rng.normal(0.0, self.gamma_std)))
