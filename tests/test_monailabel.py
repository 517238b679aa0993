"""The MONAI Label app (``monailabel_app/``) served by a real ``monailabel start_server`` and called over HTTP.

The server runs from the ``label`` venv (``make label-install``; ``make test`` creates it and passes its path in
``KEYMORPH_LABEL_VENV``) on 127.0.0.1 with a free port, over a studies folder of demo images; it is always stopped
(its whole process group, which includes training subprocesses). Checks: ``/info``; the atlas segmentation against the
known tissue labels (Dice, next to the Dice the true transform gives) and against ``python -m monai.bundle run
inference`` on the same pair (same matrix, same label map); the alignment to the atlas; refusal of files outside the
datastore; session images (uploads) and the errors an unusable image gets; a short fine-tuning run that starts from the
shipped weights and is then used by inference; and MONAI Label's stock ``monaibundle`` app loading the bundle from a
local folder. The app's library (atlas, weights) is also tested directly, without a server.

Speed: the server runs with ``--conf orientation_search false`` (the bundle's default is true: 24 detector passes,
about 9 s per request on 2 idle CPU cores instead of 5.5 s, and far more on cores the rest of the suite keeps busy).
The demo subjects are posed within 10 degrees and the rotated test image by 45 degrees, inside the range the shipped
detector handles without the search.
"""

from __future__ import annotations

import email
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets import ConvNetDetector, resample
from custom_nets.data import write_demo_data
from custom_nets.handlers import expected_sha256

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
BUNDLE = ROOT / "bundle"
ATLAS_STEM = "mni152_2009a_tissue"
SUBJECT = "sub-02_T1"  # test subject of the demo set: its labels are the truth
ROTATED = "pair-00_sub-02_T2"  # the same subject posed by 45 degrees about an oblique axis, T2 contrast
STUDIES = [SUBJECT, ROTATED, "sub-00_T2", "sub-01_PD"]
LINK_OUT = "evil"  # a symlink in the studies folder pointing outside it


# ----------------------------------------------------------------------------------------------------------------------
# server and HTTP helpers


def _label_venv() -> Path:
    """The venv with monailabel: ``$KEYMORPH_LABEL_VENV`` (set by ``make test``; missing -> failure), else
    ``.venv-label`` if it exists, else the module is skipped with the reason."""
    env = os.environ.get("KEYMORPH_LABEL_VENV")
    venv = Path(env) if env else ROOT / ".venv-label"
    if not (venv / "bin" / "monailabel").is_file():
        message = (
            f"no MONAI Label venv at {venv} (expected {venv / 'bin' / 'monailabel'}); create it with "
            "`make label-install`"
        )
        if env:
            pytest.fail(f"KEYMORPH_LABEL_VENV is set but {message}.")
        pytest.skip(f"{message}, or run the suite with `make test` (KEYMORPH_LABEL_VENV unset).")
    return venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 600):
    """``(status, headers, body)`` of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def http_json(method: str, url: str, payload: dict | None = None, timeout: float = 600):
    body = json.dumps(payload).encode() if payload is not None else None
    status, _, data = http(method, url, body, {"Content-Type": "application/json"} if body else None, timeout)
    return status, json.loads(data) if data else None


def multipart_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The named parts of a ``multipart/form-data`` response (MONAI Label's ``output=all``: params + image)."""
    msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert msg.is_multipart(), content_type
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in msg.walk()}


