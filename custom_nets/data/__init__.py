"""Data for KeyMorph: synthetic multi-contrast brains, augmentation, real-data loading and the demo set."""

from .augment import RandAffineMovingd, random_affine_matrix, rotation_matrix
from .datasets import (
    IXI_MODALITIES,
    SyntheticPairDataset,
    build_pair_dataset,
    evaluation_items,
    inference_pairs,
    load_datalist,
    load_pair_list,
    sample_pairs,
    scan_ixi_folder,
    synthetic_pairs,
)
from .demo import save_nifti, write_demo_data
from .synth import CONTRAST_PRESETS, CONTRASTS, BrainSynthesizer, subject_seed
from .template import BRAIN_CENTRE_MNI, TISSUES, cube_affine, load_tissue_template
from .transforms import LoadVolumed, RandPaird, SynthPaird, preprocessing_transforms

__all__ = [
    "BRAIN_CENTRE_MNI",
    "BrainSynthesizer",
    "CONTRASTS",
    "CONTRAST_PRESETS",
    "IXI_MODALITIES",
    "LoadVolumed",
    "RandAffineMovingd",
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
    "random_affine_matrix",
    "rotation_matrix",
    "sample_pairs",
    "save_nifti",
    "scan_ixi_folder",
    "subject_seed",
    "synthetic_pairs",
    "write_demo_data",
]
