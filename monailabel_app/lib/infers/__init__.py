"""KeyMorph infer tasks for MONAI Label."""

from .brainmask import BrainExtraction
from .keymorph import AlignToAtlas, AtlasSegmentation

__all__ = ["AlignToAtlas", "AtlasSegmentation", "BrainExtraction"]