def multipart_body(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """Encode ``{name: (file name or None, content)}`` as multipart/form-data; returns body and content type."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, (filename, content) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """``monailabel start_server`` as a subprocess in its own process group, on 127.0.0.1 and a free port."""

    def __init__(
        self, venv: Path, app: Path, studies: Path, conf: dict[str, str], log: Path, cwd: Path, module: bool = False
    ) -> None:
        """``module``: start with ``python -m monailabel.main`` instead of the ``monailabel`` launcher (which splits
        values at spaces)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.tmp = log.parent / f"{log.stem}_tmp"
        self.tmp.mkdir(exist_ok=True)
        launcher = (
            [str(venv / "bin" / "python"), "-m", "monailabel.main"] if module else [str(venv / "bin" / "monailabel")]
        )
        cmd = [*launcher, "start_server", "--app", str(app), "--studies", str(studies)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            cmd += ["--conf", key, value]
        env = dict(os.environ)
        env.update(
            PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            MONAILABEL_PYEXE=str(venv / "bin" / "python"),  # the monailabel launcher runs `python` from PATH
            MONAI_LABEL_SESSION_PATH=str(cwd / "sessions"),
            TMPDIR=str(self.tmp),  # the server's temporary files, checked for leftovers
            PYTHONWARNINGS="ignore",
        )
        env.pop("PYTHONPATH", None)
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if http("GET", f"{self.url}/info/", timeout=10)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"monailabel start_server not ready after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        """Stop the server and everything it started (same process group); SIGKILL if SIGTERM is not enough."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
        try:  # children (a training run) may outlive the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


# ----------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def venv() -> Path:
    return _label_venv()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("monailabel")


@pytest.fixture(scope="module")
def demo(work) -> Path:
    """3 synthetic subjects at 2 mm, and one test image posed by 45 degrees (the truth is in datalist.json)."""
    return write_demo_data(work / "demo", num_subjects=3, pixdim=2.0, test_angles=(45,), progress=False).parent


@pytest.fixture(scope="module")
def studies(work, demo) -> Path:
    """The datastore: images only (MONAI Label would list label files as images too)."""
    folder = work / "studies"
    folder.mkdir()
    for name in STUDIES:
        shutil.copy(demo / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    # a link in the studies folder to a file outside it: must be neither listed, read nor deleted (with its target)
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"not for clients")
    (folder / f"{LINK_OUT}.nii.gz").symlink_to(outside / "secret.nii.gz")
    return folder


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    return work / "model"


@pytest.fixture(scope="module")
def server(venv, studies, model_dir, work):
    srv = Server(
        venv,
        APP,
        studies,
        {"model_dir": str(model_dir), "orientation_search": "false"},
        work / "server.log",
        work,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------------------------------
# truth


def _truth_world_from_template(demo: Path, image: str) -> np.ndarray:
    """Template (MNI mm) -> image world (mm) of a demo image, 4 x 4."""
    datalist = json.loads((demo / "datalist.json").read_text())
    entries = {e["image"]: e for split in ("training", "validation", "test") for e in datalist[split]}
    if f"{image}.nii.gz" in entries:
        return np.asarray(entries[f"{image}.nii.gz"]["world_from_template"])
    pair = next(p for p in datalist["test_pairs"] if p["moving_image"] == f"{image}.nii.gz")
    fixed = np.asarray(entries[pair["fixed_image"]]["world_from_template"])
    return np.asarray(pair["fixed_to_moving_ras"]) @ fixed  # fixed world -> moving world, after template -> fixed


def _label_of(demo: Path, image: str) -> Path:
    return demo / f"{image.rsplit('_', 1)[0]}_label.nii.gz"


def _dice(a: np.ndarray, b: np.ndarray, values=(1, 2, 3)) -> list[float]:
    return [float(2 * ((a == v) & (b == v)).sum() / max(1, (a == v).sum() + (b == v).sum())) for v in values]


def _atlas_labels_through(
    model_dir: Path, like: nib.Nifti1Image, subject_to_atlas: np.ndarray, label_file: Path | None = None
) -> np.ndarray:
    """The atlas labels (``label_file``, default the MNI atlas the app wrote to ``model_dir``) resampled (nearest) onto
    the grid of ``like`` through a subject -> atlas world matrix."""
    atlas = nib.load(str(label_file or model_dir / "atlas" / f"{ATLAS_STEM}_label.nii.gz"))
    lab = torch.as_tensor(np.asarray(atlas.dataobj, dtype=np.float32))[None, None]
    out = resample(
        lab,
        torch.as_tensor(subject_to_atlas, dtype=torch.float64)[None],
        like.shape,
        torch.as_tensor(like.affine),
        torch.as_tensor(atlas.affine),
        mode="nearest",
    )
    return out[0, 0].numpy()


def _mean_error_mm(points_world: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ph = np.c_[points_world, np.ones(len(points_world))]
    return float(np.linalg.norm((ph @ a.T - ph @ b.T)[:, :3], axis=1).mean())


def _brain_points(label_file: Path) -> np.ndarray:
    img = nib.load(str(label_file))
    vox = np.argwhere(np.asarray(img.dataobj) > 0)[::7].astype(np.float64)
    return vox @ img.affine[:3, :3].T + img.affine[:3, 3]


def _wait_task(url: str, route: str, timeout: float = 600) -> dict:
    """Poll ``GET <route>`` (``/train/``, ``/scoring/``) until the task is DONE or ERROR (or ``timeout`` s); the last
    status record."""
    deadline = time.time() + timeout
    task: dict = {}
    while time.time() < deadline:
        _, task = http_json("GET", f"{url}{route}")
        if task and task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(1)
    return task


def _infer(server: Server, model: str, image: str, output: str = "all") -> tuple[int, dict, bytes]:
    q = urllib.parse.urlencode({"image": image, "output": output})
    return http("POST", f"{server.url}/infer/{model}?{q}")


# ----------------------------------------------------------------------------------------------------------------------
# the app's library without a server (lib/registration.py imports no MONAI Label: it runs in this venv)


@pytest.fixture(scope="module")
def registration_lib():
    spec = importlib.util.spec_from_file_location("keymorph_label_registration", APP / "lib" / "registration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_parse_bool(registration_lib):
    for value, expected in ((True, True), ("false", False), ("Yes", True), (0, False), ("1", True)):
        assert registration_lib.parse_bool(value, "x") is expected
    with pytest.raises(ValueError, match="x: expected a boolean"):
        registration_lib.parse_bool("maybe", "x")


def test_user_atlas_is_checked_and_named(registration_lib, tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image, label, other = tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz", tmp_path / "b_label.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), affine), str(image))
    lab = np.zeros((8, 9, 10), np.uint8)
    lab[2:4], lab[5:7] = 1, 3
    nib.save(nib.Nifti1Image(lab, affine), str(label))
    nib.save(nib.Nifti1Image(lab[:, :, :9], affine), str(other))
    atlas = registration_lib.load_atlas(image, label)
    assert atlas.name == "a" and atlas.labels == {"label_1": 1, "label_3": 3}
    assert registration_lib.load_atlas(image, label, '{"csf": 1, "wm": 3}', "mine").labels == {"csf": 1, "wm": 3}
    with pytest.raises(ValueError, match=r"absent: \[2\]"):
        registration_lib.load_atlas(image, label, "x, y, z")  # names for 1, 2, 3; the map has 1 and 3
    with pytest.raises(ValueError, match=r"unnamed: \[3\]"):
        registration_lib.load_atlas(image, label, {"x": 1})
    with pytest.raises(ValueError, match="on the image's grid"):
        registration_lib.load_atlas(image, other)
    with pytest.raises(FileNotFoundError, match="no such atlas label file"):
        registration_lib.load_atlas(image, tmp_path / "missing.nii.gz")


def test_weight_store_publishes_verified_weights(registration_lib, tmp_path):
    from custom_nets.handlers import WeightsIntegrityError

    store = registration_lib.WeightStore(BUNDLE, tmp_path / "model")
    assert store.current().kind == "shipped" and store.finetuned() is None
    recorded = expected_sha256(BUNDLE / "models/model.pt", BUNDLE / "large_files.yml")
    assert store.shipped.sha256 == recorded  # described per request without hashing the file again
    assert registration_lib.verify_weights(store.shipped, BUNDLE) == recorded
    copy = tmp_path / "bundle"  # shipped weights changed on disk: the recorded digest refuses them
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("runs", "eval", "*.ts"))
    (copy / "models" / "model.pt").write_bytes(b"changed")
    with pytest.raises(WeightsIntegrityError, match="does not match"):
        registration_lib.verify_weights(registration_lib.WeightStore(copy, tmp_path / "model").shipped, copy)
    run = tmp_path / "model" / "train" / "r1"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    published = store.publish(run / "model.pt", {"iterations": 3})
    current = store.current()
    assert current.kind == "finetuned" and current.name == "train/r1/model.pt" and current.sha256 == published.sha256
    assert store.current(use_finetuned=False).kind == "shipped"
    assert registration_lib.verify_weights(current, BUNDLE) == current.sha256
    (run / "model.pt").write_bytes(b"changed")
    with pytest.raises(WeightsIntegrityError, match="does not match"):
        registration_lib.verify_weights(current, BUNDLE)
    with pytest.raises(ValueError, match="inside"):
        store.publish(tmp_path / "elsewhere.pt", {})


# ----------------------------------------------------------------------------------------------------------------------
# the server


def test_info_lists_the_registration_tasks(server):
    status, info = http_json("GET", f"{server.url}/info/")
    assert status == 200
    seg, align = info["models"]["keymorph_atlas_seg"], info["models"]["keymorph_align"]
    assert seg["type"] == "segmentation" and seg["labels"] == {"csf": 1, "gm": 2, "wm": 3}
    assert seg["config"]["orientation_search"] is False  # --conf orientation_search false
    assert align["type"] == "others"
    assert info["atlas"]["name"] == ATLAS_STEM and info["atlas"]["shape"] == [197, 233, 189]
    assert "keymorph" in info["trainers"] and info["trainers"]["keymorph"]["config"]["max_epochs"] >= 1
    assert info["datastore"]["total"] == len(STUDIES)


def test_brain_mask_task_gives_the_brain_on_the_image_grid(server, demo, studies, work):
    status, info = http_json("GET", f"{server.url}/info/")
    assert info["models"]["keymorph_brain_mask"]["labels"] == {"brain": 1}
    status, headers, body = _infer(server, "keymorph_brain_mask", SUBJECT, output="image")
    assert status == 200, body[:2000]
    mask_file = work / "brainmask.nii.gz"
    mask_file.write_bytes(body)
    subject, mask = nib.load(str(studies / f"{SUBJECT}.nii.gz")), nib.load(str(mask_file))
    assert mask.shape == subject.shape and np.allclose(mask.affine, subject.affine)
    truth = np.asarray(nib.load(str(_label_of(demo, SUBJECT))).dataobj) > 0
    assert _dice(np.asarray(mask.dataobj) > 0, truth, (True,))[0] > 0.9


def test_atlas_segmentation_matches_the_truth_and_the_bundle_cli(server, demo, studies, model_dir, work):
    status, headers, body = _infer(server, "keymorph_atlas_seg", SUBJECT)
    assert status == 200, body[:2000]
    parts = multipart_parts(headers["content-type"], body)
    result = json.loads(parts["params"])
    label_file = work / "seg.nii.gz"
    label_file.write_bytes(parts["image"])

    # the label is on the subject's own grid, and holds the atlas' tissue classes
    subject = nib.load(str(studies / f"{SUBJECT}.nii.gz"))
    label = nib.load(str(label_file))
    assert label.shape == subject.shape and np.allclose(label.affine, subject.affine)
    pred = np.asarray(label.dataobj)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2, 3}

    # Dice against the subject's true tissue labels, next to the atlas propagated by the true transform (the best an
    # affine registration can do: the subject's anatomy is a non-linear deformation of the template) and by none
    truth = np.asarray(nib.load(str(_label_of(demo, SUBJECT))).dataobj)
    world_from_template = _truth_world_from_template(demo, SUBJECT)
    oracle = _atlas_labels_through(model_dir, subject, np.linalg.inv(world_from_template))
    identity = _atlas_labels_through(model_dir, subject, np.eye(4))
    dice, dice_oracle, dice_identity = (np.mean(_dice(x, truth)) for x in (pred, oracle, identity))
    assert dice > dice_oracle - 0.1 and dice > dice_identity + 0.15, (dice, dice_oracle, dice_identity)
    assert _dice(pred > 0, truth > 0, (True,))[0] > 0.93

    # the JSON: the bundle's record (matrices in RAS mm, keypoints), the roles, the shipped weights
    assert result["roles"] == {"fixed": "subject", "moving": "atlas"} and result["subject"] == f"{SUBJECT}.nii.gz"
    assert result["transform_type"] == "affine" and len(result["keypoints_fixed_ras_mm"]) == 64
    assert result["weights"]["kind"] == "shipped"
    assert result["weights"]["sha256"] == expected_sha256(BUNDLE / "models/model.pt", BUNDLE / "large_files.yml")
    assert result["label_names"] == {"csf": 1, "gm": 2, "wm": 3}
    f2m = np.asarray(result["fixed_to_moving_ras"])
    assert np.allclose(f2m @ np.asarray(result["moving_to_fixed_ras"]), np.eye(4), atol=1e-5)
    assert "AffineTransform" in result["itk_transform_tfm"]
    assert result["quality"]["verdict"] == "ok" and 1.0 < result["quality"]["nmi"] <= 2.0, result["quality"]
    error = _mean_error_mm(_brain_points(_label_of(demo, SUBJECT)), f2m, np.linalg.inv(world_from_template))
    print(
        f"{SUBJECT}: mean tissue Dice {dice:.3f} (true transform {dice_oracle:.3f}, none {dice_identity:.3f}); "
        f"transform error {error:.2f} mm"
    )
    assert error < 5.0, error

    # the same pair through the bundle's own command line, with the server's python (its torch build), gives the same
    # matrix and label map
    out = work / "cli"
    res = subprocess.run(
        [
            str(_label_venv() / "bin" / "python"),
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            "configs/inference.json",
            "--moving",
            str(model_dir / "atlas" / f"{ATLAS_STEM}_t1.nii.gz"),
            "--moving_label",
            str(model_dir / "atlas" / f"{ATLAS_STEM}_label.nii.gz"),
            "--fixed",
            str(studies / f"{SUBJECT}.nii.gz"),
            "--output_dir",
            str(out),
            "--orientation_search",
            "False",
            "--write_png",
            "False",
        ],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cli = json.loads((out / f"{ATLAS_STEM}_t1.json").read_text())
    # The same build and the same pipeline agree to float rounding. (With another torch build, the refinement's
    # iterative optimiser takes another path: 0.15 mm apart over a 120 mm box about the brain, 0.2 % of the label
    # voxels flipped, measured with this suite's venv against the server's.)
    box = np.array([[x, y - 18.0, z + 18.0, 1.0] for x in (-60, 60) for y in (-60, 60) for z in (-60, 60)])
    for key in ("keypoints_fixed_ras_mm", "keypoints_moving_ras_mm", "fixed_to_moving_ras", "moving_to_fixed_ras"):
        diff = np.asarray(cli[key]) - np.asarray(result[key])
        apart = np.linalg.norm(diff if key.startswith("keypoints") else box @ diff.T, axis=1).max()
        print(f"server vs CLI, {key}: {apart:.2e} mm at most")
        assert apart < 1e-3, (key, apart)
    cli_label = np.asarray(nib.load(str(out / f"{ATLAS_STEM}_t1_label_warped.nii.gz")).dataobj)
    assert (cli_label == pred).mean() > 0.9999


def test_atlas_segmentation_of_a_rotated_other_contrast_image(server, demo, studies, model_dir, work):
    status, _, body = _infer(server, "keymorph_atlas_seg", ROTATED, output="image")
    assert status == 200, body[:2000]
    (work / "seg_rotated.nii.gz").write_bytes(body)
    pred = np.asarray(nib.load(str(work / "seg_rotated.nii.gz")).dataobj)
    subject = nib.load(str(studies / f"{ROTATED}.nii.gz"))
    truth = np.asarray(nib.load(str(_label_of(demo, ROTATED))).dataobj)
    oracle = _atlas_labels_through(model_dir, subject, np.linalg.inv(_truth_world_from_template(demo, ROTATED)))
    identity = _atlas_labels_through(model_dir, subject, np.eye(4))
    dice, dice_oracle, dice_identity = (np.mean(_dice(x, truth)) for x in (pred, oracle, identity))
    print(f"{ROTATED}: mean tissue Dice {dice:.3f} (true transform {dice_oracle:.3f}, none {dice_identity:.3f})")
    assert dice > dice_oracle - 0.12 and dice > dice_identity + 0.2, (dice, dice_oracle, dice_identity)


def test_alignment_returns_the_subject_in_atlas_space(server, demo, studies, model_dir, work):
    status, headers, body = _infer(server, "keymorph_align", SUBJECT)
    assert status == 200, body[:2000]
    parts = multipart_parts(headers["content-type"], body)
    result = json.loads(parts["params"])
    (work / "aligned.nii.gz").write_bytes(parts["image"])
    aligned = nib.load(str(work / "aligned.nii.gz"))
    atlas = nib.load(str(model_dir / "atlas" / f"{ATLAS_STEM}_t1.nii.gz"))
    assert aligned.shape == atlas.shape and np.allclose(aligned.affine, atlas.affine)
    assert result["roles"] == {"moving": "subject", "fixed": "atlas"}
    # fixed_to_moving maps atlas (template) points to subject points: the demo's world_from_template
    f2m = np.asarray(result["fixed_to_moving_ras"])
    truth = _truth_world_from_template(demo, SUBJECT)
    error = _mean_error_mm(_brain_points(model_dir / "atlas" / f"{ATLAS_STEM}_label.nii.gz"), f2m, truth)
    print(f"alignment of {SUBJECT}: transform error {error:.2f} mm")
    assert error < 5.0, error
    # the image is the subject resampled through that matrix
    subject = nib.load(str(studies / f"{SUBJECT}.nii.gz"))
    expected = resample(
        torch.as_tensor(np.asarray(subject.dataobj, dtype=np.float32))[None, None],
        torch.as_tensor(f2m)[None],
        atlas.shape,
        torch.as_tensor(atlas.affine),
        torch.as_tensor(subject.affine),
    )[0, 0].numpy()
    data = np.asarray(aligned.dataobj, dtype=np.float32)
    assert np.abs(data - expected).max() < 1e-3 * max(1.0, float(np.abs(expected).max()))


def test_requests_for_files_outside_the_datastore_are_refused(server, demo):
    outside = str(demo / "sub-01_T1.nii.gz")  # exists on the server, not in the datastore
    status, _, body = _infer(server, "keymorph_atlas_seg", outside, output="json")
    assert status == 403 and "not in the datastore" in json.loads(body)["detail"]
    # the same path relative to the server's working folder, and smuggled in through params
    status, _, _ = _infer(server, "keymorph_align", "demo/sub-01_T1.nii.gz", output="json")
    assert status == 403
    form, ctype = multipart_body({"params": (None, json.dumps({"image": outside}).encode())})
    q = urllib.parse.urlencode({"image": SUBJECT, "output": "json"})
    status, _, _ = http("POST", f"{server.url}/infer/keymorph_atlas_seg?{q}", form, {"Content-Type": ctype})
    assert status == 403
    # an uploaded file is a temporary file of the server: also refused (clients use datastore or session images)
    form, ctype = multipart_body({"file": ("x.nii.gz", (demo / "sub-01_T1.nii.gz").read_bytes())})
    status, _, _ = http("POST", f"{server.url}/infer/keymorph_atlas_seg?output=json", form, {"Content-Type": ctype})
    assert status == 403
    status, _, body = _infer(server, "keymorph_atlas_seg", "no_such_image", output="json")
    assert status == 404 and "no image" in json.loads(body)["detail"]


def test_session_images_are_served_and_unusable_images_explained(server, demo, work):
    """Images a client uploads as a MONAI Label session (what Slicer does with a local volume) are accepted; an image
    that cannot be registered gets HTTP 422 saying why."""

    def session(path: Path) -> str:
        form, ctype = multipart_body({"files": (path.name, path.read_bytes())})
        status, _, body = http("PUT", f"{server.url}/session/", form, {"Content-Type": ctype})
        assert status == 200, body[:2000]
        return json.loads(body)["session_id"]

    sid = session(demo / "sub-01_T1.nii.gz")
    status, _, body = http("POST", f"{server.url}/infer/keymorph_atlas_seg?session_id={sid}&output=json")
    assert status == 200, body[:2000]
    assert json.loads(body)["subject"] == "sub-01_T1.nii.gz"
    constant = work / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 24, 24), 7.0, np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), str(constant))
    status, _, body = http("POST", f"{server.url}/infer/keymorph_atlas_seg?session_id={session(constant)}&output=json")
    assert status == 422, body[:2000]
    assert "constant" in json.loads(body)["detail"]
    assert str(work) not in json.loads(body)["detail"]  # no server path in what the client is told
    form, ctype = multipart_body({"params": (None, json.dumps({"orientation_search": "maybe"}).encode())})
    q = urllib.parse.urlencode({"image": SUBJECT, "output": "json"})
    status, _, body = http("POST", f"{server.url}/infer/keymorph_align?{q}", form, {"Content-Type": ctype})
    assert status == 400 and "orientation_search" in json.loads(body)["detail"]


