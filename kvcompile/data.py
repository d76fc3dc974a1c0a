"""Calibration and evaluation text shipped in ``calibration_data/``, verified against its manifest.

``load_text("wikipedia-heldout")`` returns the text of a shipped file after checking its sha256
against ``calibration_data/MANIFEST.json``; any other argument is read as a path to a UTF-8 text
file.  ``$KVCOMPILE_DATA`` overrides the data directory.  Shipped texts (see the manifest for
source, licence and attribution):

* ``wikipedia-calibration``: 1,000 English Wikipedia vital-article summaries (CC BY-SA 4.0), ~111k tokens;
* ``wikipedia-heldout``: 1,000 *other* articles from the same collection, ~113k tokens;
* ``gutenberg-shakespeare``: four Shakespeare plays + the 1911 Britannica entry (public domain), ~263k tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvcompile.errors import DataError

DEFAULT_CALIBRATION_TEXT = "wikipedia-calibration"
DEFAULT_EVAL_TEXT = "wikipedia-heldout"


def data_dir() -> Path:
    env = os.environ.get("KVCOMPILE_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "calibration_data"


def manifest() -> dict[str, dict]:
    path = data_dir() / "MANIFEST.json"
    if not path.is_file():
        raise DataError(f"calibration data manifest not found at {path}; set KVCOMPILE_DATA to the calibration_data directory")
    return {Path(e["file"]).stem: e for e in json.loads(path.read_text())["files"]}


def shipped_texts() -> list[str]:
    return sorted(manifest())


def load_text(name_or_path: str) -> str:
    """Text of a shipped file (checksum-verified) or of a UTF-8 file path."""
    entries = manifest() if not Path(name_or_path).is_file() else {}
    if name_or_path in entries:
        entry = entries[name_or_path]
        data = (data_dir() / entry["file"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise DataError(f"{entry['file']}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...; "
                            "the file was modified (rebuild with calibration_data/build.py)")
        return data.decode("utf-8")
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"text {name_or_path!r} not found: expected a file path or one of {', '.join(shipped_texts())}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
