"""KeyMorph for MONAI: keypoint detectors, the centre-of-mass layer, closed-form fits, the registration module and
its inferer.

Coordinate convention: see :mod:`custom_nets.geometry`.
"""

# the submodules the bundle configs reach as attributes of the package (``@custom_nets.data...``)
from . import brainmask, checkpoints, cohort_run, data, engines, groupwise, handlers, losses, metrics, weights  # noqa: E402, F401, I001
from .detectors import ConvNetDetector, TruncatedUNetDetector
from .fits import (
    DegenerateKeypointsError,
    ThinPlateSpline,
    fit_affine,
    fit_rigid,
    fit_tps,
    fit_transform,
    keypoint_residual_mm,
)
from .geometry import resample
from .inferers import KeyMorphInferer
from .keymorph import TRANSFORM_TYPES, KeyMorph, KeyMorphOutput, amp_supported
from .keypoints import CenterOfMass, power_weights
from .options import parse_bool
from .quality import QualityThresholds
from .refine import AffineRefiner

from .version import __version__ as __version__

__all__ = [
    "AffineRefiner",
    "CenterOfMass",
    "ConvNetDetector",
    "DegenerateKeypointsError",
    "KeyMorph",
    "KeyMorphInferer",
    "KeyMorphOutput",
    "TRANSFORM_TYPES",
    "ThinPlateSpline",
    "TruncatedUNetDetector",
    "amp_supported",
    "fit_affine",
    "fit_rigid",
    "fit_tps",
    "fit_transform",
    "keypoint_residual_mm",
    "parse_bool",
    "power_weights",
    "QualityThresholds",
    "resample",
]