# ----------------------------------------------------------------------------------------------------------------------
# the server's confinement: nothing read, written or deleted outside its folders, no request that takes it down


def _put_file(server: Server, route: str, query: dict, field: str, name: str, content: bytes):
    form, ctype = multipart_body({field: (name, content)})
    return http("PUT", f"{server.url}{route}?{urllib.parse.urlencode(query)}", form, {"Content-Type": ctype})


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def _leftovers(server: Server) -> list[str]:
    return sorted(p.name for p in server.tmp.iterdir())


def test_ids_and_tags_that_are_paths_are_refused(server, demo, studies, work):
    """Upload ids, label tags (also through an infer's ``label_tag``) and session ids that are paths are refused with
    400; nothing lands outside the studies folder, and a refused upload leaves no temporary file."""
    nifti = (demo / "sub-00_T1.nii.gz").read_bytes()
    before = _leftovers(server)
    for image_id in ("../escaped", str(work / "escaped_abs"), "..", "a/b", "nul\x00x"):
        status, _, body = _put_file(server, "/datastore/image", {"image": image_id}, "file", "x.nii.gz", nifti)
        assert status == 400 and "image id" in _detail(body), (image_id, status, body[:300])
    status, _, body = _put_file(server, "/datastore/image", {"image": "script"}, "file", "x.sh", b"#!/bin/sh\n")
    assert status == 415 and ".sh" in _detail(body), (status, body[:300])
    assert not (studies / "script.sh").exists() and not list(studies.glob("script*"))
    for tag in ("../..", "../../../escaped_tag", str(work / "tags")):
        status, _, body = _put_file(
            server, "/datastore/label", {"image": "sub-00_T2", "tag": tag}, "label", "l.nii.gz", nifti
        )
        assert status == 400 and "label tag" in _detail(body), (tag, status, body[:300])
    form, ctype = multipart_body({"params": (None, json.dumps({"save_label": True, "label_tag": "../../x"}).encode())})
    q = urllib.parse.urlencode({"image": "sub-00_T2", "output": "json"})
    status, _, body = http("POST", f"{server.url}/infer/keymorph_atlas_seg?{q}", form, {"Content-Type": ctype})
    assert status == 400 and "label tag '../../x'" in _detail(body), (status, body[:300])
    for method in ("GET", "DELETE"):
        status, _, body = http(method, f"{server.url}/session/%2e%2e")
        assert status == 400 and "session id" in _detail(body), (method, status, body[:300])
    escaped = [
        p for p in (work / "escaped.nii.gz", work / "escaped_abs.nii.gz", work.parent / "x.nii.gz") if p.exists()
    ]
    assert not escaped and (work / "sessions").parent.is_dir()
    assert not list(work.glob("**/escaped*")) and not list(studies.parent.glob("x.nii*"))
    assert _leftovers(server) == before  # the uploads of refused requests were removed
    # a plain id still works, and a plain tag too
    status, _, body = _put_file(server, "/datastore/image", {"image": "uploaded"}, "file", "x.nii.gz", nifti)
    assert status == 200 and (studies / "uploaded.nii.gz").read_bytes() == nifti, body[:300]
    status, _, body = _put_file(
        server, "/datastore/label", {"image": "uploaded", "tag": "mine"}, "label", "l.nii.gz", nifti
    )
    assert status == 200 and (studies / "labels" / "mine" / "uploaded.nii.gz").is_file(), body[:300]
    status, _, _ = http("DELETE", f"{server.url}/datastore/image?id=uploaded")
    assert status == 200 and not (studies / "uploaded.nii.gz").exists()


