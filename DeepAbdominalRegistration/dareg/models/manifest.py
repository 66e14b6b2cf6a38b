"""SHA-256 manifest of a model folder: detect corrupted or tampered model files before using them.

The manifest is an integrity check (truncated downloads, flipped bits, edited files), not a
signature: whoever can rewrite the weights can rewrite the manifest too. It is verified BEFORE
anything else in the folder is parsed, so a damaged file is reported as such rather than as an
obscure HDF5 or JSON error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import DaregError

MANIFEST_FILE = "manifest.json"
_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights files are up to ~340 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, names: list[str]) -> None:
    """Write ``folder/manifest.json`` with the SHA-256 of each named file of ``folder``."""
    files = {name: sha256_file(Path(folder) / name) for name in sorted(names)}
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=2, sort_keys=True) + "\n"
    (Path(folder) / MANIFEST_FILE).write_text(text, encoding="utf-8")


def _corrupted(folder: Path, problem: str) -> DaregError:
    return DaregError(
        f"Model folder {folder} is corrupted or has been tampered with: {problem}. "
        "Re-download the model (for a bundled model: reinstall dareg) or re-train it."
    )


def _read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise _corrupted(folder, f"{MANIFEST_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupted(folder, f"{MANIFEST_FILE} cannot be read ({error})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("algorithm") != "sha256":
        raise _corrupted(folder, f"{MANIFEST_FILE} does not list sha256 checksums")
    return files


def verify_manifest(folder: Path, required: list[str]) -> None:
    """Check that every ``required`` file is listed, present and matches its SHA-256; DaregError if not.

    Only the required names are ever opened, so a manifest cannot point the loader at other paths.
    """
    folder = Path(folder)
    files = _read_manifest(folder)
    for name in required:
        if name not in files:
            raise _corrupted(folder, f"{MANIFEST_FILE} has no checksum for {name}")
        path = folder / name
        if not path.is_file():
            raise _corrupted(folder, f"{name} is missing")
        if sha256_file(path) != files[name]:
            raise _corrupted(folder, f"the checksum of {name} does not match {MANIFEST_FILE}")
