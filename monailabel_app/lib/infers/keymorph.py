"""MONAI Label infer tasks of KeyMorph: atlas-based segmentation and alignment to the atlas.

MONAI Label infers map one datastore image to one result file plus a JSON. A registration fits as: the datastore
image is the subject, the app's configured atlas (image + labels) is the other image of the pair.

* :class:`AtlasSegmentation` registers the atlas (moving) onto the subject (fixed) and returns the atlas labels
  resampled into the subject's grid (nearest neighbour): a segmentation the viewer shows on the subject.
* :class:`AlignToAtlas` registers the subject (moving) onto the atlas (fixed) and returns the subject resampled onto
  the atlas grid: the subject in the atlas' standard orientation.

Both run the bundle's own inference workflow (:class:`~lib.registration.BundleRegistration`), so the result JSON holds
exactly what ``python -m monai.bundle run inference`` writes for that pair: ``fixed_to_moving_ras`` /
``moving_to_fixed_ras`` (4 x 4, RAS+ world mm), ``transform_type``, keypoints of both images (K x 3, RAS mm) and their
weights, plus the ITK transform text (LPS), which image played which role, the atlas and the weights used.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from custom_nets.weights import WeightsIntegrityError
from lib.registration import (
    Atlas,
    BundleRegistration,
    RegistrationError,
    RegistrationResult,
    WeightStore,
    parse_bool,
)

logger = logging.getLogger(__name__)

__all__ = ["AtlasSegmentation", "AlignToAtlas"]


class _KeyMorphInfer(BasicInferTask):
    """Shared machinery: no MONAI Label pre / post transforms; the "inferer" is one bundle registration.

    Args:
        registration: runs the bundle's inference workflow.
        weights: where the detector weights come from (shipped, or the app's latest fine-tuned ones).
        atlas: the atlas (image, labels, label names).
        type: MONAI Label infer type.
        labels: label dictionary reported to clients.
        description: shown by clients.
        orientation_search: default of the per-request option (the bundle's orientation search).
        use_finetuned: use the app's fine-tuned weights once a training run has published some.
    """

    #: which image of the pair the datastore image (subject) is: "fixed" or "moving"
    subject_role = "fixed"
    #: which output file of the bundle's RegistrationWriter is the MONAI Label result
    result_key = "label_warped"

    def __init__(
        self,
        registration: BundleRegistration,
        weights: WeightStore,
        atlas: Atlas,
        type: InferType | str,
        labels: dict[str, int] | None,
        description: str,
        orientation_search: bool,
        use_finetuned: bool = True,
    ) -> None:
        super().__init__(
            path=str(weights.shipped.path),
            network=None,
            type=type,
            labels=labels,
            dimension=3,
            description=description,
            config={"orientation_search": bool(orientation_search)},
        )
        self.registration, self.weights, self.atlas = registration, weights, atlas
        self.use_finetuned = bool(use_finetuned)

    def get_path(self, validate: bool = True) -> str | None:
        """The weights file used now: the latest fine-tuned one when published (and enabled), else the shipped one."""
        path = self.weights.current(self.use_finetuned).path
        return str(path) if not validate or path.is_file() else None

    def is_valid(self) -> bool:
        return self.get_path() is not None

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["atlas"] = self.atlas.info()
        return out

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []  # the bundle's inference workflow loads and preprocesses both images itself

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []

    def _pair(self, subject: str) -> dict[str, Any]:
        """``register`` arguments for this task (moving / fixed / moving_label) given the subject's file."""
        raise NotImplementedError

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        """Register the pair; put the result file in ``data[output_label_key]`` and the JSON in
        ``data[output_json_key]``.

        ``data["image"]`` is the subject's file (MONAI Label resolved the datastore id); ``data["orientation_search"]``
        the per-request option (bool or ``"true"`` / ``"false"``).
        """
        subject = data.get("image")
        if not isinstance(subject, str) or not os.path.isfile(subject):
            raise HTTPException(
                status_code=422,
                detail=f"expected the image as one volume file (e.g. NIfTI), got {os.path.basename(str(subject))!r}.",
            )
        try:
            requested = data.get("orientation_search", self._config["orientation_search"])
            search = parse_bool(requested, "orientation_search")
        except ValueError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        weights = self.weights.current(self.use_finetuned)
        work = tempfile.mkdtemp(prefix="keymorph_")
        try:
            try:
                result = self.registration.register(
                    output_dir=work, weights=weights, device=device, orientation_search=search, **self._pair(subject)
                )
            except RegistrationError as err:  # the image cannot be registered: the client's problem, say why
                raise HTTPException(status_code=422, detail=f"KeyMorph registration failed: {err}") from err
            except WeightsIntegrityError as err:  # the server's problem, but say which
                raise HTTPException(status_code=500, detail=str(err)) from err
            fd, out_file = tempfile.mkstemp(prefix="keymorph_result_", suffix=".nii.gz")
            os.close(fd)
            shutil.move(result.files[self.result_key], out_file)  # MONAI Label deletes it once sent
            data[self.output_label_key] = out_file
            data[self.output_json_key] = self._result_json(result, data, weights.describe(), search)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return data

    def _result_json(
        self, result: RegistrationResult, data: dict[str, Any], weights: dict[str, Any], search: bool
    ) -> dict[str, Any]:
        """The bundle's JSON record, without server paths, plus roles, ITK transform text, atlas and weights."""
        record = {k: v for k, v in result.record.items() if k not in ("moving", "fixed", "outputs")}
        atlas_role = "moving" if self.subject_role == "fixed" else "fixed"
        record["roles"] = {self.subject_role: "subject", atlas_role: "atlas"}
        record["subject"] = os.path.basename(str(data.get("image_path") or data.get("image")))
        record["atlas"] = self.atlas.info()
        record["weights"] = weights
        record["orientation_search"] = search
        tfm = result.files.get("itk_transform")
        if tfm and Path(tfm).is_file():
            record["itk_transform_tfm"] = Path(tfm).read_text()
        return record

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        """The result file written by the bundle (on the grid stated by the task) and the result JSON."""
        return data[self.output_label_key], data[self.output_json_key]


class AtlasSegmentation(_KeyMorphInfer):
    """Atlas-based segmentation: the atlas labels propagated into the subject by KeyMorph registration.

    Pair: moving = atlas image (with its label map), fixed = subject. Result: the atlas labels resampled onto the
    subject's own grid (its shape and affine, nearest neighbour, the atlas label's data type); JSON
    ``fixed_to_moving_ras`` maps subject points to atlas points (RAS mm).
    """

    subject_role = "fixed"
    result_key = "label_warped"

    def __init__(self, registration: BundleRegistration, weights: WeightStore, atlas: Atlas, **kwargs: Any) -> None:
        super().__init__(
            registration,
            weights,
            atlas,
            type=InferType.SEGMENTATION,
            labels=dict(atlas.labels),
            description=f"KeyMorph atlas segmentation: the labels of atlas '{atlas.name}' registered onto the image",
            **kwargs,
        )

    def _pair(self, subject: str) -> dict[str, Any]:
        return {"moving": self.atlas.image, "fixed": subject, "moving_label": self.atlas.label}


class AlignToAtlas(_KeyMorphInfer):
    """Alignment: the subject resampled into the atlas space (standard orientation) by KeyMorph registration.

    Pair: moving = subject, fixed = atlas image. Result: the subject's intensities resampled onto the atlas grid
    (float32, trilinear, the atlas header); JSON ``moving_to_fixed_ras`` maps subject points to atlas points (RAS mm),
    the matrix a viewer applies to show the subject in atlas orientation without resampling.
    """

    subject_role = "moving"
    result_key = "warped"

    def __init__(self, registration: BundleRegistration, weights: WeightStore, atlas: Atlas, **kwargs: Any) -> None:
        super().__init__(
            registration,
            weights,
            atlas,
            type=InferType.OTHERS,
            labels=None,
            description=f"KeyMorph alignment: the image resampled into the space of atlas '{atlas.name}'",
            **kwargs,
        )

    def _pair(self, subject: str) -> dict[str, Any]:
        return {"moving": subject, "fixed": self.atlas.image}
