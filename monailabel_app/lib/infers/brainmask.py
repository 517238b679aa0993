"""MONAI Label infer task: brain extraction (skull stripping) of a datastore image, any contrast, raw head or not.

The bundle's registration masks raw heads with the shipped brain extractor (``models/brain_extractor.pt``) before the
detector sees them; users also want the mask by itself. :class:`BrainExtraction` returns it as a segmentation (label
1 ``brain``) on the image's own grid (its shape and affine), computed by the same function the bundle uses
(:func:`custom_nets.brainmask.extract_brain_mask`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)

__all__ = ["BrainExtraction"]


class BrainExtraction(BasicInferTask):
    """Brain mask of the datastore image (uint8, 1 = brain, on the image's grid).

    Args:
        weights: the brain extractor's weights (SHA-256-checked against the bundle's ``large_files.yml``).
    """

    def __init__(self, weights: str | os.PathLike) -> None:
        super().__init__(
            path=str(weights),
            network=None,
            type=InferType.SEGMENTATION,
            labels={"brain": 1},
            dimension=3,
            description="Brain extraction (skull stripping) of a raw head MRI, any contrast: the brain mask",
        )
        self._net: Any = None

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []  # the image is read and the mask written on its own grid in run_inferer

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        """Write the mask of ``data["image"]`` (a file) to a temporary NIfTI in ``data[output_label_key]``."""
        from custom_nets.brainmask import load_brain_extractor, write_brain_mask
        from custom_nets.weights import WeightsIntegrityError

        image = data.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise HTTPException(
                status_code=422,
                detail=f"expected the image as one volume file (e.g. NIfTI), got {os.path.basename(str(image))!r}.",
            )
        try:
            if self._net is None:
                self._net = load_brain_extractor(self.path[0] if isinstance(self.path, list) else self.path, device)
        except WeightsIntegrityError as err:
            raise HTTPException(status_code=500, detail=str(err)) from err
        fd, out_file = tempfile.mkstemp(prefix="keymorph_brainmask_", suffix=".nii.gz")
        os.close(fd)
        try:
            stats = write_brain_mask(self._net, image, out_file)
        except ValueError as err:  # an image that cannot be read or holds no head: the client's problem
            Path(out_file).unlink(missing_ok=True)
            detail = str(err).replace(image, os.path.basename(image))  # no server paths in answers
            raise HTTPException(status_code=422, detail=f"brain extraction failed: {detail}") from err
        data[self.output_label_key] = out_file
        data[self.output_json_key] = {"label_names": {"brain": 1}, **stats}
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        return data[self.output_label_key], data[self.output_json_key]
