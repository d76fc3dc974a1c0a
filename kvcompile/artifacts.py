"""Versioned, atomic saving and loading of artifacts.

Every artifact file carries ``format_version`` (the schema of that artifact kind) and
``kvcompile_version`` (the producer).  Writes go to a temporary file in the same directory and are
renamed into place, so a crash never leaves a half-written artifact behind.  A directory artifact
(calibration, export, engine, report) is written into a staging directory beside it and swapped in
whole by :func:`staged_directory`: a kill at any point leaves the old artifact or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; expected a file path to write")
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


#: Largest JSON artifact read (a 4096-layer map is well under 1 MiB): a bigger file is refused unread.
MAX_JSON_BYTES = 64 * 2**20


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_json_artifact(path: str | os.PathLike, kind: str, format_version: int | tuple[int, ...]) -> dict[str, Any]:
    """Load a ``kind`` artifact, checking its headers; any problem is one ``ArtifactError`` line.

    ``format_version``: the version this kvcompile writes, or every version it reads."""
    path = Path(path)
    shown = str(path) if len(str(path)) <= 120 else str(path)[:117] + "..."
    try:
        if not path.is_file():
            raise ArtifactError(f"{kind} file not found: {shown}")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ArtifactError(f"{shown}: {size} bytes is more than a {kind} can be (at most {MAX_JSON_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{kind} file {shown} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError; so are 5,000-digit integers
        raise ArtifactError(f"{shown}: not a JSON {kind} ({str(e).splitlines()[0][:160]})") from None
    except RecursionError:
        raise ArtifactError(f"{shown}: not a {kind}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{shown}: expected a JSON object for a {kind}, got {type(doc).__name__}")
    if doc.get("artifact", kind) != kind:
        raise ArtifactError(f"{shown}: expected a {kind} artifact, found {str(doc.get('artifact'))[:40]!r}")
    version = doc.get("format_version")
    accepted = format_version if isinstance(format_version, tuple) else (format_version,)
    if type(version) is not int or version not in accepted:
        expected = " or ".join(map(str, accepted))
        raise ArtifactError(f"{shown}: {kind} format_version {repr(version)[:20]} is not supported (expected {expected})")
    return doc


# ----------------------------------------------------------------------------- directory artifacts

STAGING_SUFFIX = ".staging"


def _staging_prefix(out: Path) -> str:
    return f".{out.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories beside ``out`` left by runs that were killed; returns them.

    A staging directory is ``.<name>.<pid>.<random>.staging``: it is stale when that process no
    longer exists.  If ``out`` itself is missing and a stale directory holds the previous artifact
    (a kill between the two renames of a swap without atomic exchange), that artifact is put back.
    """
    removed = []
    for path in sorted(out.parent.glob(f"{_staging_prefix(out)}*{STAGING_SUFFIX}")):
        try:
            pid = int(path.name[len(_staging_prefix(out)):].split(".")[0])
        except ValueError:
            continue
        if _pid_alive(pid):
            continue
        previous = path / "previous"
        if not out.exists() and previous.is_dir():
            os.replace(previous, out)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # EINVAL / ENOSYS: filesystem or kernel without exchange


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, is_ours: Callable[[Path], bool] | None = None,
                     what: str = "artifact") -> Iterator[Path]:
    """Write a directory artifact: yields an empty directory to fill; on success it becomes ``out``.

    An existing ``out`` is replaced only if ``is_ours(out)`` (default: any directory); otherwise a
    one-line :class:`ArtifactError` is raised before anything is written.  The new content is
    swapped in with one atomic exchange where the OS has one (then the old one is deleted), else
    with two renames, the old one kept inside the staging directory until the new one is in place.
    Stale staging directories of killed runs are removed first (:func:`remove_stale_staging`).
    On any exception the staging directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (is_ours is not None and not is_ours(out))):
        raise ArtifactError(f"{out} exists and is not a kvcompile {what} directory; expected a new or {what} directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}.", suffix=STAGING_SUFFIX, dir=out.parent))
    try:
        content = staging / "content"
        content.mkdir()
        yield content
        for p in [content, *content.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, default_mode(directory=p.is_dir()))
        if not out.exists():
            os.replace(content, out)
        elif not _exchange(content, out):
            os.replace(out, staging / "previous")
            os.replace(content, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
