"""Release tooling: record the weights' URL and SHA-256 in ``large_files.yml`` and pack the bundle zip that
``python -m monai.bundle download --url ...`` expects (one top-level folder named after the bundle).

The zip carries this package's code as ``<bundle>/custom_nets/``: ``ConfigWorkflow.run`` puts the bundle root on
``sys.path``, and the configs import the package when they run (``"custom_nets": "$importlib.import_module(...)"``,
``_target_`` paths), so a downloaded bundle runs in a venv that has only the packages ``metadata.json`` names."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .fileio import atomic_write, sha256_file
from .version import __version__

__all__ = ["write_large_files", "refresh_large_files", "listed_large_files", "pack_bundle", "BUNDLE_NAME"]

#: The bundle's folder name inside the release zip (and its name for ``monai.bundle download --name``).
BUNDLE_NAME = "keymorph_brain_registration"

#: The package the zip carries (the configs' ``_target_`` paths and ``importlib.import_module`` name it).
PACKAGE = "custom_nets"

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


def listed_large_files(bundle_dir: str | Path) -> list[dict[str, str]]:
    """The entries (``path``, ``url``, ``hash_val``, ...) of ``<bundle_dir>/large_files.yml``.

    Raises:
        FileNotFoundError / ValueError: no such file, or no ``large_files`` list in it (the file named)."""
    import yaml

    listing = Path(bundle_dir) / "large_files.yml"
    content = yaml.safe_load(listing.read_text())
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise ValueError(f"{listing}: expected a 'large_files' list of entries with a 'path'.")
    return entries


def refresh_large_files(bundle_dir: str | Path) -> Path:
    """Recompute the SHA-256 of every file ``<bundle_dir>/large_files.yml`` lists, in place: each entry keeps its
    URL, and the file its comments (only the ``hash_val`` lines change).

    Raises:
        FileNotFoundError: a listed file is missing (named)."""
    bundle = Path(bundle_dir)
    listing = bundle / "large_files.yml"
    text = listing.read_text()
    for entry in listed_large_files(bundle):
        path = bundle / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {listing} but missing.")
        old = f'hash_val: "{entry["hash_val"]}"'
        if text.count(old) != 1:
            raise ValueError(f"{listing}: expected one line {old!r} for {entry['path']}.")
        text = text.replace(old, f'hash_val: "{sha256_file(path)}"')
    return atomic_write(listing, lambda tmp: Path(tmp).write_text(text))


def pack_bundle(
    bundle_dir: str | Path, out_dir: str | Path, name: str = BUNDLE_NAME, include_weights: bool = True
) -> Path:
    """Zip the bundle as ``<out_dir>/<name>_v<version>.zip`` with everything under ``<name>/``, and this package's
    code under ``<name>/custom_nets/`` (sources only).

    ``include_weights=False`` leaves out the files listed in ``large_files.yml`` (users fetch them with
    ``download_large_files``). The version comes from ``configs/metadata.json``; it must be this package's version,
    since the zip carries this package.

    Raises:
        ValueError: the bundle's version and the package's differ, or the bundle holds its own ``custom_nets``.
    """
    bundle = Path(bundle_dir)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    skip: set[Path] = set()
    if not include_weights and (bundle / "large_files.yml").is_file():
        from monai.bundle import ConfigParser

        listing = ConfigParser.load_config_file(str(bundle / "large_files.yml"))
        skip = {(bundle / e["path"]).resolve() for e in listing.get("large_files", [])}
    if meta["version"] != __version__:
        raise ValueError(
            f"{bundle / 'configs' / 'metadata.json'}: bundle version {meta['version']} but custom_nets {__version__}; "
            "the zip carries the package, so the two must match."
        )
    if (bundle / PACKAGE).exists():
        raise ValueError(f"{bundle / PACKAGE}: the bundle folder holds its own copy of the package; remove it.")
    package = Path(__file__).resolve().parent
    target = Path(out_dir) / f"{name}_v{meta['version']}.zip"

    def files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
        return [
            p
            for p in sorted(root.rglob("*"))
            if p.is_file()
            and not set(p.relative_to(root).parts) & _EXCLUDE_DIRS
            and not p.name.startswith(".tmp-")
            and p.suffix not in (".pyc", ".ts")
            and (suffixes is None or p.suffix in suffixes)
        ]

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in files(bundle, None):
                if path.resolve() not in skip:
                    zf.write(path, str(Path(name) / path.relative_to(bundle)))
            for path in files(package, (".py", ".typed")):
                zf.write(path, str(Path(name) / PACKAGE / path.relative_to(package)))

    return atomic_write(target, write)