def test_session_archives_that_reach_outside_are_refused(server, demo, work):
    """Tar slip (``../`` members, absolute members, links) is refused with 400 before anything is unpacked; a plain
    archive still opens a session."""
    import io
    import tarfile

    def tar(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for m in members:
                t.addfile(m, io.BytesIO(data) if m.isfile() else None)
        return buf.getvalue()

    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
        return info

    before = _leftovers(server)
    bad = {
        "slip": [member("../../slipped.nii.gz")],
        "absolute": [member(str(work / "abs_slipped.nii.gz"))],
        "symlink": [member("link.nii.gz", tarfile.SYMTYPE, str(work / "outside" / "secret.nii.gz"))],
        "hardlink": [member("hard.nii.gz", tarfile.LNKTYPE, "/etc/passwd")],
    }
    for name, members in bad.items():
        status, _, body = _put_file(server, "/session/", {"uncompress": "true"}, "files", f"{name}.tar", tar(members))
        assert status == 400 and "session archive" in _detail(body), (name, status, body[:300])
    status, _, body = _put_file(server, "/session/", {"uncompress": "true"}, "files", "junk.tar", b"not an archive")
    assert status == 400 and "tar or zip" in _detail(body), (status, body[:300])
    assert not list(work.glob("**/*slipped*")) and not list(work.parent.glob("*slipped*"))
    assert _leftovers(server) == before
    content = (demo / "sub-01_T1.nii.gz").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("sub-01_T1.nii.gz")
        info.size = len(content)
        t.addfile(info, io.BytesIO(content))
    status, _, body = _put_file(server, "/session/", {"uncompress": "true"}, "files", "ok.bin", buf.getvalue())
    assert status == 200, body[:300]
    sid = json.loads(body)["session_id"]
    assert (work / "sessions" / sid).is_dir()
    status, _, _ = http("DELETE", f"{server.url}/session/{sid}")
    assert status == 200 and not (work / "sessions" / sid).exists() and (work / "sessions").is_dir()


def test_links_out_of_the_studies_folder_are_not_served_or_followed(server, studies, work):
    link, target = studies / f"{LINK_OUT}.nii.gz", work / "outside" / "secret.nii.gz"
    status, listing = http_json("GET", f"{server.url}/datastore/?output=all")
    assert status == 200 and LINK_OUT not in listing["objects"] and SUBJECT in listing["objects"]
    status, _, body = http("GET", f"{server.url}/datastore/image?image={LINK_OUT}")
    assert status == 404 and b"not for clients" not in body
    status, info = http_json("GET", f"{server.url}/datastore/image/info?image={LINK_OUT}")
    assert "path" not in (info or {}) and str(target) not in json.dumps(info)
    status, _, body = _infer(server, "keymorph_atlas_seg", LINK_OUT, output="json")
    assert status == 404, body[:300]
    status, _, body = http("DELETE", f"{server.url}/datastore/image?id={LINK_OUT}")
    assert status == 404, body[:300]
    assert target.read_bytes() == b"not for clients" and link.is_symlink()
    # an upload under the link's name replaces the link, it does not write through it
    nifti = (studies / f"{SUBJECT}.nii.gz").read_bytes()
    status, _, body = _put_file(server, "/datastore/image", {"image": LINK_OUT}, "file", "x.nii.gz", nifti)
    assert status == 200, body[:300]
    assert target.read_bytes() == b"not for clients" and not link.is_symlink() and link.read_bytes() == nifti
    status, _, _ = http("DELETE", f"{server.url}/datastore/image?id={LINK_OUT}")
    assert status == 200 and not link.exists() and target.is_file()
    link.symlink_to(target)  # as it was (module fixtures)


def test_bad_requests_get_4xx_with_the_reason_and_no_server_path(server, studies, work):
    q = urllib.parse.urlencode({"image": "sub-00_T2", "output": "json"})
    cases = {
        "not json": (400, "not JSON"),
        "[1, 2]": (400, "JSON object, got list"),
        json.dumps({"device": "x"}): (400, "device"),
        json.dumps({"logging": "LOUD"}): (400, "logging"),
    }
    for params, (code, words) in cases.items():
        form, ctype = multipart_body({"params": (None, params.encode())})
        status, _, body = http("POST", f"{server.url}/infer/keymorph_align?{q}", form, {"Content-Type": ctype})
        assert status == code and words in _detail(body), (params, status, body[:300])
    status, _, body = _infer(server, "no_such_model", "sub-00_T2", output="json")
    assert status == 404 and "no_such_model" in _detail(body)
    # training options: checked when the request comes, with the option's range; no training process starts
    _, before = http_json("GET", f"{server.url}/train/?all=true")
    for options, words in (
        ({"max_epochs": 1, "epoch_length": 1_000_000_000}, "epoch_length: expected an integer in [1, 10000]"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"rotate_deg": 720}, "rotate_deg"),
        ({"device": "x"}, "device"),
        ({"restart_from_shipped": "maybe"}, "restart_from_shipped"),
    ):
        start = time.monotonic()
        status, body = http_json("POST", f"{server.url}/train/keymorph", options, timeout=30)
        assert status == 422 and words in body["detail"], (options, status, body)
        assert time.monotonic() - start < 5
    status, body = http_json("POST", f"{server.url}/train/", {"keymorph": {"epoch_length": 10**9}}, timeout=30)
    assert status == 422 and "epoch_length" in body["detail"], body
    status, body = http_json("POST", f"{server.url}/train/keymorph?run_sync=true", {"max_epochs": 1}, timeout=30)
    assert status == 400 and "run_sync" in body["detail"], body
    _, after = http_json("GET", f"{server.url}/train/?all=true")
    assert after == before  # nothing was started
    # no absolute server path in what a client is told
    status, _, body = _infer(server, "keymorph_align", str(work / "outside" / "secret.nii.gz"), output="json")
    assert status == 403
    for folder in (studies, work / "model", BUNDLE, server.tmp):
        assert str(folder) not in _detail(body).replace(str(work / "outside" / "secret.nii.gz"), "")


