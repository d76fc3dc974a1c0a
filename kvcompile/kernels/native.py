"""The native CPU library (``native/``, C++): locate it, register it with ONNX Runtime, ask it things.

``libkvcompile_ort.so`` implements ``kvcompile::KVAttention`` for ONNX Runtime's CPU execution
provider, against the ONNX Runtime C API only.  ``./install.sh`` builds it with CMake into
``kvcompile/_native/``.  When it is registered in a session (:func:`register`), ONNX Runtime runs it
in place of KVAttention's ONNX function body; without it the same ``model.onnx`` runs the body.

Environment: ``KVCOMPILE_NATIVE_LIBRARY`` = a library path to use instead of the installed one;
``KVCOMPILE_NATIVE=0`` = never register it (the function bodies run).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from kvcompile.errors import KvcompileError

LIBRARY_NAME = "libkvcompile_ort.so"
INSTALLED = Path(__file__).resolve().parent.parent / "_native" / LIBRARY_NAME
BUILD_HINT = "build it with ./install.sh (or: cmake -S native -B build/native && cmake --build build/native && " \
             "cmake --install build/native)"


def library_path() -> Path | None:
    """The library to load: ``KVCOMPILE_NATIVE_LIBRARY`` if set, else the installed one; None if absent."""
    override = os.environ.get("KVCOMPILE_NATIVE_LIBRARY")
    path = Path(override) if override else INSTALLED
    return path if path.is_file() else None


def enabled() -> bool:
    """Whether runtimes register the library by default (it exists and ``KVCOMPILE_NATIVE`` is not 0)."""
    return os.environ.get("KVCOMPILE_NATIVE", "1") != "0" and library_path() is not None


def require_library() -> Path:
    """The library's path, or one :class:`KvcompileError` line saying how to build it."""
    path = library_path()
    if path is None:
        where = os.environ.get("KVCOMPILE_NATIVE_LIBRARY") or INSTALLED
        raise KvcompileError(f"the native kvcompile library is missing (expected {where}); {BUILD_HINT}")
    return path


def register(session_options) -> Path:
    """Register the library in ONNX Runtime ``SessionOptions``; returns its path."""
    path = require_library()
    session_options.register_custom_ops_library(str(path))
    return path


@functools.lru_cache(maxsize=1)
def _handle() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(require_library()))
    lib.kvc_describe_scheme.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                                        ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
    lib.kvc_describe_scheme.restype = ctypes.c_int
    lib.kvc_nf4_codebook.argtypes = [ctypes.POINTER(ctypes.c_float)]
    return lib


def describe_scheme(name: str, head_dim: int) -> tuple[dict, list[tuple[int, int, int]]] | str:
    """How the library reads scheme ``name``: ``({field: int}, [(bytes, width, rows_per) per part])``
    over :data:`kvcompile.quant.base.NATIVE_FIELDS`, or its one-line reason for refusing it."""
    from kvcompile.quant.base import NATIVE_FIELDS

    fields = (ctypes.c_int64 * 8)()
    parts = (ctypes.c_int64 * 16)()
    error = ctypes.create_string_buffer(256)
    n = _handle().kvc_describe_scheme(name.encode(), head_dim, fields, parts, error, len(error))
    if n < 0:
        return error.value.decode()
    return dict(zip(NATIVE_FIELDS, fields)), [tuple(parts[4 * i: 4 * i + 3]) for i in range(n)]


def e4m3_bytes(y) -> "numpy.ndarray":
    """The library's E4M3 bytes (uint8) of float32 values ``y`` (|y| <= 448)."""
    import numpy as np

    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.zeros(y.shape, np.uint8)
    lib = _handle()
    lib.kvc_e4m3_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.kvc_e4m3_bytes(y.ctypes.data, y.size, out.ctypes.data)
    return out


def lloyd_codebook(bits: int, group: int, centred: bool = False) -> list[float] | None:
    """The library's ``2^bits`` levels for ``lm<bits>-g<group>`` (``centred``: ``lm<bits>-ch-g<group>``);
    None when it has no codebook for them."""
    lib = _handle()
    lib.kvc_lloyd_codebook.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    out = (ctypes.c_float * 16)()
    n = lib.kvc_lloyd_codebook(bits, group, int(centred), out)
    return None if n < 0 else list(out[:n])


def nf4_codebook() -> list[float]:
    """The library's 16 NF4 levels."""
    out = (ctypes.c_float * 16)()
    _handle().kvc_nf4_codebook(out)
    return list(out)
