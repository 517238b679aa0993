"""KeyMorph train task for MONAI Label."""

from .keymorph import KeyMorphFineTune

__all__ = ["KeyMorphFineTune"]