def test_no_client_value_reaches_a_child_process_or_the_weights(server, demo, work):
    """MONAI Label puts a request's ``bundle_path`` on the PYTHONPATH of the training / scoring / batch process: an
    uploaded ``sitecustomize.py`` would run there. Weights cannot be replaced or deleted over HTTP; whole-slide and
    ``run_sync`` routes, ``skip_writer``, bad upload names and params are refused; nothing is left in the server's
    temporary folder."""
    marker = work / "child_ran_client_code"
    code = f"open({str(marker)!r}, 'w').write('x')\n".encode()
    status, _, body = _put_file(server, "/session/", {}, "files", "sitecustomize.py", code)
    assert status == 200, body[:300]
    folder = json.loads(body)["session_info"]["path"]
    status, body = http_json("POST", f"{server.url}/train/keymorph", {"max_epochs": 1, "bundle_path": folder})
    assert status == 422 and "bundle_path" in body["detail"], body
    status, task = http_json("POST", f"{server.url}/scoring/no_such_method", {"bundle_path": folder})
    assert status == 200, task
    task = _wait_task(server.url, "/scoring/", 300)  # the scoring process starts (and fails: no such method)
    assert task["status"] in ("DONE", "ERROR"), task
    assert not marker.exists(), "a child process imported the client's sitecustomize.py"
    assert "bundle_path" not in task["request"], task
    shipped = {p: p.read_bytes() for p in (BUNDLE / "models").glob("*.pt")}
    for method in ("PUT", "DELETE"):
        for model in ("keymorph_atlas_seg", "keymorph_brain_mask"):
            if method == "PUT":
                status, _, body = _put_file(server, f"/model/{model}", {}, "file", "model.pt", b"junk")
            else:
                status, _, body = http(method, f"{server.url}/model/{model}")
            assert status == 403, (method, model, status, body[:300])
    assert {p: p.read_bytes() for p in (BUNDLE / "models").glob("*.pt")} == shipped
    for route in ("/infer/wsi/keymorph_atlas_seg", "/infer/wsi_v2/keymorph_atlas_seg"):
        status, _, _ = http("POST", f"{server.url}{route}?image={SUBJECT}")
        assert status == 404
    for route in ("/batch/infer/keymorph_atlas_seg", "/scoring/", "/scoring/dice"):
        status, body = http_json("POST", f"{server.url}{route}?run_sync=true", {})
        assert status == 400 and "run_sync" in body["detail"], (route, body)
    form, ctype = multipart_body({"params": (None, json.dumps({"skip_writer": True}).encode())})
    q = urllib.parse.urlencode({"image": "sub-00_T2", "output": "json"})
    status, _, body = http("POST", f"{server.url}/infer/keymorph_atlas_seg?{q}", form, {"Content-Type": ctype})
    assert status == 400 and "skip_writer" in _detail(body)
    before = _leftovers(server)
    nifti = (demo / "sub-00_T1.nii.gz").read_bytes()
    refused = [
        (_put_file(server, "/datastore/image", {"image": "up"}, "file", "x.NII.GZ", nifti), 415),
        (_put_file(server, "/datastore/image", {"image": "u" * 300}, "file", "x.nii.gz", nifti), 400),
        (_put_file(server, "/session/", {}, "files", "..", nifti), 400),
    ]
    form, ctype = multipart_body({"params": (None, b"not json"), "file": ("x.nii.gz", nifti)})
    refused.append((http("PUT", f"{server.url}/datastore/image?image=up", form, {"Content-Type": ctype}), 400))
    for (status, _, body), code in refused:
        assert status == code, (status, body[:300])
    assert _leftovers(server) == before
    status, _, body = http("GET", f"{server.url}/datastore/dataset")
    assert status in (200, 404), body[:300]  # no labels yet: 404, not MONAI Label's AssertionError 500
    deadline = time.time() + 10  # a sent archive is removed after the response
    while _leftovers(server) != before and time.time() < deadline:
        time.sleep(0.2)
    assert _leftovers(server) == before


