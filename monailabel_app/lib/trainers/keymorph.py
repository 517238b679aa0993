"""MONAI Label train task of KeyMorph: unsupervised fine-tuning of the bundle's detector on the datastore images."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from lib.registration import WeightStore, finetune_detector, parse_bool

logger = logging.getLogger(__name__)

__all__ = ["KeyMorphFineTune"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class KeyMorphFineTune(TrainTask):
    """Fine-tune the KeyMorph detector on the datastore's images: random pairs, random misalignment, mutual information.

    No labels are needed: every datastore image (NIfTI) takes part. A run starts from the app's latest fine-tuned
    weights when there are some (request option ``restart_from_shipped`` to start from the shipped weights again),
    else from the shipped ``models/model.pt``; the digest of the starting weights is checked first. The run goes to
    ``<model_dir>/train/<time stamp>/`` (the bundle's checkpoints, TensorBoard logs, ``model.pt``); its final weights
    are then published (with their SHA-256) as the app's fine-tuned weights, which the infer tasks use from their next
    request on.

    Request options (defaults in :meth:`config`): ``max_epochs``, ``epoch_length`` (pairs per epoch),
    ``learning_rate``, ``rotate_deg`` (augmentation, degrees per axis), ``restart_from_shipped``, ``device``.

    Args:
        weights: the app's weight store (bundle folder, model folder).
        description: shown by clients.
    """

    def __init__(self, weights: WeightStore, description: str = "Fine-tune the KeyMorph keypoint detector") -> None:
        super().__init__(description)
        self.weights = weights

    def config(self) -> dict[str, Any]:
        return {
            "max_epochs": 5,
            "epoch_length": 50,
            "learning_rate": 1e-5,
            "rotate_deg": 45.0,
            "restart_from_shipped": False,
            "device": device_list(),
        }

    def stats(self) -> dict[str, Any]:
        """The published fine-tuned weights' record (run statistics), or ``{}`` before the first run."""
        if not self.weights.record_path.is_file():
            return {}
        import json

        record = json.loads(self.weights.record_path.read_text())
        return {k: v for k, v in record.items() if k != "weights"}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        opts = {**self.config(), **request}
        try:
            max_epochs, epoch_length = int(opts["max_epochs"]), int(opts["epoch_length"])
            learning_rate, rotate_deg = float(opts["learning_rate"]), float(opts["rotate_deg"])
            restart = parse_bool(opts["restart_from_shipped"], "restart_from_shipped")
        except (TypeError, ValueError) as err:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"invalid train option: {err}") from err
        if max_epochs < 1 or epoch_length < 1 or not learning_rate > 0:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"expected max_epochs >= 1, epoch_length >= 1 and learning_rate > 0, got {max_epochs}, "
                f"{epoch_length}, {learning_rate}.",
            )
        images = []
        for image_id in datastore.list_images():
            uri = datastore.get_image_uri(image_id)
            if uri and uri.lower().endswith(_NIFTI_SUFFIXES) and Path(uri).is_file():
                images.append(uri)
        if len(images) < 2:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"fine-tuning needs at least 2 NIfTI images in the datastore, found {len(images)}.",
            )
        init = self.weights.current(use_finetuned=not restart)
        run_dir = self.weights.model_dir / "train" / time.strftime("%Y%m%d-%H%M%S")
        device = name_to_device(opts.get("device"))
        logger.info(
            "KeyMorph fine-tuning: %d images, %d x %d steps, lr %g, from the %s weights %s, run folder %s",
            len(images),
            max_epochs,
            epoch_length,
            learning_rate,
            init.kind,
            init.path.name,
            run_dir,
        )
        stats = finetune_detector(
            self.weights.bundle_dir,
            images,
            run_dir,
            init,
            max_epochs=max_epochs,
            epoch_length=epoch_length,
            learning_rate=learning_rate,
            rotate_deg=rotate_deg,
            device=device,
        )
        published = self.weights.publish(run_dir / "model.pt", {**stats, "run": run_dir.name})
        logger.info("published fine-tuned weights %s (sha256 %s): %s", published.path, published.sha256, stats)
        return stats
