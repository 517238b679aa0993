"""KeyMorph infer tasks for MONAI Label."""

from .keymorph import AlignToAtlas, AtlasSegmentation

__all__ = ["AlignToAtlas", "AtlasSegmentation"]
