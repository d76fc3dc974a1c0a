"""Versioned, atomic saving and loading of JSON artifacts.

Every artifact file carries ``format_version`` (the schema of that artifact kind) and
``kvcompile_version`` (the producer).  Writes go to a temporary file in the same directory and are
renamed into place, so a crash never leaves a half-written artifact behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvcompile.errors import ArtifactError
from kvcompile.version import __version__


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open()`` / ``mkdir()`` would give under the current umask
    (``mkstemp`` / ``mkdtemp`` use 0600 / 0700, too strict for shared artifacts)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + rename (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json_artifact(path: str | os.PathLike, kind: str, format_version: int, body: dict[str, Any]) -> None:
    """Save ``body`` as a ``kind`` artifact with version headers, atomically."""
    doc = {"artifact": kind, "format_version": format_version, "kvcompile_version": __version__, **body}
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode())


def load_json_artifact(path: str | os.PathLike, kind: str, format_version: int) -> dict[str, Any]:
    """Load a ``kind`` artifact, checking its headers; any problem is one ``ArtifactError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{kind} file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a JSON {kind} ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: expected a JSON object for a {kind}, got {type(doc).__name__}")
    if doc.get("artifact", kind) != kind:
        raise ArtifactError(f"{path}: expected a {kind} artifact, found {doc.get('artifact')!r}")
    version = doc.get("format_version")
    if version != format_version:
        raise ArtifactError(f"{path}: {kind} format_version {version!r} is not supported (expected {format_version})")
    return doc
