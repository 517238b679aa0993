"""Verified loading of released weights: a file is loaded into the network only after its SHA-256 matched the one
recorded in the bundle's ``large_files.yml`` (and always with ``weights_only=True``).

:class:`VerifiedCheckpointLoader` is the evaluation / inference ``checkpoint_loader`` handler of the bundle;
:func:`expected_sha256` looks a file's digest up in ``large_files.yml``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from .fileio import sha256_file

__all__ = ["CHECKPOINT_NETWORK_KEY", "VerifiedCheckpointLoader", "WeightsIntegrityError", "expected_sha256"]

logger = logging.getLogger(__name__)


class WeightsIntegrityError(RuntimeError):
    """A weights file does not match the SHA-256 recorded for it, or cannot be read as a state dict."""


def expected_sha256(weights: str | os.PathLike, large_files: str | os.PathLike | None) -> str | None:
    """The SHA-256 recorded for ``weights`` in a bundle's ``large_files.yml`` (matched by resolved path), if any."""
    if large_files is None or not Path(large_files).is_file():
        return None
    from monai.bundle import ConfigParser

    listing = ConfigParser.load_config_file(str(large_files))
    root = Path(large_files).resolve().parent
    target = Path(weights).resolve()
    for entry in listing.get("large_files", []):
        if (root / str(entry.get("path", ""))).resolve() == target and entry.get("hash_val"):
            kind = str(entry.get("hash_type", "sha256")).lower()
            if kind != "sha256":
                raise WeightsIntegrityError(f"{large_files}: {entry['path']} has a {kind} hash; expected sha256.")
            return str(entry["hash_val"]).lower()
    return None


class VerifiedCheckpointLoader:
    """Load weights into the network only if their SHA-256 matches the recorded one; always ``weights_only=True``.

    The expected hash is ``sha256`` if given, else the entry of ``load_path`` in the bundle's ``large_files.yml``.
    Weights with no recorded hash (e.g. your own training run) are loaded with a warning saying so. Loading happens
    when the engine starts, before the first pair, so a refused file stops the run before any output is written.

    Args:
        load_path: weights file: a state dict (``model.pt``), a file holding one under a ``load_dict`` key, or a
            training checkpoint of the bundle (``checkpoints/checkpoint_<iteration>.pt``: its network is loaded).
        load_dict: ``{"model": network}``.
        sha256: expected hex digest (optional).
        large_files: path of ``large_files.yml`` to look the digest up in (optional).
        map_location: ``torch.load`` map location.
        strict: strict ``load_state_dict``.

    Raises:
        FileNotFoundError: no file at ``load_path``.
        WeightsIntegrityError: digest mismatch, not a loadable file, or not weights of this network (the message
            names the file).
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, torch.nn.Module],
        sha256: str | None = None,
        large_files: str | None = None,
        map_location: Any = "cpu",
        strict: bool = True,
    ) -> None:
        self.load_path, self.load_dict, self.map_location, self.strict = (
            Path(load_path),
            dict(load_dict),
            map_location,
            strict,
        )
        self.sha256 = sha256.lower() if sha256 else expected_sha256(load_path, large_files)

    def load(self) -> None:
        if not self.load_path.is_file():
            raise FileNotFoundError(
                f"{self.load_path}: no weights file (download it: python -m monai.bundle "
                "download_large_files --bundle_path <bundle>)."
            )
        if self.sha256 is None:
            logger.warning("%s: no SHA-256 recorded for these weights; loading them unverified", self.load_path)
        else:
            actual = sha256_file(self.load_path)
            if actual != self.sha256:
                raise WeightsIntegrityError(
                    f"{self.load_path}: SHA-256 {actual} does not match the recorded {self.sha256}; the file is "
                    "corrupt or has been changed, refusing to load it."
                )
        try:
            state = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        except Exception as err:
            raise WeightsIntegrityError(
                f"{self.load_path}: not a loadable weights file ({type(err).__name__}: {err})."
            ) from err
        for key, net in self.load_dict.items():
            target = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
            part = _state_part(state, key, len(self.load_dict))
            try:
                target.load_state_dict(part, strict=self.strict)
            except Exception as err:  # missing / unexpected keys, shape mismatches: another network's weights
                raise WeightsIntegrityError(
                    f"{self.load_path}: not weights of this network ({type(target).__name__}, load_dict key "
                    f"'{key}'): {type(err).__name__}: {err}"
                ) from err
        logger.info("loaded weights %s (%s)", self.load_path, "SHA-256 verified" if self.sha256 else "unverified")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.load())


#: The key under which the bundle's training checkpoints (``checkpoints/checkpoint_<iteration>.pt``) hold the network.
CHECKPOINT_NETWORK_KEY = "network"


def _state_part(state: Any, key: str, num_networks: int) -> Any:
    """The state dict for ``load_dict[key]`` in a loaded file: ``state[key]`` when the file holds one under that key,
    else, for a single network, the network of a training checkpoint (``{"network", "optimizer", "trainer"}``) or the
    file itself (a bare state dict such as ``model.pt``)."""
    if isinstance(state, Mapping):
        if isinstance(state.get(key), Mapping):
            return state[key]
        if num_networks == 1 and isinstance(state.get(CHECKPOINT_NETWORK_KEY), Mapping) and "optimizer" in state:
            return state[CHECKPOINT_NETWORK_KEY]
    return state
