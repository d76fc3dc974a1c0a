"""Fuzzing the artifact loaders: mutated artifacts, and an independent oracle of which are valid.

Each loader (``PrecisionMap.load``, ``Calibration.load``, ``ExportedModel.load``) is given artifacts
made by mutating a valid one: a JSON value replaced by a hostile one (booleans for integers, huge or
negative numbers, non-ASCII digits, trailing newlines, deep nesting, wrong containers), a key
removed or added, a list shortened, the file truncated or its bytes flipped, a tensor given NaN,
another dtype or shape.  Every case ends in one of

* ``one-line error``: a :class:`~kvcompile.errors.KvcompileError` whose message is one line;
* ``accepted valid``: loaded, and the oracle agrees the artifact is valid;
* ``invalid accepted``: loaded although the oracle finds it invalid (a loader bug);
* ``valid refused``: refused although the oracle finds it valid (a loader bug);
* ``other exception``: anything else (a loader bug).

The oracles (:func:`map_doc_problem`, ...) restate the artifact formats from their documentation,
independently of the loaders' code, so that a check missing from a loader shows up here.  Used by
``bench/fuzz.py`` (>= 1,000 cases per loader, a table) and ``tests/unit/test_fuzz.py`` (hypothesis,
a fixed budget in CI).
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

OUTCOMES = ("one-line error", "accepted valid", "invalid accepted", "valid refused", "other exception")

#: Values a mutation puts in place of a JSON value.
HOSTILE = [True, False, None, 0, 1, -1, 2, 7, 32, 10**30, 2**63, 1.5, -0.0, 1e308, "", "int4", "int4\n", "int٤",
           "nf4-g0", "int4-g7", "int4-g32", "fp16", "int2-ch", "INT4", " int4", "x" * 5000, [], {}, [[]], ["int4"],
           {"a": 1}, [1, 2, 3]]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON tree (dict keys and list indices)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate_json(doc: dict, rng: random.Random) -> dict:
    """A copy of ``doc`` with one or two random structural or value mutations."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 2))):
        paths = [p for p in _paths(doc) if p]
        path = rng.choice(paths)
        parent, key = _get(doc, path[:-1]), path[-1]
        kind = rng.random()
        if kind < 0.6:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE))
        elif kind < 0.75 and isinstance(parent, dict):
            del parent[key]
        elif kind < 0.85 and isinstance(parent, list):
            parent.pop(key) if rng.random() < 0.5 else parent.append(copy.deepcopy(parent[key]))
        elif kind < 0.9 and isinstance(parent, dict):
            parent[f"extra_{rng.randrange(100)}"] = rng.choice(HOSTILE)
        else:  # a numeric tweak of an integer: off by one, or far out
            value = parent[key]
            if type(value) is int:
                parent[key] = value + rng.choice((-1, 1, -value - 1, 10**6))
            else:
                parent[key] = copy.deepcopy(rng.choice(HOSTILE))
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Raw corruption: truncation, flipped bytes, deep nesting, huge integers, bad encodings."""
    kind = rng.randrange(5)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    if kind == 1:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        return b"[" * 50000 + b"]" * 50000
    if kind == 3:
        return data.replace(b": 1", b": 1" + b"9" * 5000, 1) if b": 1" in data else b"\xff\xfe" + data
    return b"\xff\xfe" + data


# ----------------------------------------------------------------------------- the oracles


def _int_in(value, lo, hi) -> bool:
    return type(value) is int and lo <= value <= hi


def _scheme_problem(name, head_dim: int, per_token: bool) -> str | None:
    """Why ``name`` cannot be a stored scheme for ``head_dim`` (None if it can).

    The grammar of docs/formats.md: ``fp16``, ``fp8``, ``int<2|3|4|8>[-sym][-ch][-g<G>][-s32][-rot]``,
    ``nf4[-g<G>][-nodq]`` with defaults omitted (G = 32, 16), ASCII digits, G from 1 to 65536 dividing
    the head dim for per-token groups, -rot only per token and for power-of-two head dims.
    """
    import re

    if not isinstance(name, str):
        return "not a string"
    if name in ("fp16", "fp8"):
        return None
    m = re.fullmatch(r"int([2348])(-sym)?(-ch)?(?:-g([1-9][0-9]*))?(-s32)?(-rot)?", name)
    if m:
        group = int(m[4]) if m[4] else 32
        if m[4] and group == 32:
            return "default group written out"
        if not 1 <= group <= 65536 or (m[3] and m[6]):
            return "group or -ch with -rot"
        if m[3] and per_token:
            return "per-channel scheme in a per-token class"
        if not m[3] and head_dim % group:
            return "group does not divide the head dim"
        if m[6] and head_dim & (head_dim - 1):
            return "rotation needs a power of two"
        return None  # codes are packed with padding to whole bytes, so any head dim stores
    m = re.fullmatch(r"nf4(?:-g([1-9][0-9]*))?(-nodq)?", name)
    if m:
        group = int(m[1]) if m[1] else 16
        if m[1] and group == 16:
            return "default group written out"
        return None if group <= 65536 and head_dim % group == 0 else "group does not divide the head dim"
    return "unknown name"


def map_doc_problem(doc) -> str | None:
    """Why a precision-map JSON document is invalid (None if valid), per kv/precision_map.py's format."""
    if not isinstance(doc, dict) or doc.get("artifact", "precision_map") != "precision_map":
        return "not a precision map object"
    if type(doc.get("format_version")) is not int or doc["format_version"] not in (1, 2):
        return "format_version"
    limits = {"num_layers": (1, 4096), "num_kv_heads": (1, 1024), "head_dim": (1, 4096), "sink_tokens": (0, 1 << 20),
              "recent_window": (0, 1 << 20)}
    for key, (lo, hi) in limits.items():
        if not _int_in(doc.get(key), lo, hi):
            return key
    for key in ("model", "description"):
        if key in doc and not (isinstance(doc[key], str) and len(doc[key]) <= 4096):
            return key
    if doc.get("calibration_hash") is not None and not (isinstance(doc["calibration_hash"], str)
                                                        and len(doc["calibration_hash"]) <= 128):
        return "calibration_hash"
    if "provenance" in doc and not isinstance(doc["provenance"], dict):
        return "provenance"
    ages = doc.get("age_windows", [])  # version 1 has none; version 2 without the key means none too
    if not isinstance(ages, list) or len(ages) > 6 or not all(_int_in(w, 1, 1 << 20) for w in ages):
        return "age_windows"
    classes = {"sink", "recent", "bulk", *(f"age{i}" for i in range(1, len(ages) + 1))}
    schemes = doc.get("schemes")
    if not isinstance(schemes, dict) or set(schemes) != {"key", "value"}:
        return "schemes"
    for stream in schemes.values():
        if not isinstance(stream, dict) or set(stream) != classes:
            return "schemes.stream"
        for cls, grid in stream.items():
            if not isinstance(grid, list) or len(grid) != doc["num_layers"]:
                return "grid layers"
            for row in grid:
                if not isinstance(row, list) or len(row) != doc["num_kv_heads"]:
                    return "grid heads"
                for name in row:
                    problem = _scheme_problem(name, doc["head_dim"], per_token=cls in ("sink", "recent"))
                    if problem:
                        return f"scheme {str(name)[:20]!r}: {problem}"
    ref = doc.get("predictors")
    if ref is not None:  # cross-layer predictors: a path and a content sha256; per-token, post-RoPE schemes only
        if not (isinstance(ref, dict) and set(ref) == {"path", "sha256"} and isinstance(ref["path"], str)
                and len(ref["path"]) <= 4096 and isinstance(ref["sha256"], str)
                and re.fullmatch("[0-9a-f]{64}", ref["sha256"])):
            return "predictors"
        names = {n for stream in schemes.values() for grid in stream.values() for row in grid for n in row}
        if any(_scheme_problem(n, doc["head_dim"], per_token=True) or n.endswith("-pr") for n in names):
            return "predictors need per-token schemes stored after RoPE"
    return None