def test_the_api_answers_while_inferences_run(server):
    """Registrations run in a worker thread: ``/info/`` and ``/train/`` answer within 2 s while two queue."""
    import threading

    results: list[int] = []

    def infer() -> None:
        results.append(_infer(server, "keymorph_align", "sub-00_T2", output="json")[0])

    threads = [threading.Thread(target=infer) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    latencies = []
    for route in ("/info/", "/train/", "/datastore/", "/info/"):
        start = time.monotonic()
        status, _, _ = http("GET", f"{server.url}{route}", timeout=30)
        latencies.append(time.monotonic() - start)
        assert status in (200, 404)
    busy = any(t.is_alive() for t in threads)
    for t in threads:
        t.join(timeout=600)
    print(f"latencies while inferring: {[round(x, 3) for x in latencies]} s")
    assert busy, "the inferences ended before the API was asked: nothing was measured"
    assert max(latencies) < 2.0, latencies
    assert results == [200, 200]


def test_a_training_run_out_of_memory_says_so_in_the_train_status(venv, studies, work):
    """A server whose training processes may use 3 GB (``--conf train_memory_gb 3``; a fine-tuning run needs more):
    the run fails with MemoryError in its own process (not the kernel's OOM killer elsewhere), and ``GET /train/``
    says why."""
    srv = Server(
        venv,
        APP,
        studies,
        {"model_dir": str(work / "model_lowmem"), "orientation_search": "false", "train_memory_gb": "3"},
        work / "server_lowmem.log",
        work,
    )
    try:
        srv.wait_ready()
        status, task = http_json("POST", f"{srv.url}/train/keymorph", {"max_epochs": 1, "epoch_length": 2})
        assert status == 200, task
        task = _wait_task(srv.url, "/train/")
        details = "\n".join(task.get("details", []))
        assert task["status"] == "ERROR", details
        assert "out of memory (limit 3.0 GB, --conf train_memory_gb)" in details, details
    finally:
        srv.stop()


def test_a_training_process_has_a_memory_limit(venv):
    """``limit_memory`` (applied in the training process on the CPU) turns an allocation past the limit into a
    ``MemoryError`` in that process."""
    script = f"""
import sys
sys.path.insert(0, {str(APP)!r})
from lib.trainers.keymorph import limit_memory
import numpy as np
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit_memory((size + 512 * 2**20) / 2**30)
small = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB: within the limit
try:
    big = np.ones(2 * 2**30, dtype=np.uint8)
except MemoryError:
    print("MemoryError")
"""
    res = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("MemoryError"), res.stdout + res.stderr


def test_training_fine_tunes_from_the_shipped_weights(server, model_dir):
    """A first run starts from the shipped weights and publishes its own; inference uses them; a second run goes on
    from them, a third with ``restart_from_shipped`` starts from the shipped weights again."""
    status, task = http_json("POST", f"{server.url}/train/keymorph", {"max_epochs": 1, "epoch_length": 2})
    assert status == 200, task
    task = _wait_task(server.url, "/train/")
    assert task["status"] == "DONE", "\n".join(task.get("details", [])) + "\n" + server.tail()
    record = json.loads((model_dir / "finetuned.json").read_text())
    shipped_sha = expected_sha256(BUNDLE / "models/model.pt", BUNDLE / "large_files.yml")
    assert record["iterations"] == 2 and record["init_weights"] == "shipped" and record["init_sha256"] == shipped_sha
    weights_file = model_dir / record["weights"]
    tuned = torch.load(weights_file, weights_only=True)
    shipped = torch.load(BUNDLE / "models/model.pt", weights_only=True)
    assert set(tuned) == set(shipped)
    # started from the shipped weights: two small steps away from them, unlike a fresh network
    detector = ConvNetDetector(num_keypoints=64, channels=(16, 32, 32, 64, 64, 128, 128), pool_after=(1, 3, 5))
    fresh = {f"detector.{k}": v for k, v in detector.state_dict().items()}
    conv = [k for k in shipped if k.endswith("weight") and shipped[k].ndim == 5]

    def distance(state: dict) -> float:
        """Relative distance of the convolution weights from the shipped ones."""
        diff = sum(float((state[k].float() - shipped[k].float()).norm()) for k in conv)
        return diff / sum(float(shipped[k].float().norm()) for k in conv)

    print(f"relative distance from the shipped weights: fine-tuned {distance(tuned):.2e}, fresh {distance(fresh):.2f}")
    assert 0 < distance(tuned) < 0.05 and distance(fresh) > 0.5, (distance(tuned), distance(fresh))
    # published: /info reports it, and inference now uses these weights (digest checked when loaded)
    status, info = http_json("GET", f"{server.url}/info/")
    assert info["train_stats"]["keymorph"]["sha256"] == record["sha256"]
    status, _, body = _infer(server, "keymorph_atlas_seg", SUBJECT, output="json")
    assert status == 200, body[:2000]
    assert json.loads(body)["weights"] == {"kind": "finetuned", "file": record["weights"], "sha256": record["sha256"]}
    # the next run goes on from the fine-tuned weights; restart_from_shipped (as a client sends it: a string) starts
    # again from the shipped ones
    for options, init, init_sha in (
        ({}, "finetuned", record["sha256"]),
        ({"restart_from_shipped": "true"}, "shipped", shipped_sha),
    ):
        status, task = http_json(
            "POST", f"{server.url}/train/keymorph", {"max_epochs": 1, "epoch_length": 1, **options}
        )
        assert status == 200, task
        task = _wait_task(server.url, "/train/")
        assert task["status"] == "DONE", "\n".join(task.get("details", [])) + "\n" + server.tail()
        latest = json.loads((model_dir / "finetuned.json").read_text())
        assert latest["weights"] != record["weights"] and latest["iterations"] == 1, latest
        assert (latest["init_weights"], latest["init_sha256"]) == (init, init_sha), (options, latest)


def test_a_user_atlas_the_shipped_weights_on_request_and_no_trainer(venv, registration_lib, demo, studies, work):
    """``--conf atlas_image / atlas_label / atlas_labels / atlas_name``: a demo subject (its T1 and true tissue labels)
    is the atlas instead of the MNI one; ``use_finetuned false``: inference keeps the shipped weights although the
    model folder has published fine-tuned ones (a copy of the shipped file, published as fine-tuned: any use of it
    shows in the answer's ``weights``); ``skip_trainers true``: no train task."""
    atlas_id = "sub-00_T1"
    atlas_image, atlas_label = demo / f"{atlas_id}.nii.gz", _label_of(demo, atlas_id)
    model_dir = work / "model_user_atlas"
    run = model_dir / "train" / "r0"
    run.mkdir(parents=True)
    shutil.copy(BUNDLE / "models" / "model.pt", run / "model.pt")
    tuned = registration_lib.WeightStore(BUNDLE, model_dir).publish(run / "model.pt", {"iterations": 0})
    conf = {
        "model_dir": str(model_dir),
        "orientation_search": "false",
        "atlas_image": str(atlas_image),
        "atlas_label": str(atlas_label),
        "atlas_labels": "fluid, grey, white",
        "atlas_name": "subject zero",
        "use_finetuned": "false",
        "skip_trainers": "true",
    }
    # values with spaces, through `python -m monailabel.main` (the README's way: the launcher would split them)
    srv = Server(venv, APP, studies, conf, work / "server_user_atlas.log", work, module=True)
    try:
        srv.wait_ready()
        status, info = http_json("GET", f"{srv.url}/info/")
        assert status == 200
        names = {"fluid": 1, "grey": 2, "white": 3}
        grid = nib.load(str(atlas_image))
        assert info["atlas"] == {
            "name": "subject zero",
            "labels": names,
            "shape": list(grid.shape),
            "spacing_mm": [2.0] * 3,
        }
        assert info["models"]["keymorph_atlas_seg"]["labels"] == names
        assert info["trainers"] == {}, info["trainers"]
        status, body = http_json("POST", f"{srv.url}/train/keymorph", {"max_epochs": 1}, timeout=30)
        assert status == 404 and "no trainer 'keymorph'" in body["detail"], (status, body)
        assert not (model_dir / "train").exists() or sorted(p.name for p in (model_dir / "train").iterdir()) == ["r0"]

        # segmentation: the user atlas' labels and names, propagated into the subject; the shipped weights
        status, headers, body = _infer(srv, "keymorph_atlas_seg", SUBJECT)
        assert status == 200, body[:2000] + srv.tail().encode()
        parts = multipart_parts(headers["content-type"], body)
        result = json.loads(parts["params"])
        shipped = registration_lib.WeightStore(BUNDLE, model_dir).shipped
        assert result["weights"] == {"kind": "shipped", "file": "models/model.pt", "sha256": shipped.sha256}
        assert tuned.kind == "finetuned"  # what use_finetuned true would have used (same digest, other record)
        assert result["label_names"] == names and result["roles"] == {"fixed": "subject", "moving": "atlas"}
        (work / "seg_user_atlas.nii.gz").write_bytes(parts["image"])
        subject = nib.load(str(studies / f"{SUBJECT}.nii.gz"))
        pred = np.asarray(nib.load(str(work / "seg_user_atlas.nii.gz")).dataobj)
        truth = np.asarray(nib.load(str(_label_of(demo, SUBJECT))).dataobj)
        # subject world -> template -> atlas subject's world: the true subject -> atlas matrix
        subject_to_atlas = _truth_world_from_template(demo, atlas_id) @ np.linalg.inv(
            _truth_world_from_template(demo, SUBJECT)
        )
        oracle = _atlas_labels_through(model_dir, subject, subject_to_atlas, atlas_label)
        identity = _atlas_labels_through(model_dir, subject, np.eye(4), atlas_label)
        dice, dice_oracle, dice_identity = (np.mean(_dice(x, truth)) for x in (pred, oracle, identity))
        print(
            f"user atlas {atlas_id} -> {SUBJECT}: tissue Dice {dice:.3f} "
            f"(true transform {dice_oracle:.3f}, none {dice_identity:.3f})"
        )
        assert dice > dice_oracle - 0.1 and dice > dice_identity + 0.1, (dice, dice_oracle, dice_identity)

        # alignment: the subject resampled onto the user atlas' grid, by a matrix near the truth
        status, headers, body = _infer(srv, "keymorph_align", SUBJECT)
        assert status == 200, body[:2000]
        parts = multipart_parts(headers["content-type"], body)
        (work / "aligned_user_atlas.nii.gz").write_bytes(parts["image"])
        aligned = nib.load(str(work / "aligned_user_atlas.nii.gz"))
        assert aligned.shape == grid.shape and np.allclose(aligned.affine, grid.affine)
        f2m = np.asarray(json.loads(parts["params"])["fixed_to_moving_ras"])  # atlas points -> subject points
        error = _mean_error_mm(_brain_points(atlas_label), f2m, np.linalg.inv(subject_to_atlas))
        print(f"alignment of {SUBJECT} to the user atlas: transform error {error:.2f} mm")
        assert error < 5.0, error
    finally:
        srv.stop()


def test_stock_monaibundle_app_loads_the_bundle(venv, studies, work):
    """MONAI Label's own ``monaibundle`` sample app serves the bundle from ``<app>/model/<name>/``."""
    apps = work / "apps"
    res = subprocess.run(
        [str(venv / "bin" / "monailabel"), "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    name = "keymorph_brain_registration"
    (apps / "monaibundle" / "model").mkdir(exist_ok=True)
    (apps / "monaibundle" / "model" / name).symlink_to(BUNDLE, target_is_directory=True)
    conf = {"models": name, "zoo_source": "github", "sam2": "false"}  # github: local bundles; sam2 would download
    srv = Server(venv, apps / "monaibundle", studies, conf, work / "stock_server.log", work)
    try:
        srv.wait_ready()
        status, info = http_json("GET", f"{srv.url}/info/")
        assert status == 200
        assert info["models"][name]["version"] == json.loads((BUNDLE / "configs/metadata.json").read_text())["version"]
        assert name in info["trainers"]
    finally:
        srv.stop()
