"""The KeyMorph MONAI Label app: atlas-based segmentation, alignment to an atlas, and detector fine-tuning.

Start it (from the repository root, in the ``label`` venv: ``make label-install``)::

    .venv-label/bin/monailabel start_server --app monailabel_app --studies <folder of NIfTI images> \\
        --host 127.0.0.1 --port 8000

Models served (``GET /info``):

* ``keymorph_atlas_seg`` (segmentation): the atlas labels propagated into the image (see
  :class:`lib.infers.AtlasSegmentation`);
* ``keymorph_align`` (others): the image resampled into the atlas space (:class:`lib.infers.AlignToAtlas`);
* trainer ``keymorph``: unsupervised fine-tuning of the detector on the datastore images
  (:class:`lib.trainers.KeyMorphFineTune`).

``--conf`` options (all optional):

========================  ===========================================================================================
``bundle``                the KeyMorph bundle folder (default: ``../bundle`` next to the app, this repository's)
``model_dir``             the app's working folder: atlas cache, training runs, fine-tuned weights record
                          (default ``<app>/model/keymorph``)
``atlas_image``           an atlas image (NIfTI) to use instead of the default MNI ICBM152 2009a T1 ...
``atlas_label``           ... and its label map on the same grid (both or neither)
``atlas_labels``          names of the atlas label values: ``{"name": value}`` JSON or ``name1,name2,...`` (values 1..N)
``atlas_name``            the atlas' name shown to clients
``orientation_search``    default of the infer option (``true`` / ``false``; default: the bundle's, ``true``)
``use_finetuned``         infer with the latest fine-tuned weights once a training run published some (default true)
``skip_trainers``         do not offer the train task (default false)
``infer_workers``         registrations that may run at the same time, each in a worker thread (default 1); the
                          server keeps answering other requests while they run
``train_memory_gb``       address-space limit of a training process on the CPU, in GB (default: 75 % of the RAM)
========================  ===========================================================================================

The ``monailabel`` launcher passes its arguments on unquoted: a value with a space is split and refused; start with
``python -m monailabel.main start_server ...`` to keep it whole.

Inference only reads images of the datastore (by id, or a file inside the studies folder or a MONAI Label session):
a request naming any other file on the server is refused with HTTP 403, an unknown id with 404. Nothing is read,
written or deleted outside the studies folder and the session folder: the datastore and the session store are the
app's own (:mod:`lib.guard`), and the infer and train routes are the app's own (:mod:`lib.routes`: checked
parameters, inference in worker threads, no ``run_sync`` training).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lib.guard import ConfinedDatastore, ConfinedSessions, is_within
from lib.infers import AlignToAtlas, AtlasSegmentation, BrainExtraction
from lib.registration import Atlas, BundleRegistration, WeightStore, build_mni_atlas, load_atlas, parse_bool
from lib.routes import install_routes
from lib.trainers import KeyMorphFineTune
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import custom_nets

logger = logging.getLogger(__name__)


def _positive(conf: dict[str, str], key: str, default: float, kind: type = float) -> float:
    raw = conf.get(key)
    try:
        value = kind(raw) if raw is not None else default
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"--conf {key}: expected a positive {kind.__name__}, got {raw!r}.")
    return value


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


class KeyMorphApp(MONAILabelApp):
    """MONAI Label app serving KeyMorph registration as atlas segmentation and atlas alignment (see module doc)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.bundle_dir = Path(conf.get("bundle") or Path(app_dir).parent / "bundle").expanduser().resolve()
        for required in ("configs/inference.json", "configs/train.json", "models/model.pt"):
            if not (self.bundle_dir / required).is_file():
                raise FileNotFoundError(
                    f"{self.bundle_dir}: expected the KeyMorph bundle (with {required}); set --conf bundle <folder>."
                )
        self.model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model" / "keymorph").expanduser().resolve()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.atlas = self._atlas(conf)
        self.registration = BundleRegistration(self.bundle_dir)
        search = conf.get("orientation_search")
        self.orientation_search = (
            parse_bool(search, "--conf orientation_search")
            if search is not None
            else bool(self.registration.config_value("orientation_search"))
        )
        self.use_finetuned = parse_bool(conf.get("use_finetuned", "true"), "--conf use_finetuned")
        self.weights = WeightStore(self.bundle_dir, self.model_dir)
        self.infer_workers = int(_positive(conf, "infer_workers", 1, int))
        self.train_memory_gb = _positive(conf, "train_memory_gb", round(0.75 * _ram_gb(), 1))
        logger.info(
            "KeyMorph app: bundle %s, model folder %s, atlas %s, orientation search %s",
            self.bundle_dir,
            self.model_dir,
            self.atlas.info(),
            self.orientation_search,
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="KeyMorph brain MRI registration",
            description="Atlas-based segmentation and atlas alignment of brain MRI by KeyMorph keypoint registration",
            version=custom_nets.__version__,
            labels=dict(self.atlas.labels),
        )

    def _atlas(self, conf: dict[str, str]) -> Atlas:
        image, label = conf.get("atlas_image"), conf.get("atlas_label")
        if bool(image) != bool(label):
            raise ValueError(
                f"give both --conf atlas_image and --conf atlas_label, got image={image!r}, label={label!r}."
            )
        if image:
            return load_atlas(image, label, conf.get("atlas_labels"), conf.get("atlas_name"))
        return build_mni_atlas(self.model_dir / "atlas")

    def init_infers(self) -> dict[str, InferTask]:
        common: dict[str, Any] = {"orientation_search": self.orientation_search, "use_finetuned": self.use_finetuned}
        return {
            "keymorph_atlas_seg": AtlasSegmentation(self.registration, self.weights, self.atlas, **common),
            "keymorph_align": AlignToAtlas(self.registration, self.weights, self.atlas, **common),
            "keymorph_brain_mask": BrainExtraction(self.bundle_dir / "models" / "brain_extractor.pt"),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        if parse_bool(self.conf.get("skip_trainers", "false"), "--conf skip_trainers"):
            return {}
        return {"keymorph": KeyMorphFineTune(self.weights, memory_limit_gb=self.train_memory_gb)}

    def init_datastore(self) -> Datastore:
        """The studies folder as a :class:`lib.guard.ConfinedDatastore` (a remote datastore as MONAI Label makes it)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return ConfinedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _load_sessions(self, load: bool = False) -> ConfinedSessions | None:
        if not load:
            return None
        return ConfinedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def server_mode(self, mode: bool) -> None:
        """Called once the server starts: put the app's infer and train routes before MONAI Label's."""
        super().server_mode(mode)
        if mode:
            from monailabel.app import app as fastapi_app

            install_routes(fastapi_app, self.infer_workers)

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["atlas"] = self.atlas.info()
        return out

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Run an infer task on a datastore image; refuse any other file.

        MONAI Label itself accepts, as ``image``, any path that exists on the server. Here ``image`` must be an id of
        the datastore, or a file inside the studies folder or inside a MONAI Label session (images clients upload).

        Raises:
            fastapi.HTTPException: 403 for a file outside those folders, 404 for an unknown id.
        """
        image = request.get("image")
        store = datastore if datastore is not None else self.datastore()
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail=f"expected a datastore image id as 'image', got {image!r}.")
        known_id = False
        try:
            known_id = bool(store.get_image_uri(image))
        except Exception:  # remote datastores raise for unknown ids
            known_id = False
        if known_id:
            if os.path.exists(image):  # an id that is also a path here: make MONAI Label use the datastore's file
                request = {**request, "image": store.get_image_uri(image)}
        elif os.path.exists(image):
            allowed = [] if self.studies.startswith(("http://", "https://")) else [self.studies]
            sessions = self.sessions()
            if sessions is not None:
                allowed.append(sessions.store_path)
            if not any(is_within(image, folder) for folder in allowed):
                logger.warning("refused an infer request for %s: outside the datastore", image)
                raise HTTPException(
                    status_code=403,
                    detail=f"image {image!r} is not in the datastore; expected a datastore image id "
                    "(GET /datastore/?output=all lists them) or an uploaded session image.",
                )
        else:
            raise HTTPException(
                status_code=404, detail=f"no image {image!r} in the datastore; expected a datastore image id."
            )
        return super().infer(request, datastore)
