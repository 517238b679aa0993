"""KeyMorph for the MONAI Label app: the atlas, the weights, and registration / fine-tuning through the bundle's own
workflows.

Nothing here imports MONAI Label: registration runs the bundle's ``configs/inference.json`` and fine-tuning its
``configs/train.json`` with :class:`monai.bundle.ConfigWorkflow`, the workflow ``python -m monai.bundle run`` builds,
so a registration served by the app gives the matrix the bundle's command line gives on the same pair.

Conventions (as in :mod:`custom_nets`): images are NIfTI files with their own voxel-to-world affines; world
coordinates are RAS+ millimetres; ``fixed_to_moving_ras`` (4 x 4) maps a point of the fixed image to the
corresponding point of the moving image, ``moving_to_fixed_ras`` is its inverse.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from custom_nets.options import parse_bool  # re-exported: the app's options read as the bundle's do

logger = logging.getLogger(__name__)

__all__ = [
    "Atlas",
    "BundleRegistration",
    "RegistrationError",
    "RegistrationResult",
    "WeightStore",
    "Weights",
    "build_mni_atlas",
    "finetune_detector",
    "load_atlas",
    "parse_bool",
    "verify_weights",
]

#: Name of the default atlas (MNI ICBM152 2009a from the nilearn wheel, tissue labels from its probability maps).
MNI_ATLAS_NAME = "mni152_2009a_tissue"


# ----------------------------------------------------------------------------------------------------------------------
# The atlas


@dataclass(frozen=True)
class Atlas:
    """An atlas: an image and its label map on the same grid (NIfTI files), and the names of the label values.

    Attributes:
        name: short name shown to clients.
        image: the atlas image (any contrast KeyMorph handles: T1 / T2 / PD-like brain MRI).
        label: integer label map on the image's grid (0 background).
        labels: ``{name: value}`` of the non-zero label values, the MONAI Label label dictionary.
    """

    name: str
    image: Path
    label: Path
    labels: dict[str, int]

    def info(self) -> dict[str, Any]:
        """What the app reports about the atlas (no server paths): name, labels, grid shape and spacing (mm)."""
        img = nib.load(str(self.image))
        return {
            "name": self.name,
            "labels": dict(self.labels),
            "shape": [int(n) for n in img.shape[:3]],
            "spacing_mm": [round(float(s), 4) for s in img.header.get_zooms()[:3]],
        }


def build_mni_atlas(out_dir: str | os.PathLike) -> Atlas:
    """Write the default atlas to ``out_dir`` (once; existing files are reused) and return it.

    Image: the skull-stripped MNI ICBM152 2009a T1 template; labels: the most probable tissue of each voxel (1 CSF,
    2 grey matter, 3 white matter, 0 background), from the tissue maps :func:`custom_nets.data.load_tissue_template`
    derives from the ``nilearn`` wheel's GM / WM / brain-mask templates. Native template grid: 197 x 233 x 189 voxels
    of 1 mm, RAS, MNI world mm. Both files are written atomically, so a concurrent reader never sees a partial file.

    Raises:
        ImportError: ``nilearn`` is not installed (the ``data`` / ``label`` extras install it).
    """
    from custom_nets.data import TISSUES, load_tissue_template, save_nifti

    out = Path(out_dir)
    image, label = out / f"{MNI_ATLAS_NAME}_t1.nii.gz", out / f"{MNI_ATLAS_NAME}_label.nii.gz"
    labels = {name: i for i, name in enumerate(TISSUES) if i > 0}
    if not (image.is_file() and label.is_file()):
        template = load_tissue_template()
        tissue = np.argmax(template.probs, axis=0).astype(np.uint8)  # (I, J, K): index into TISSUES
        save_nifti(template.t1.astype(np.float32), template.affine, image)
        save_nifti(tissue, template.affine, label, dtype=np.uint8)
        logger.info("wrote the MNI tissue atlas to %s", out)
    return Atlas(MNI_ATLAS_NAME, image, label, labels)


def load_atlas(
    image: str | os.PathLike,
    label: str | os.PathLike,
    label_names: str | Sequence[str] | Mapping[str, int] | None = None,
    name: str | None = None,
) -> Atlas:
    """A user atlas: ``image`` and its ``label`` map (same grid), with names for the label values.

    Args:
        image: atlas image file (NIfTI).
        label: label map file (NIfTI, integer values, 0 background) on the image's grid.
        label_names: ``{name: value}`` (or its JSON text), or names of the values 1..N in order (a list or a
            comma-separated string), one for every non-zero value of the map; default ``label_<value>``.
        name: atlas name shown to clients (default: the image file name without extension).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: not 3D volumes, different grids, non-integer labels, or names that do not match the values.
    """
    image, label = Path(image).expanduser(), Path(label).expanduser()
    for what, path in (("atlas image", image), ("atlas label", label)):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such {what} file.")
    img, lab = nib.load(str(image)), nib.load(str(label))
    if len(img.shape) != 3 or len(lab.shape) != 3:
        raise ValueError(
            f"expected 3D atlas image and label, got shapes {img.shape} ({image}) and {lab.shape} ({label})."
        )
    if img.shape != lab.shape or not np.allclose(img.affine, lab.affine, atol=1e-4):
        raise ValueError(
            f"expected the atlas label on the image's grid, got {lab.shape} with affine\n{lab.affine}\n"
            f"for an image {img.shape} with affine\n{img.affine}."
        )
    data = np.asarray(lab.dataobj)
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        raise ValueError(f"{label}: expected integer label values, found non-integer ones.")
    present = sorted(int(v) for v in np.unique(data) if v != 0)
    if label_names is None:
        labels = {f"label_{v}": v for v in present}
    else:
        if isinstance(label_names, str):
            text = label_names.strip()
            if text.startswith("{"):
                label_names = json.loads(text)
            else:
                label_names = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(label_names, Mapping):
            labels = {str(k): int(v) for k, v in label_names.items()}
        else:
            labels = {str(n): i + 1 for i, n in enumerate(label_names)}
        absent, unnamed = sorted(set(labels.values()) - set(present)), sorted(set(present) - set(labels.values()))
        if absent or unnamed:
            raise ValueError(
                f"{label}: expected a name for every label value present ({present}), got names for "
                f"{sorted(labels.values())}"
                + (f"; absent: {absent}" if absent else "")
                + (f"; unnamed: {unnamed}" if unnamed else "")
                + "."
            )
    stem = image.name.split(".nii")[0]
    return Atlas(name or stem, image, label, labels)


# ----------------------------------------------------------------------------------------------------------------------
# Weights: the shipped ones (SHA-256 in the bundle's large_files.yml) or the app's latest fine-tuned ones


@dataclass(frozen=True)
class Weights:
    """A weights file and its expected SHA-256.

    Attributes:
        path: the file (a state dict of the bundle's network).
        sha256: expected hex digest (for the shipped weights, their bundle's large_files.yml entry; ``None`` when
            no digest is recorded).
        kind: ``"shipped"`` or ``"finetuned"``.
        name: the file relative to the bundle (shipped) or to the app's model folder (fine-tuned), shown to clients.
    """

    path: Path
    sha256: str | None
    kind: str
    name: str

    def describe(self) -> dict[str, Any]:
        """Client-facing description (no server path): kind, name, SHA-256 (the recorded one, which the loader
        verified the file against; the file's own only when none is recorded)."""
        from custom_nets.fileio import sha256_file

        return {"kind": self.kind, "file": self.name, "sha256": self.sha256 or sha256_file(self.path)}


class WeightStore:
    """Where the app's detector weights come from, and where fine-tuned ones go.

    The shipped weights are ``<bundle>/models/model.pt`` (checked against ``<bundle>/large_files.yml``). A fine-tuning
    run publishes its weights by writing ``<model_dir>/finetuned.json`` (atomically, after the weights are complete)
    with their path and SHA-256, so readers always see a consistent (file, digest) pair.

    Args:
        bundle_dir: the KeyMorph bundle folder.
        model_dir: the app's working folder (atlas cache, training runs, the fine-tuned weights record).
    """

    def __init__(self, bundle_dir: str | os.PathLike, model_dir: str | os.PathLike) -> None:
        self.bundle_dir, self.model_dir = Path(bundle_dir), Path(model_dir)
        self.record_path = self.model_dir / "finetuned.json"

    @property
    def shipped(self) -> Weights:
        """The bundle's ``models/model.pt`` with the SHA-256 its ``large_files.yml`` records (``None`` if unlisted):
        the digest the loader checks the file against before every registration."""
        from custom_nets.weights import expected_sha256

        path = self.bundle_dir / "models" / "model.pt"
        return Weights(path, expected_sha256(path, self.bundle_dir / "large_files.yml"), "shipped", "models/model.pt")

    def finetuned(self) -> Weights | None:
        """The latest published fine-tuned weights, or ``None``."""
        if not self.record_path.is_file():
            return None
        record = json.loads(self.record_path.read_text())
        rel = str(record["weights"])
        return Weights(self.model_dir / rel, str(record["sha256"]), "finetuned", rel)

    def current(self, use_finetuned: bool = True) -> Weights:
        """The fine-tuned weights when published (and ``use_finetuned``), else the shipped ones."""
        tuned = self.finetuned() if use_finetuned else None
        return tuned if tuned is not None else self.shipped

    def publish(self, weights: str | os.PathLike, info: Mapping[str, Any]) -> Weights:
        """Record ``weights`` (a file under ``model_dir``) as the latest fine-tuned weights, with ``info``."""
        from custom_nets.fileio import sha256_file, write_json

        path = Path(weights).resolve()
        rel = Path(os.path.relpath(path, self.model_dir.resolve()))
        if rel.parts[:1] == ("..",):
            raise ValueError(f"expected fine-tuned weights inside {self.model_dir}, got {path}.")
        digest = sha256_file(path)
        write_json(self.record_path, {**dict(info), "weights": rel.as_posix(), "sha256": digest})
        return Weights(path, digest, "finetuned", rel.as_posix())


def verify_weights(weights: Weights, bundle_dir: str | os.PathLike) -> str:
    """SHA-256 of ``weights``, checked against their recorded digest (for the shipped weights: the bundle's
    ``large_files.yml``).

    Raises:
        custom_nets.weights.WeightsIntegrityError: no recorded digest, or a mismatch.
    """
    from custom_nets.fileio import sha256_file
    from custom_nets.weights import WeightsIntegrityError, expected_sha256

    expected = weights.sha256 or expected_sha256(weights.path, Path(bundle_dir) / "large_files.yml")
    if expected is None:
        raise WeightsIntegrityError(f"{weights.path}: no SHA-256 recorded for these weights; refusing to use them.")
    actual = sha256_file(weights.path)
    if actual != expected.lower():
        raise WeightsIntegrityError(
            f"{weights.path}: SHA-256 {actual} does not match the recorded {expected}; refusing to use them."
        )
    return actual


# ----------------------------------------------------------------------------------------------------------------------
# Registration through configs/inference.json


@dataclass
class RegistrationResult:
    """One registered pair, as the bundle's ``RegistrationWriter`` wrote it.

    Attributes:
        files: ``{"warped", "label_warped" (with a moving label), "itk_transform", "json"}`` -> path (in the output
            folder given to :meth:`BundleRegistration.register`).
        record: the parsed JSON: ``fixed_to_moving_ras`` / ``moving_to_fixed_ras`` (4 x 4, RAS mm),
            ``transform_type``, ``keypoints_fixed_ras_mm`` / ``keypoints_moving_ras_mm`` (K x 3) and
            ``keypoint_weights`` (K), ...
    """

    files: dict[str, str]
    record: dict[str, Any] = field(default_factory=dict)


def _find_item(items: Sequence[Any], target_suffix: str, where: str) -> int:
    """Index of the config item whose ``_target_`` ends with ``target_suffix``."""
    for i, item in enumerate(items):
        if isinstance(item, Mapping) and str(item.get("_target_", "")).endswith(target_suffix):
            return i
    raise KeyError(f"{where}: expected an item with _target_ '...{target_suffix}', found none.")


class BundleRegistration:
    """Register image pairs with the KeyMorph bundle's inference workflow (``configs/inference.json``).

    Each call builds the workflow exactly as ``python -m monai.bundle run inference --config_file
    configs/inference.json --moving M --fixed F [--moving_label L] --output_dir OUT`` does (same config, same
    ``initialize`` step), with ``bundle_root`` set to the bundle folder, and runs it. Weights are loaded by the
    bundle's ``VerifiedCheckpointLoader`` (``weights_only=True``, SHA-256 checked). The bundle's logging config is
    not applied (the caller, e.g. a server, keeps its own logging).

    Args:
        bundle_dir: the bundle folder (``configs/inference.json``, ``models/model.pt``, ``large_files.yml``).
        overrides: config overrides applied to every call (e.g. ``{"orientation_search": False}``).
    """

    def __init__(self, bundle_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_file = self.bundle_dir / "configs" / "inference.json"
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file}: not a KeyMorph bundle (no configs/inference.json).")
        self.overrides = dict(overrides or {})

    def config_value(self, key: str) -> Any:
        """A plain value of the bundle's inference config (e.g. ``orientation_search``), overrides applied."""
        if key in self.overrides:
            return self.overrides[key]
        return json.loads(self.config_file.read_text())[key]

    def register(
        self,
        moving: str | os.PathLike,
        fixed: str | os.PathLike,
        output_dir: str | os.PathLike,
        moving_label: str | os.PathLike | None = None,
        weights: Weights | None = None,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` and write the bundle's outputs to ``output_dir`` (no PNG).

        Args:
            moving, fixed: NIfTI files (any orientation, spacing, field of view).
            output_dir: folder for ``<moving stem>_warped.nii.gz`` (moving resampled onto the fixed grid),
                ``<stem>_label_warped.nii.gz`` (``moving_label`` resampled, nearest neighbour), ``<stem>.json`` and
                ``<stem>.tfm``.
            moving_label: optional label map of the moving image.
            weights: detector weights (default: the bundle's shipped ``models/model.pt``).
            device: torch device.
            overrides: further config overrides for this call (e.g. ``orientation_search=False``).
        """
        from monai.bundle import ConfigWorkflow

        config: dict[str, Any] = {
            "bundle_root": str(self.bundle_dir),
            "moving": str(moving),
            "fixed": str(fixed),
            "moving_label": str(moving_label) if moving_label else None,
            "output_dir": str(output_dir),
            "write_png": False,
            "resume": False,  # a request registers now: never hand back a result of an earlier call
            "num_workers": 0,  # one pair per request: no loader processes forked from the server
            "device": torch.device(device),
            **self.overrides,
            **overrides,
        }
        if weights is not None:
            config["ckpt_path"] = str(weights.path)
        workflow = ConfigWorkflow(
            config_file=str(self.config_file), logging_file=False, workflow_type="infer", run_id="inference", **config
        )
        if weights is not None and weights.sha256:  # the digest to check (large_files.yml lacks fine-tuned ones)
            workflow.parser["checkpoint_loader#sha256"] = weights.sha256
        from custom_nets.weights import WeightsIntegrityError
        from custom_nets.writer import RegistrationWriter

        path_before = list(sys.path)
        try:
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as err:  # MONAI wraps what the workflow raised in "Failed to evaluate ConfigExpression"
            weights_error = _cause(err, WeightsIntegrityError)
            if weights_error is not None:
                raise weights_error from err
            failures = [f for w in self._writers(workflow, RegistrationWriter) for f in getattr(w, "failures", [])]
            if failures:
                raise RegistrationError(
                    "; ".join(
                        f"{Path(str(f.get('moving'))).name} -> {Path(str(f.get('fixed'))).name} "
                        f"({f.get('stage')}): {f.get('error')}"
                        for f in failures
                    ),
                    failures,
                ) from err
            raise
        finally:
            sys.path[:] = path_before  # ConfigWorkflow.run prepends the bundle folder at every call
        writers = self._writers(workflow, RegistrationWriter)
        if len(writers) != 1 or len(writers[0].written) != 1:
            raise RuntimeError(
                f"{self.config_file}: expected one RegistrationWriter that wrote one pair, got "
                f"{[len(w.written) for w in writers]}."
            )
        files = dict(writers[0].written[0])
        return RegistrationResult(files, json.loads(Path(files["json"]).read_text()))

    @staticmethod
    def _writers(workflow: Any, kind: type) -> list[Any]:
        """The config's ``writer`` handler (already instantiated) if it is a ``kind``, as a list."""
        try:
            writer = workflow.parser.get_parsed_content("writer")
        except Exception:  # the run failed before its handlers could be built
            return []
        return [writer] if isinstance(writer, kind) else []


class RegistrationError(RuntimeError):
    """A pair could not be registered (unreadable or unusable image, no valid fit, ...): the bundle's per-pair failure
    records (``moving``, ``fixed``, ``stage``, ``error``) are in :attr:`failures`."""

    def __init__(self, message: str, failures: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.failures = [dict(f) for f in failures]


def _cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in the cause / context chain of ``err`` (itself included)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning through configs/train.json


def finetune_detector(
    bundle_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    init_weights: Weights,
    max_epochs: int = 5,
    epoch_length: int = 50,
    learning_rate: float = 1e-5,
    rotate_deg: float = 45.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune the bundle's detector on unlabelled images: unsupervised pairs, image similarity only.

    Runs the bundle's ``configs/train.json`` (MONAI ``ConfigWorkflow``, as ``python -m monai.bundle run training``)
    with a datalist of ``images`` written to ``output_dir/datalist.json``: each step registers a randomly paired,
    randomly misaligned image pair (rotation up to ``rotate_deg`` per axis, the bundle's scale / shear / translation)
    and minimises the bundle's image loss (mutual information: any contrast) alone, as no labels are needed (the Dice
    term is off). Training starts from ``init_weights`` after checking their SHA-256 (then loaded by MONAI's
    ``CheckpointLoader`` with ``weights_only=True``). The bundle's validation (Dice on labelled pairs) is disabled.
    Final weights: ``output_dir/model.pt`` (a state dict of the network); checkpoints in ``output_dir/checkpoints``.

    Args:
        bundle_dir: the bundle folder.
        images: NIfTI images (at least 2; any orientation and spacing).
        output_dir: run folder (created).
        init_weights: weights to start from (shipped or fine-tuned), with their digest.
        max_epochs, epoch_length: epochs and steps (pairs) per epoch.
        learning_rate: Adam learning rate.
        rotate_deg: maximum augmentation rotation per axis (degrees); the shipped detector was trained at 45.
        device: torch device.
        seed: random seed of the run.

    Returns:
        Statistics: iterations, epochs, final loss, seconds, images, the initial and final weights' SHA-256.
    """
    from monai.bundle import ConfigWorkflow

    from custom_nets.fileio import sha256_file, write_json

    bundle = Path(bundle_dir).resolve()
    paths = [str(Path(p).resolve()) for p in images]
    if len(paths) < 2:
        raise ValueError(f"fine-tuning needs at least 2 images to pair, got {len(paths)}.")
    init_sha256 = verify_weights(init_weights, bundle)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datalist = write_json(out / "datalist.json", {"training": [{"image": p, "subject": Path(p).name} for p in paths]})
    config_file = bundle / "configs" / "train.json"
    workflow = ConfigWorkflow(
        config_file=str(config_file),
        logging_file=False,
        workflow_type="train",
        run_id="training",
        bundle_root=str(bundle),
        output_dir=str(out),
        datalist=str(datalist),
        init_weights=str(init_weights.path),
        max_epochs=int(max_epochs),
        learning_rate=float(learning_rate),
        seed=int(seed),
        device=torch.device(device),
        ramp_epochs=0,
        **{"train#epoch_length": int(epoch_length), "loss_weights#dice": 0.0, "augment#rotate_deg": float(rotate_deg)},
    )
    # validation is Dice on labelled pairs with a known transform: unlabelled clinical images have neither. The
    # handler is removed, not disabled: MONAI still instantiates what a disabled item refers to (the validator).
    handlers = list(workflow.parser["train#handlers"])
    del handlers[_find_item(handlers, "ValidationHandler", f"{config_file} train#handlers")]
    workflow.parser["train#handlers"] = handlers
    start = time.time()
    path_before = list(sys.path)
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    finally:
        sys.path[:] = path_before
    trainer = workflow.parser.get_parsed_content("train#trainer")
    final = out / "model.pt"
    if not final.is_file():
        raise RuntimeError(f"{config_file}: training finished without writing {final}.")
    loss = trainer.state.output.get("loss") if isinstance(trainer.state.output, Mapping) else None
    return {
        "iterations": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "final_loss": float(loss.detach()) if isinstance(loss, torch.Tensor) else loss,
        "seconds": round(time.time() - start, 1),
        "images": len(paths),
        "init_weights": init_weights.kind,
        "init_sha256": init_sha256,
        "sha256": sha256_file(final),
    }