def parse_strict(data: bytes):
    """The JSON value of ``data`` as the format allows it (UTF-8, no NaN/Infinity), or None."""
    def no_constants(name):
        raise ValueError(name)

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


CALIBRATION_ESTIMATORS = ("hybrid", "fisher", "attention")


def calibration_problem(doc, tensors: dict | None) -> str | None:
    """Why a calibration (its JSON document and its tensors) is invalid, per calibrate/artifact.py's format."""
    import torch

    if not isinstance(doc, dict) or doc.get("artifact", "calibration") != "calibration":
        return "not a calibration object"
    if type(doc.get("format_version")) is not int or doc["format_version"] != 1:
        return "format_version"
    g = doc.get("geometry")
    names = ("num_layers", "num_kv_heads", "num_q_heads", "head_dim", "max_positions")
    if not isinstance(g, dict) or set(g) != set(names):
        return "geometry"
    for key, hi in zip(names, (4096, 1024, 65536, 4096, 1 << 24)):
        if not _int_in(g[key], 1, hi):
            return f"geometry.{key}"
    if not _int_in(doc.get("windows"), 1, 1 << 16) or not _int_in(doc.get("window"), 2, 1 << 20):
        return "windows/window"
    for key in ("model", "text", "cost_unit"):
        if not (isinstance(doc.get(key), str) and len(doc[key]) <= 4096):
            return key
    if doc.get("estimator") not in CALIBRATION_ESTIMATORS:
        return "estimator"
    schemes = doc.get("schemes")
    if not isinstance(schemes, list) or not schemes or len(set(map(str, schemes))) != len(schemes):
        return "schemes"
    for name in schemes:
        if _scheme_problem(name, g["head_dim"], per_token=False):
            return f"scheme {str(name)[:20]!r}"
    options = {}
    for key in ("sink_options", "window_options"):
        values = doc.get(key)
        if not isinstance(values, list) or not values or not all(_int_in(v, 0, 1 << 20) for v in values) \
                or len(set(values)) != len(values):
            return key
        options[key] = values
    seconds = doc.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
        return "seconds"
    if not isinstance(doc.get("extra", {}), dict):
        return "extra"
    if tensors is None:
        return "tensors unreadable"
    shapes = {"cost": (g["num_layers"], g["num_kv_heads"], 2, len(schemes), len(options["window_options"]),
                       len(options["sink_options"])),
              "curvature": (g["num_layers"], g["num_kv_heads"], 2, len(options["window_options"])),
              "diameter": (g["num_layers"], g["num_kv_heads"], 2), "correction": (len(schemes),)}
    for key, shape in shapes.items():
        t = tensors.get(key)
        if t is None and key == "correction":
            continue
        if t is None or t.dtype not in (torch.float32, torch.float64) or tuple(t.shape) != shape:
            return f"tensor {key}"
        if not torch.isfinite(t).all() or (t < 0).any():
            return f"tensor {key} values"
    return None


