"""The MNI ICBM152 2009a tissue template (shipped in the ``nilearn`` wheel) and the cube grids the network sees.

The template: T1 (skull-stripped), grey- and white-matter probability maps and a brain mask, 197 x 233 x 189 at 1 mm,
RAS, (c) McConnell Brain Imaging Centre, MNI (permissive licence; see ``bundle/docs/data_license.txt``). CSF is not
shipped: it is estimated as ``brain mask - GM - WM`` (clipped to [0, 1]), which places CSF in the ventricles, sulci and
around the brain.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TISSUES", "TissueTemplate", "load_tissue_template", "cube_affine", "BRAIN_CENTRE_MNI"]

#: Label values of the tissue maps, in order: 0 background, 1 CSF, 2 grey matter, 3 white matter.
TISSUES = ("background", "csf", "gm", "wm")

#: Centre of the bounding box of the template's brain mask, MNI mm (RAS).
BRAIN_CENTRE_MNI = (0.0, -17.0, 5.0)


@dataclass(frozen=True)
class TissueTemplate:
    """Tissue probabilities on the template grid.

    Attributes:
        probs: ``(4, I, J, K)`` float32 probabilities of :data:`TISSUES` (they sum to 1 in every voxel).
        t1: ``(I, J, K)`` float32 T1 template intensities in [0, 1].
        affine: ``(4, 4)`` voxel-to-world (MNI RAS mm) affine.
    """

    probs: np.ndarray
    t1: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def load_tissue_template() -> TissueTemplate:
    """Load the MNI tissue template from ``nilearn`` (cached in memory after the first call).

    Raises:
        ImportError: ``nilearn`` is not installed (it comes with ``pip install custom_nets[data]``).
    """
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the synthetic brain generator needs the MNI template shipped with nilearn: "
            "pip install 'custom_nets[data]' (or pip install nilearn==0.14.1)."
        ) from err
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    mask = np.asarray(mask_img.get_fdata(), dtype=np.float32)
    # Inside the mask, tissue probabilities fill the voxel (CSF takes what GM and WM leave); outside it is background.
    gm, wm = gm * mask, wm * mask
    tissue = np.clip(gm + wm, 0.0, 1.0)
    scale = np.where(gm + wm > 1.0, 1.0 / np.maximum(gm + wm, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(mask - tissue, 0.0, 1.0)
    bg = np.clip(1.0 - csf - gm - wm, 0.0, 1.0)
    probs = np.stack([bg, csf, gm, wm]).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    return TissueTemplate(probs=probs, t1=t1 * mask, affine=np.asarray(mask_img.affine, dtype=np.float64))


def cube_affine(
    spatial_size: int | Sequence[int], pixdim: float, centre: Sequence[float] = BRAIN_CENTRE_MNI
) -> np.ndarray:
    """RAS-aligned voxel-to-world affine of a grid of ``spatial_size`` voxels of ``pixdim`` mm centred at ``centre``."""
    size = np.broadcast_to(np.asarray(spatial_size, dtype=np.float64), (3,))
    a = np.diag([pixdim, pixdim, pixdim, 1.0])
    a[:3, 3] = np.asarray(centre, dtype=np.float64) - pixdim * (size - 1) / 2.0
    return a
