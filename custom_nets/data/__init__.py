"""Data for KeyMorph: synthetic multi-contrast brains, augmentation, real-data loading and the demo set."""

from .augment import RandAffineMovingd, RandFieldOfViewCutd, random_affine_matrix, rotation_matrix
from .checks import (
    CheckLabelGridd,
    CheckWorldOverlapd,
    LoadVolumed,
    check_image_header,
    check_image_headers,
    world_bounding_box,
)
from .cohort import cohort_images, cohort_labels
from .datalists import IXI_MODALITIES, load_datalist, load_pair_list, sample_pairs, scan_ixi_folder
from .datasets import (
    FAILURE_KEY,
    FAILURES_KEY,
    FailSafeDataset,
    SyntheticPairDataset,
    build_pair_dataset,
    collate_pairs,
    evaluation_items,
    failure_message,
    inference_pairs,
    synthetic_pairs,
)
from .demo import save_nifti, write_demo_data
from .heads import HeadSynthesizer
from .pair_transforms import RandPaird, SynthPaird
from .synth import CONTRAST_PRESETS, CONTRASTS, BrainSynthesizer, subject_seed
from .template import BRAIN_CENTRE_MNI, TISSUES, cube_affine, load_tissue_template
from .transforms import (
    AbovePercentile,
    BrainMaskd,
    ForegroundCropd,
    IsotropicSpacingd,
    preprocessing_transforms,
    refine_key,
)

__all__ = [
    "cohort_images",
    "cohort_labels",
    "AbovePercentile",
    "BrainMaskd",
    "BRAIN_CENTRE_MNI",
    "CheckLabelGridd",
    "CheckWorldOverlapd",
    "FAILURE_KEY",
    "FAILURES_KEY",
    "FailSafeDataset",
    "ForegroundCropd",
    "IsotropicSpacingd",
    "check_image_header",
    "check_image_headers",
    "collate_pairs",
    "failure_message",
    "world_bounding_box",
    "BrainSynthesizer",
    "HeadSynthesizer",
    "CONTRASTS",
    "CONTRAST_PRESETS",
    "IXI_MODALITIES",
    "LoadVolumed",
    "RandAffineMovingd",
    "RandFieldOfViewCutd",
    "RandPaird",
    "SynthPaird",
    "SyntheticPairDataset",
    "TISSUES",
    "build_pair_dataset",
    "evaluation_items",
    "inference_pairs",
    "cube_affine",
    "load_datalist",
    "load_pair_list",
    "load_tissue_template",
    "preprocessing_transforms",
    "refine_key",
    "random_affine_matrix",
    "rotation_matrix",
    "sample_pairs",
    "save_nifti",
    "scan_ixi_folder",
    "subject_seed",
    "synthetic_pairs",
    "write_demo_data",
]
