"""Release tooling: record the weights' URL and SHA-256 in ``large_files.yml`` and pack the bundle zip that
``python -m monai.bundle download --url ...`` expects (one top-level folder named after the bundle)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_write, sha256_file

__all__ = ["write_large_files", "pack_bundle", "BUNDLE_NAME"]

#: The bundle's folder name inside the release zip (and its name for ``monai.bundle download --name``).
BUNDLE_NAME = "keymorph_brain_registration"

#: What a release zip leaves out: large files users fetch with ``download_large_files``, and run outputs.
_EXCLUDE_DIRS = {"runs", "eval", "__pycache__", ".ipynb_checkpoints"}


def write_large_files(bundle_dir: str | Path, url_base: str, files: Sequence[str] = ("models/model.pt",)) -> Path:
    """Write ``<bundle_dir>/large_files.yml``: for each file (relative to the bundle), its download URL
    (``<url_base>/<file name>``) and SHA-256, in the format ``monai.bundle download_large_files`` reads."""
    bundle = Path(bundle_dir)
    lines = ["large_files:"]
    for rel in files:
        path = bundle / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file to list in large_files.yml.")
        lines += [
            f'  - path: "{rel}"',
            f'    url: "{url_base.rstrip("/")}/{Path(rel).name}"',
            f'    hash_val: "{sha256_file(path)}"',
            '    hash_type: "sha256"',
        ]
    target = bundle / "large_files.yml"
    text = "\n".join(lines) + "\n"
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def pack_bundle(
    bundle_dir: str | Path, out_dir: str | Path, name: str = BUNDLE_NAME, include_weights: bool = True
) -> Path:
    """Zip the bundle as ``<out_dir>/<name>_v<version>.zip`` with everything under ``<name>/``.

    ``include_weights=False`` leaves out the files listed in ``large_files.yml`` (users fetch them with
    ``download_large_files``). The version comes from ``configs/metadata.json``.
    """
    bundle = Path(bundle_dir)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    skip: set[Path] = set()
    if not include_weights and (bundle / "large_files.yml").is_file():
        from monai.bundle import ConfigParser

        listing = ConfigParser.load_config_file(str(bundle / "large_files.yml"))
        skip = {(bundle / e["path"]).resolve() for e in listing.get("large_files", [])}
    target = Path(out_dir) / f"{name}_v{meta['version']}.zip"

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(bundle.rglob("*")):
                rel = path.relative_to(bundle)
                if path.is_dir() or set(rel.parts) & _EXCLUDE_DIRS or path.resolve() in skip:
                    continue
                if path.name.startswith(".tmp-") or path.suffix in (".pyc", ".ts"):
                    continue
                zf.write(path, str(Path(name) / rel))

    return atomic_write(target, write)
