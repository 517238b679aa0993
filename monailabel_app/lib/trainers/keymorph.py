"""MONAI Label train task of KeyMorph: unsupervised fine-tuning of the bundle's detector on the datastore images."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from lib.registration import WeightStore, finetune_detector, parse_bool
from lib.routes import check_device

logger = logging.getLogger(__name__)

__all__ = ["KeyMorphFineTune"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Allowed ranges of the numeric request options: ``(type, low, high)``, both ends included.
OPTION_RANGES: dict[str, tuple[type, float, float]] = {
    "max_epochs": (int, 1, 1000),
    "epoch_length": (int, 1, 10000),
    "learning_rate": (float, 1e-9, 0.1),
    "rotate_deg": (float, 0.0, 180.0),
}


def limit_memory(gb: float) -> None:
    """Limit this process's address space to ``gb`` GB (``RLIMIT_AS``; never above an existing hard limit): past it,
    allocations fail with ``MemoryError`` in this process instead of the kernel's OOM killer picking a process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


class KeyMorphFineTune(TrainTask):
    """Fine-tune the KeyMorph detector on the datastore's images: random pairs, random misalignment, mutual information.

    No labels are needed: every datastore image (NIfTI) takes part. A run starts from the app's latest fine-tuned
    weights when there are some (request option ``restart_from_shipped`` to start from the shipped weights again),
    else from the shipped ``models/model.pt``; the digest of the starting weights is checked first. The run goes to
    ``<model_dir>/train/<time stamp>/`` (the bundle's checkpoints, TensorBoard logs, ``model.pt``); its final weights
    are then published (with their SHA-256) as the app's fine-tuned weights, which the infer tasks use from their next
    request on.

    Request options (defaults in :meth:`config`, ranges in :data:`OPTION_RANGES`, checked by :meth:`check_options`
    when the request comes): ``max_epochs``, ``epoch_length`` (pairs per epoch), ``learning_rate``, ``rotate_deg``
    (augmentation, degrees per axis), ``restart_from_shipped``, ``device``. On the CPU the training process's address
    space is limited to ``memory_limit_gb``; running out of it fails the run with a message that says so (the last
    lines of ``GET /train/``'s ``details``).

    Args:
        weights: the app's weight store (bundle folder, model folder).
        description: shown by clients.
        memory_limit_gb: address-space limit of the training process on the CPU (``None``: no limit).
    """

    def __init__(
        self,
        weights: WeightStore,
        description: str = "Fine-tune the KeyMorph keypoint detector",
        memory_limit_gb: float | None = None,
    ) -> None:
        super().__init__(description)
        self.weights = weights
        self.memory_limit_gb = memory_limit_gb

    def check_options(self, request: dict[str, Any], strict: bool = False) -> dict[str, Any]:
        """The run's options (defaults, then ``request``) as typed values.

        Args:
            request: the request's options.
            strict: also refuse keys that are not options (a client's request; MONAI Label adds its own keys to the
                request the training process gets).

        Raises:
            ValueError: an option out of its range or of the wrong type, named with its allowed range; with
                ``strict``, an unknown key.
        """
        if strict:
            unknown = sorted(set(request) - set(self.config()) - {"model", "gpus"})
            if unknown:
                raise ValueError(f"unknown options {unknown}; expected some of {sorted(self.config())}.")
        opts = {**self.config(), **request}
        out: dict[str, Any] = {}
        for name, (kind, low, high) in OPTION_RANGES.items():
            value = opts[name]
            expected = (
                f"{name}: expected {'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}], got {value!r}."
            )
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                number = kind(value)
                if (kind is int and isinstance(value, float) and value != number) or not low <= number <= high:
                    raise ValueError
            except ValueError:
                raise ValueError(expected) from None
            out[name] = number
        out["restart_from_shipped"] = parse_bool(opts["restart_from_shipped"], "restart_from_shipped")
        if request.get("device") is not None:
            check_device(request["device"])
        out["device"] = opts.get("device")
        return out

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
        try:
            opts = self.check_options(request)
        except ValueError as err:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"invalid train option: {err}") from err
        max_epochs, epoch_length = opts["max_epochs"], opts["epoch_length"]
        learning_rate, rotate_deg, restart = opts["learning_rate"], opts["rotate_deg"], opts["restart_from_shipped"]
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
        if self.memory_limit_gb and str(device).startswith("cpu"):
            limit_memory(self.memory_limit_gb)
            logger.info("training process memory limited to %g GB (--conf train_memory_gb)", self.memory_limit_gb)
        try:
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
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and "allocate memory" not in str(err):
                raise
            raise MONAILabelException(
                MONAILabelError.SERVER_ERROR,
                f"KeyMorph fine-tuning failed: out of memory (limit {self.memory_limit_gb} GB, --conf "
                "train_memory_gb); use a smaller epoch_length or give the process more memory.",
            ) from err
        published = self.weights.publish(run_dir / "model.pt", {**stats, "run": run_dir.name})
        logger.info("published fine-tuned weights %s (sha256 %s): %s", published.path, published.sha256, stats)
        return stats