def _same_json(a, b) -> bool:
    """Equal as JSON values, with booleans distinct from integers (``True == 1`` in Python)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def export_manifest_problem(doc, original: dict) -> str | None:
    """Why an export manifest is invalid for the export directory that ``original`` describes.

    Per export/onnx_export.py's format (version 2): ``model``, ``model_type``, ``kvcompile_version``
    are free strings and unknown keys are ignored (in the embedded map too); the map, its hash, the
    cache layout, the file record, the context and the vocabulary must be those of the files on disk
    (here: the original's); the geometry must have its five positive integers, agree with the map,
    and admit the context; ``targets`` holds an ``onnx`` section, and each section's files are on disk
    at their recorded sizes.
    """
    if not isinstance(doc, dict) or doc.get("artifact", "onnx_export") != "onnx_export":
        return "not an export manifest"
    if type(doc.get("format_version")) is not int or doc["format_version"] != 2:
        return "format_version"
    for key in ("model", "model_type", "kvcompile_version"):
        if not isinstance(doc.get(key), str):
            return key
    for key in ("precision_map_hash", "cache_layout", "files", "max_context", "vocab_size"):
        if key not in doc or type(doc[key]) is not type(original[key]) or doc[key] != original[key]:
            return key
    body = doc.get("precision_map")  # the map's own fields must be the original's; unknown keys are ignored
    if not isinstance(body, dict) or any(k not in body or not _same_json(body[k], v)
                                         for k, v in original["precision_map"].items()):
        return "precision_map"
    g, g0 = doc.get("geometry"), original["geometry"]
    limits = {"num_layers": 4096, "num_kv_heads": 1024, "num_q_heads": 65536, "head_dim": 4096, "max_positions": 1 << 24}
    if not isinstance(g, dict) or set(g) != set(limits) or not all(_int_in(g[k], 1, hi) for k, hi in limits.items()):
        return "geometry"
    if any(g[k] != g0[k] for k in ("num_layers", "num_kv_heads", "head_dim")) or g["max_positions"] < doc["max_context"]:
        return "geometry vs map or context"
    # targets: an object with an "onnx" section; every section an object whose "files" map plain
    # names to the byte counts of files on disk (here: those the original records); other keys are free
    on_disk = {**original["files"]["sizes"], **{f: n for sec in original["targets"].values() for f, n in sec["files"].items()}}
    targets = doc.get("targets")
    if not isinstance(targets, dict) or "onnx" not in targets:
        return "targets"
    for section in targets.values():
        files = section.get("files") if isinstance(section, dict) else None
        if not isinstance(files, dict) or any(
                not name or "/" in name or name.startswith(".") or type(size) is not int or on_disk.get(name) != size
                for name, size in files.items()):
            return "target section"
    return None


# ----------------------------------------------------------------------------- running a loader


def classify(load: Callable[[], Any], problem: str | None) -> tuple[str, str]:
    """Run ``load``; return (outcome, detail) given the oracle's verdict ``problem``."""
    from kvcompile.errors import KvcompileError

    try:
        load()
    except KvcompileError as e:
        if "\n" in str(e):
            return "other exception", f"multi-line error: {str(e)[:80]}"
        return ("valid refused", str(e)[:120]) if problem is None else ("one-line error", str(e)[:120])
    except RecursionError:
        return "other exception", "RecursionError"
    except Exception as e:  # noqa: BLE001 - the point is to count these
        return "other exception", f"{type(e).__name__}: {str(e)[:100]}"
    return ("accepted valid", "") if problem is None else ("invalid accepted", problem)


def write_case(path: Path, doc_or_bytes) -> None:
    path.write_bytes(doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode())
