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
from custom_nets.handlers import VerifiedCheckpointLoader, WeightsIntegrityError
from custom_nets.io import sha256_file
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
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert all(k.startswith("detector.") for k in state)


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
