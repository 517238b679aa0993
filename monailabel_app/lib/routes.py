"""The app's own versions of MONAI Label's infer and train routes: checked requests, and an event loop that stays free.

MONAI Label 0.8.5 runs ``POST /infer/{model}`` inside the server's event loop: while one registration runs, no other
request (not even ``GET /info/`` or ``DELETE /train/``) is answered. ``POST /train/{model}?run_sync=true`` runs a whole
training run there. Bad ``params`` (not JSON, a list, an unknown device or logging level) end in a bare HTTP 500, and
training options are checked only in the training process, after it has been started.

:func:`install_routes` puts routes in front of the stock ones (same paths, same parameters, same role checks) that:

* parse and check ``params`` first (HTTP 400 naming the problem), refuse uploads the app does not use (``file``:
  images come from the datastore or a session; ``label``) before anything is written, and answer 404 for an unknown
  model;
* run the inference itself in a worker thread, at most ``infer_workers`` at a time (further requests wait without
  blocking the server);
* refuse ``run_sync`` training (training runs as a background process; poll ``GET /train/``) and check the training
  options against the trainer's ranges (HTTP 422 naming the option and its range) before the process starts;
* answer unexpected errors with a message that shows no server path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.responses import FileResponse
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints import batch_infer as stock_batch
from monailabel.endpoints import datastore as stock_datastore
from monailabel.endpoints import infer as stock_infer
from monailabel.endpoints import scoring as stock_scoring
from monailabel.endpoints import session as stock_session
from monailabel.endpoints import train as stock_train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool

from lib.guard import check_name, upload_suffix

logger = logging.getLogger(__name__)

__all__ = ["check_device", "install_routes", "parse_params", "redact"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Infer params refused: ``skip_writer`` returns MONAI Label's data dict (server paths) and leaves the result file.
_REFUSED_PARAMS = ("skip_writer",)
#: Request keys never passed to a background process: MONAI Label adds ``bundle_path`` to the child's PYTHONPATH.
_BACKGROUND_DROP = ("bundle_path",)
# FastAPI parameter declarations (module-level, as the route signatures use them as defaults)
_PARAMS_FORM = Form("{}")
# (one FastAPI field object per parameter name: a field object shared by two names takes one of them)
_NO_FILE = File(None)
_NO_LABEL = File(None)
_FILE = File(...)
_LABEL = File(...)
_FILES = File(...)
_AS_USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
_AS_ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
_AS_ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


def redact(text: str, folders: dict[str, str]) -> str:
    """``text`` with every server folder of ``folders`` (``{placeholder: path}``) replaced by its placeholder; the
    longest paths first, so a folder inside another keeps its own name."""
    pairs = []
    for name, folder in folders.items():
        if folder:
            pairs += [(os.path.realpath(folder), name), (os.path.abspath(folder), name)]
    for path, name in sorted(set(pairs), key=lambda p: -len(p[0])):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def check_device(value: Any, what: str = "device") -> None:
    """Accept a torch device name this server has (``cpu``, ``cuda``, ``cuda:N``) or a name of MONAI Label's device
    list (GPU names), alone or as a list; else ``ValueError`` naming the option and what is available."""
    from monailabel.utils.others.generic import device_list

    known = device_list()
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, str) and v in known:
            continue
        ok = False
        if isinstance(v, str):
            try:
                dev = torch.device(v)
                ok = dev.type == "cpu" or (
                    dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
                )
            except (RuntimeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"{what}: expected one of cpu, cuda[:N] (when present) or {known}, got {v!r}.")


def parse_params(params: str | None) -> dict[str, Any]:
    """The infer ``params`` form field as a dict, checked; HTTP 400 for text that is not a JSON object, a bad
    ``device`` or ``logging`` level."""
    parsed = _json_object(params, "params")
    if "device" in parsed:
        try:
            check_device(parsed["device"], "params device")
        except ValueError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
    for key in _REFUSED_PARAMS:
        if key in parsed:
            raise HTTPException(status_code=400, detail=f"params {key}: not accepted by this server.")
    level = parsed.get("logging")
    if level is not None and (not isinstance(level, str) or level.upper() not in _LOG_LEVELS):
        raise HTTPException(status_code=400, detail=f"params logging: expected one of {_LOG_LEVELS}, got {level!r}.")
    return parsed


def _server_folders() -> dict[str, str]:
    instance = app_instance()
    folders = {"<studies>": getattr(instance, "studies", ""), "<tmp>": tempfile.gettempdir()}
    for name, attr in (("<model_dir>", "model_dir"), ("<bundle>", "bundle_dir"), ("<app>", "app_dir")):
        value = getattr(instance, attr, None)
        if value:
            folders[name] = str(value)
    sessions = instance.sessions()
    if sessions is not None:
        folders["<sessions>"] = sessions.store_path
    folders["<home>"] = os.path.expanduser("~")
    return folders


def _safe_call(what: str, call: Callable[[], Any]) -> Any:
    """Run ``call``; HTTP errors keep their status with server paths redacted, MONAI Label's input errors become
    400, anything else a 500 that names ``what`` and no path (the server log has the traceback)."""
    try:
        return call()
    except HTTPException as err:
        if isinstance(err.detail, str):
            err.detail = redact(err.detail, _server_folders())
        raise
    except MONAILabelException as err:
        raise HTTPException(status_code=400, detail=redact(str(err.msg), _server_folders())) from err
    except Exception as err:
        logger.exception("%s failed", what)
        message = redact(f"{type(err).__name__}: {err}", _server_folders())
        raise HTTPException(status_code=500, detail=f"{what} failed: {message} (the server log has details).") from err


def install_routes(fastapi_app: Any, infer_workers: int = 1) -> None:
    """Put the app's infer and train routes in front of MONAI Label's (see the module doc).

    Args:
        fastapi_app: MONAI Label's FastAPI application (``monailabel.app.app``).
        infer_workers: registrations that may run at the same time (each in its own worker thread).
    """
    if getattr(fastapi_app.state, "keymorph_routes", False):
        return
    slots = asyncio.Semaphore(max(1, int(infer_workers)))
    router = APIRouter()

    @router.post("/infer/{model}", summary=f"{RBAC_USER}Run Inference for supported model")
    async def api_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = _PARAMS_FORM,
        file: UploadFile = _NO_FILE,
        label: UploadFile = _NO_LABEL,
        output: stock_infer.ResultType | None = None,
        user: User = _AS_USER,
    ):
        if file:
            raise HTTPException(
                status_code=403,
                detail="uploads are not registered directly: add the image to the datastore (PUT /datastore/image) "
                "or open a session (PUT /session/) and pass its id.",
            )
        if label:
            raise HTTPException(status_code=400, detail="label: the KeyMorph tasks take no input label.")
        parsed = parse_params(params)
        if model not in app_instance().info().get("models", {}):
            raise HTTPException(status_code=404, detail=f"no model {model!r}; GET /info/ lists the models.")
        async with slots:
            return await run_in_threadpool(
                _safe_call,
                f"inference ({model})",
                lambda: stock_infer.run_inference(
                    background_tasks, model, image, session_id, json.dumps(parsed), None, None, output
                ),
            )

    def check_training(model: str, options: dict[str, Any]) -> None:
        trainer = app_instance()._trainers.get(model)
        check = getattr(trainer, "check_options", None)
        if check is not None:
            try:
                check(options, strict=True)
            except ValueError as err:
                raise HTTPException(status_code=422, detail=f"train {model}: {err}") from err

    def refuse_sync(run_sync: bool | None) -> None:
        if run_sync:
            raise HTTPException(
                status_code=400,
                detail="run_sync: training runs as a background process only; start it without run_sync and poll "
                "GET /train/.",
            )

    @router.post("/train/{model}", summary=f"{RBAC_ADMIN} Run Training Task for specific model")
    async def api_run_model(
        model: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        enqueue: bool | None = False,
        user: User = _AS_ADMIN,
    ):
        refuse_sync(run_sync)
        if model not in app_instance().info().get("trainers", {}):
            raise HTTPException(status_code=404, detail=f"no trainer {model!r}; GET /info/ lists the trainers.")
        check_training(model, params or {})
        return _safe_call(f"training ({model})", lambda: stock_train.run_model(model, params, False, enqueue))

    @router.post("/train/", summary=f"{RBAC_ADMIN}Run All Training Tasks", include_in_schema=False, deprecated=True)
    async def api_run(
        params: dict | None = None,
        run_sync: bool | None = False,
        user: User = _AS_ADMIN,
    ):
        refuse_sync(run_sync)
        params = params or {}
        trainers = list(app_instance().info().get("trainers", {}))
        top = {k: v for k, v in params.items() if k not in trainers}
        for model in trainers:  # MONAI Label merges the model's own options and then the top-level ones
            own = params.get(model) if isinstance(params.get(model), dict) else {}
            check_training(model, {**own, **top})
        return _safe_call("training", lambda: stock_train.run(params, False))

    @router.post("/batch/infer/{model}", summary=f"{RBAC_ADMIN}Run Batch Inference Task")
    async def api_batch_infer(
        model: str,
        images: stock_batch.BatchInferImageType | None = stock_batch.BatchInferImageType.IMAGES_ALL,
        params: dict | None = None,
        run_sync: bool | None = False,
        user: User = _AS_ADMIN,
    ):
        refuse_sync(run_sync)
        if params is not None:
            parse_params(json.dumps(params))
        return _safe_call("batch inference", lambda: stock_batch.run(model, images, params, False))

    @router.post("/scoring/", summary=f"{RBAC_ANNOTATOR}Run All Scoring Tasks", include_in_schema=False)
    async def api_scoring(params: dict | None = None, run_sync: bool | None = False, user: User = _AS_ANNOTATOR):
        refuse_sync(run_sync)
        return _safe_call("scoring", lambda: stock_scoring.run(params, False))

    @router.post("/scoring/{method}", summary=f"{RBAC_ANNOTATOR}Run Scoring Task for specific method")
    async def api_scoring_method(
        method: str, params: dict | None = None, run_sync: bool | None = False, user: User = _AS_ANNOTATOR
    ):
        refuse_sync(run_sync)
        return _safe_call("scoring", lambda: stock_scoring.run_method(method, params, False))

    @router.put("/model/{model}", summary="Refused: the app manages its weights", include_in_schema=False)
    @router.delete("/model/{model}", summary="Refused: the app manages its weights", include_in_schema=False)
    async def api_model_files(model: str, user: User = _AS_ADMIN):
        raise HTTPException(
            status_code=403,
            detail="model files are the app's (shipped, SHA-256 checked, or published by fine-tuning); "
            "fine-tune with POST /train/keymorph.",
        )

    @router.post("/infer/wsi/{model}", include_in_schema=False)
    @router.post("/infer/wsi_v2/{model}", include_in_schema=False)
    async def api_wsi(model: str, user: User = _AS_USER):
        raise HTTPException(status_code=404, detail="no whole-slide models: this app registers 3D brain MRI.")

    @router.put("/datastore/image", summary=f"{RBAC_ANNOTATOR}Upload new Image")
    async def api_add_image(
        background_tasks: BackgroundTasks,
        image: str | None = None,
        params: str = _PARAMS_FORM,
        file: UploadFile = _FILE,
        user: User = _AS_ANNOTATOR,
    ):
        info = _json_object(params, "params")
        if image is not None:
            check_name(image, "image id")
        upload_suffix(file.filename or "", "file")
        return _safe_call(
            "image upload",
            lambda: stock_datastore.add_image(background_tasks, image, json.dumps(info), file, user.username),
        )

    @router.put("/datastore/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label")
    async def api_save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = _PARAMS_FORM,
        tag: str = DefaultLabelTag.FINAL.value,
        label: UploadFile = _LABEL,
        user: User = _AS_ANNOTATOR,
    ):
        info = _json_object(params, "params")
        check_name(image, "image id")
        check_name(tag or DefaultLabelTag.FINAL.value, "label tag")
        upload_suffix(label.filename or "", "label")
        return _safe_call(
            "label upload",
            lambda: stock_datastore.save_label(background_tasks, image, json.dumps(info), tag, label, user.username),
        )

    @router.get("/datastore/dataset", summary=f"{RBAC_ANNOTATOR}Download full dataset as ZIP archive")
    async def api_download_dataset(
        background_tasks: BackgroundTasks, limit_cases: int | None = None, user: User = _AS_ANNOTATOR
    ):
        def archive() -> str:
            try:
                return app_instance().datastore().get_dataset_archive(limit_cases)
            except AssertionError as err:  # MONAI Label's way of saying "nothing to include"
                raise HTTPException(status_code=404, detail="no labelled images to archive.") from err

        path = await run_in_threadpool(_safe_call, "dataset archive", archive)
        background_tasks.add_task(os.remove, path)
        return FileResponse(path, media_type="application/zip", filename="dataset.zip")

    @router.put("/session/", summary=f"{RBAC_USER}Create new session with Image")
    async def api_create_session(
        background_tasks: BackgroundTasks,
        uncompress: bool = False,
        expiry: int = 0,
        files: list[UploadFile] = _FILES,
        user: User = _AS_USER,
    ):
        for f in files:
            if f.filename:
                check_name(os.path.basename(f.filename.replace("\\", "/")), "uploaded file name")
        return await run_in_threadpool(
            _safe_call,
            "session upload",
            lambda: stock_session.create_session(background_tasks, uncompress, expiry, files),
        )

    before = list(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = [r for r in fastapi_app.router.routes if not any(r is b for b in before)]
    fastapi_app.router.routes[:] = added + before  # the first matching route serves a request: ours come first
    fastapi_app.openapi_schema = None
    _drop_background_keys()
    fastapi_app.state.keymorph_routes = True
    logger.info("KeyMorph routes: infer in worker threads (%d at a time), checked train options", infer_workers)


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise HTTPException(
            status_code=400, detail=f"{what}: expected a JSON object, got text that is not JSON."
        ) from err
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{what}: expected a JSON object, got {type(value).__name__}.")
    return value


def _drop_background_keys() -> None:
    """Make MONAI Label's background tasks (training, batch inference, scoring) drop request keys that change how the
    child process starts (``bundle_path`` goes onto its PYTHONPATH: a client could make it import an uploaded file)
    and accept ``gpus`` only as ``all`` or a list of GPU indices."""
    from monailabel.utils.async_tasks import task as async_task

    stock = async_task.run_background_task
    if getattr(stock, "keymorph_safe", False):
        return

    def run_background_task(request: dict[str, Any], method: str, *args: Any, **kwargs: Any) -> Any:
        for key in _BACKGROUND_DROP:
            if request.pop(key, None) is not None:
                logger.warning("%s request: dropped %r (not accepted from clients)", method, key)
        gpus = str(request.get("gpus", "all") or "all")
        if gpus != "all" and not all(part.strip().isdigit() for part in gpus.split(",")):
            raise HTTPException(
                status_code=400, detail=f"gpus: expected 'all' or GPU indices like '0,1', got {gpus!r}."
            )
        return stock(request, method, *args, **kwargs)

    run_background_task.keymorph_safe = True  # type: ignore[attr-defined]
    async_task.run_background_task = run_background_task
