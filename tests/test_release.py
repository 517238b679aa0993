"""Shipping the weights: large_files.yml, download_large_files and download --url against a local server,
SHA-256 verification before loading."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from custom_nets import ConvNetDetector, KeyMorph
from custom_nets.fileio import sha256_file
from custom_nets.handlers import VerifiedCheckpointLoader, WeightsIntegrityError
from custom_nets.release import BUNDLE_NAME, pack_bundle, write_large_files

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def _tiny_net() -> KeyMorph:
    return KeyMorph(ConvNetDetector(num_keypoints=8, channels=(4, 8), pool_after=(0,)))


@pytest.fixture()
def server(tmp_path):
    """A static file server on 127.0.0.1 (random port) serving ``tmp_path / 'www'``; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def bundle_copy(tmp_path):
    """A copy of the bundle's configs with small weights standing in for models/model.pt."""
    dst = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("runs", "eval", "*.pt", "large_files.yml"))
    (dst / "models").mkdir(exist_ok=True)
    torch.save(_tiny_net().state_dict(), dst / "models" / "model.pt")
    return dst


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def test_download_large_files_fetches_and_checks_the_hash(bundle_copy, server):
    www, url = server
    weights = bundle_copy / "models" / "model.pt"
    shutil.copy(weights, www / "model.pt")
    write_large_files(bundle_copy, url)
    digest = sha256_file(weights)
    assert digest in (bundle_copy / "large_files.yml").read_text()
    weights.unlink()
    res = _monai_bundle("download_large_files", "--bundle_path", str(bundle_copy), cwd=bundle_copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sha256_file(weights) == digest  # the right file landed
    # a tampered file on the server is refused and nothing lands under the final name
    weights.unlink()
    (www / "model.pt").write_bytes((www / "model.pt").read_bytes()[:-10] + b"0123456789")
    res = _monai_bundle("download_large_files", "--bundle_path", str(bundle_copy), cwd=bundle_copy)
    assert res.returncode != 0
    assert "hash" in (res.stdout + res.stderr).lower()
    assert not weights.exists()  # MONAI checks the hash before moving the download into place


def test_download_large_files_from_a_file_url(bundle_copy, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    weights = bundle_copy / "models" / "model.pt"
    shutil.copy(weights, store / "model.pt")
    write_large_files(bundle_copy, store.as_uri())
    digest = sha256_file(weights)
    weights.unlink()
    res = _monai_bundle("download_large_files", "--bundle_path", str(bundle_copy), cwd=bundle_copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sha256_file(weights) == digest


def test_release_zip_downloads_with_monai_and_tampering_is_refused_at_load(bundle_copy, server, tmp_path):
    www, url = server
    write_large_files(bundle_copy, url)
    zip_path = pack_bundle(bundle_copy, www)
    names = zipfile.ZipFile(zip_path).namelist()
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    assert f"{BUNDLE_NAME}/configs/inference.json" in names and f"{BUNDLE_NAME}/models/model.pt" in names
    assert f"{BUNDLE_NAME}/large_files.yml" in names
    dest = tmp_path / "downloaded"
    res = _monai_bundle(
        "download", "--name", BUNDLE_NAME, "--url", f"{url}/{zip_path.name}", "--bundle_dir", str(dest), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = dest / BUNDLE_NAME
    assert sha256_file(got / "models" / "model.pt") == sha256_file(bundle_copy / "models" / "model.pt")
    net = _tiny_net()
    large_files = str(got / "large_files.yml")
    VerifiedCheckpointLoader(str(got / "models" / "model.pt"), {"model": net}, large_files=large_files).load()
    # a weights file changed after release is refused, naming the file, before anything is loaded
    state = torch.load(got / "models" / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, got / "models" / "model.pt")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsIntegrityError, match=r"model\.pt: SHA-256 .* does not match"):
        VerifiedCheckpointLoader(str(got / "models" / "model.pt"), {"model": net}, large_files=large_files).load()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _venv_without_the_package(path: Path) -> Path:
    """A venv that sees this environment's third-party packages (monai, torch, nibabel, ignite, ...) but not
    ``custom_nets``: the editable install's ``.pth`` hook is a site file of this environment, not of the new one."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    Path(own, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_the_release_zip_runs_after_download_without_the_package_installed(server, tmp_path):
    """The release zip carries the package code: downloaded with ``monai.bundle download`` into a venv without
    custom_nets, ``monai.bundle run inference`` with ``--bundle_root`` registers a pair from another folder."""
    from custom_nets.data.demo import write_demo_data

    www, url = server
    zip_path = pack_bundle(BUNDLE, www)
    names = zipfile.ZipFile(zip_path).namelist()
    package = f"{BUNDLE_NAME}/custom_nets"
    assert f"{package}/__init__.py" in names and f"{package}/data/transforms.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    python = _venv_without_the_package(tmp_path / "venv")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # (a suite run against another checkout through PYTHONPATH would leak it in)
    gone = subprocess.run(
        [str(python), "-c", "import custom_nets"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert gone.returncode != 0 and "No module named 'custom_nets'" in gone.stderr  # the premise of this test
    dest = tmp_path / "downloaded"
    got = subprocess.run(
        [str(python), "-m", "monai.bundle", "download", "--name", BUNDLE_NAME, "--url", f"{url}/{zip_path.name}",
         "--bundle_dir", str(dest)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    root = dest / BUNDLE_NAME
    demo = write_demo_data(tmp_path / "data", num_subjects=3, pixdim=4.0, test_angles=(90,), progress=False)
    pair = json.loads(demo.read_text())["test_pairs"][0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(
        [str(python), "-m", "monai.bundle", "run", "inference",
         "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root),
         "--moving", str(demo.parent / pair["moving_image"]), "--fixed", str(demo.parent / pair["fixed_image"]),
         "--output_dir", "out", "--write_png", "false"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    stem = Path(pair["moving_image"]).name[: -len(".nii.gz")]
    record = json.loads((elsewhere / "out" / f"{stem}.json").read_text())
    got_m, truth = torch.tensor(record["fixed_to_moving_ras"]), torch.tensor(pair["fixed_to_moving_ras"])
    box = torch.cartesian_prod(*[torch.tensor([-60.0, 60.0])] * 3) + torch.tensor([0.0, -18.0, 18.0])  # about a brain
    box = torch.cat([box, torch.ones(8, 1)], 1).double()
    error = (box @ (got_m.double() - truth.double()).T)[:, :3].norm(dim=1).mean()
    assert error < 2.0, (float(error), record["quality"])


def test_unlisted_weights_load_with_a_warning_and_garbage_is_refused(tmp_path, caplog):
    path = tmp_path / "mine.pt"
    torch.save(_tiny_net().state_dict(), path)
    with caplog.at_level("WARNING"):
        VerifiedCheckpointLoader(str(path), {"model": _tiny_net()}).load()
    assert "unverified" in caplog.text
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsIntegrityError, match="mine.pt: not a loadable weights file"):
        VerifiedCheckpointLoader(str(path), {"model": _tiny_net()}).load()
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        VerifiedCheckpointLoader(str(tmp_path / "absent.pt"), {"model": _tiny_net()}).load()


def test_shipped_weights_match_their_large_files_entry():
    listing = (BUNDLE / "large_files.yml").read_text()
    weights = BUNDLE / "models" / "model.pt"
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20
    assert sha256_file(weights) in listing
    state = torch.load(weights, weights_only=True)
    assert all(k.startswith("detector.") for k in state)
    # the weights fit the network inference.json builds, and that network gives what metadata.json declares
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state, strict=True)
    fmt = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    spec = fmt["inputs"]["image"]
    pair = torch.rand(1, spec["num_channels"], *spec["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        warped = net.eval()(pair)
        out = net(pair[:, :1], pair[:, 1:])
    assert tuple(warped.shape) == (1, fmt["outputs"]["pred"]["num_channels"], *fmt["outputs"]["pred"]["spatial_shape"])
    assert tuple(out.keypoints_fixed.shape[1:]) == tuple(fmt["outputs"]["keypoints"]["spatial_shape"])
    assert tuple(out.fixed_to_moving.shape[1:]) == tuple(fmt["outputs"]["fixed_to_moving"]["spatial_shape"])


def test_a_training_checkpoint_loads_for_inference_and_another_network_is_refused_naming_the_file(tmp_path):
    """``--ckpt_path runs/.../checkpoints/checkpoint_<n>.pt`` works: the loader takes the checkpoint's network (the
    inference config's load_dict key is ``model``, the checkpoint's ``network``); weights of another architecture are
    refused with the file named, not a bare ``load_state_dict`` error."""
    trained = _tiny_net()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    opt = torch.optim.Adam(trained.parameters())
    ckpt = tmp_path / "checkpoint_7.pt"
    torch.save({"network": trained.state_dict(), "optimizer": opt.state_dict(), "trainer": {"iteration": 7}}, ckpt)
    net = _tiny_net()
    VerifiedCheckpointLoader(str(ckpt), {"model": net}).load()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in net.state_dict().items())
    keyed = tmp_path / "keyed.pt"  # a file holding the state dict under the load_dict key
    torch.save({"model": trained.state_dict()}, keyed)
    other = _tiny_net()
    VerifiedCheckpointLoader(str(keyed), {"model": other}).load()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in other.state_dict().items())
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(WeightsIntegrityError, match=r"wrong\.pt: not weights of this network \(KeyMorph"):
        VerifiedCheckpointLoader(str(wrong), {"model": _tiny_net()}).load()


def _custom_nets_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "custom_nets", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_release_without_a_url_refreshes_every_listed_hash_and_keeps_urls_and_comments(tmp_path):
    """``make release`` (``python -m custom_nets release`` without ``--url_base``): every file large_files.yml lists
    (the detector and the brain extractor, released under different URLs) keeps its entry and URL, gets the SHA-256
    of the file now on disk, and the comments stay; with ``--url_base`` every listed file moves to that base."""
    import yaml

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs", "eval", "*.pt"))
    torch.save(_tiny_net().state_dict(), bundle / "models" / "model.pt")
    (bundle / "models" / "brain_extractor.pt").write_bytes(b"another extractor")
    before = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    out = _custom_nets_cli("release", "--bundle_dir", str(bundle), "--out_dir", str(tmp_path / "dist"), cwd=tmp_path)
    zip_path = Path(out.stdout.strip().splitlines()[-1])
    assert zip_path.is_file() and zip_path.parent == tmp_path / "dist"
    text = (bundle / "large_files.yml").read_text()
    after = yaml.safe_load(text)["large_files"]
    assert [e["path"] for e in after] == [e["path"] for e in before] == ["models/model.pt", "models/brain_extractor.pt"]
    assert [e["url"] for e in after] == [e["url"] for e in before]
    assert [e["hash_val"] for e in after] == [sha256_file(bundle / e["path"]) for e in after]
    assert text.count("\n  #") == (BUNDLE / "large_files.yml").read_text().count("\n  #") > 0
    with zipfile.ZipFile(zip_path) as z:
        assert z.read(f"{BUNDLE_NAME}/large_files.yml").decode() == text
    _custom_nets_cli("release", "--bundle_dir", str(bundle), "--out_dir", str(tmp_path / "dist"), "--url_base",
                     "https://example.org/v9", cwd=tmp_path)  # fmt: skip
    moved = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [e["url"] for e in moved] == ["https://example.org/v9/model.pt", "https://example.org/v9/brain_extractor.pt"]


def test_table_command_prints_the_evaluation_summary_as_markdown(tmp_path):
    """``python -m custom_nets table --summary S``: one row per angle and one for all, the model card's format."""
    summary = {
        "overall": {"pairs": 5, "success_rate": 0.6, "median_error_mm": 1.5, "mean_error_mm": 3.2,
                    "p90_error_mm": 7.2, "mean_dice": 0.725, "seconds_per_pair": 0.25},
        "by_rotation_deg": {"0.0": {"pairs": 3, "success_rate": 2 / 3, "median_error_mm": 1.5, "mean_error_mm": 5 / 3,
                                    "p90_error_mm": 2.7, "mean_dice": 0.85, "seconds_per_pair": 0.2},
                            "90.0": {"pairs": 2, "success_rate": 0.5, "median_error_mm": 5.5}},
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = _custom_nets_cli("table", "--summary", str(tmp_path / "summary.json"), cwd=tmp_path).stdout.splitlines()
    assert lines[0].startswith("| rotation (deg) | pairs | success (< 2 mm) | median error (mm)")
    assert lines[2] == "| 0 | 3 | 67 % | 1.50 | 1.67 | 2.70 | 0.850 | 0.20 |"
    assert lines[3] == "| 90 | 2 | 50 % | 5.50 | - | - | - | - |"
    assert lines[4] == "| all | 5 | 60 % | 1.50 | 3.20 | 7.20 | 0.725 | 0.25 |"
