"""The compiled TensorRT plugin library, ``libkvcompile_trt.so`` (``plugins/``, C++).

It holds the ``KVAttention`` plugin (``IPluginV3``, namespace ``kvcompile``, version 1) with its
GPU kernels embedded as a fat binary (cubins for SM 80/86/89/90/120 and PTX), launched through the
CUDA driver API opened at run time.  It links nothing from TensorRT or CUDA, so it loads on a
CPU-only build machine; ``kvcompile export --target trt`` registers it in the build process and
embeds it in the engine (``plugins_to_serialize``), so trtexec, Triton Inference Server and C++
applications load the engine without Python.

Besides the TensorRT entry points (``getCreators``, ``setLoggerFinder``) the library exports a
small C API over its host logic, wrapped here by :class:`HostApi` for the tests: the plugin's
ports, output shapes, workspace size, format support, field round trip, and a CPU run of the GPU
kernels' block programs (:meth:`HostApi.emulate`), the same source nvcc compiles.

The library is found at ``$KVCOMPILE_TRT_PLUGIN_LIBRARY`` or ``kvcompile/_native/libkvcompile_trt.so``
(built by ``install.sh``: ``cmake -S plugins -B build/plugins``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from kvcompile.errors import ExportError

LIBRARY_NAME = "libkvcompile_trt.so"
ENV = "KVCOMPILE_TRT_PLUGIN_LIBRARY"
BUILD_HINT = ("build it with `cmake -S plugins -B build/plugins && cmake --build build/plugins && "
              "cmake --install build/plugins` (install.sh does this; it needs nvcc and the TensorRT headers)")
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "KVAttention", "1", "kvcompile"
#: the element bytes of the plugin's ports -> numpy dtypes
DTYPES = {4: np.float32, 2: np.float16, 1: np.int8}


def library_path() -> Path | None:
    """The plugin library to use, or None when it is not built."""
    override = os.environ.get(ENV)
    if override:
        return Path(override)
    path = Path(__file__).resolve().parents[2] / "_native" / LIBRARY_NAME
    return path if path.exists() else None


def require_library() -> Path:
    """:func:`library_path`, or one ExportError line saying how to build it."""
    path = library_path()
    if path is None:
        raise ExportError(f"the TensorRT plugin library {LIBRARY_NAME} is not built; {BUILD_HINT}")
    if not path.is_file():
        raise ExportError(f"the TensorRT plugin library {path} (from ${ENV}) does not exist; expected a built "
                          f"{LIBRARY_NAME}")
    return path


def attribute_text(attrs: dict) -> bytes:
    """KVAttention attributes as the host API's ``name=value`` lines."""
    lines = []
    for name, value in attrs.items():
        lines.append(f"{name}={float(value)!r}" if name == "scale" else f"{name}={value}")
    return ("\n".join(lines) + "\n").encode()


class HostApi:
    """ctypes view of the library's host C API (no TensorRT, no GPU)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else require_library()
        lib = self.lib = ctypes.CDLL(str(self.path))
        i64p = ctypes.POINTER(ctypes.c_int64)
        lib.kvc_trt_io.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                   ctypes.c_char_p, ctypes.c_int]
        lib.kvc_trt_output_dims.argtypes = [ctypes.c_char_p, ctypes.c_int, i64p, i64p, ctypes.c_char_p, ctypes.c_int]
        lib.kvc_trt_workspace_size.argtypes = [ctypes.c_char_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]
        lib.kvc_trt_workspace_size.restype = ctypes.c_int64
        lib.kvc_trt_supports.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.kvc_trt_field_roundtrip.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                                ctypes.c_int]
        lib.kvc_trt_emulate.argtypes = [ctypes.c_char_p, ctypes.c_int, i64p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
        lib.kvc_trt_enqueue.argtypes = [ctypes.c_char_p, ctypes.c_int, i64p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.kvc_trt_fatbin.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
        lib.kvc_trt_fatbin.restype = ctypes.c_void_p
        lib.kvc_trt_params_size.restype = ctypes.c_size_t

    @staticmethod
    def _check(rc: int, error) -> None:
        if rc != 0:
            raise ValueError(error.value.decode())

    def io(self, attrs: dict) -> tuple[list[int], list[int]]:
        """Element bytes of the plugin's inputs and outputs."""
        n_in, n_out = ctypes.c_int(), ctypes.c_int()
        ins, outs, error = (ctypes.c_int * 256)(), (ctypes.c_int * 256)(), ctypes.create_string_buffer(512)
        self._check(self.lib.kvc_trt_io(attribute_text(attrs), n_in, ins, n_out, outs, 256, error, 512), error)
        return list(ins[:n_in.value]), list(outs[:n_out.value])

    def output_dims(self, attrs: dict, in_dims: list) -> list[tuple[int, ...]]:
        n_out = len(self.io(attrs)[1])
        flat = (ctypes.c_int64 * (4 * len(in_dims)))(*[int(v) for d in in_dims for v in d])
        out, error = (ctypes.c_int64 * (4 * n_out))(), ctypes.create_string_buffer(512)
        self._check(self.lib.kvc_trt_output_dims(attribute_text(attrs), len(in_dims), flat, out, error, 512), error)
        return [tuple(out[4 * i:4 * i + 4]) for i in range(n_out)]

    def workspace_size(self, attrs: dict, batch: int, heads: int, added: int, total: int, exact: bool = False) -> int:
        """The plugin's workspace for calls up to these dimensions (getWorkspaceSize), or with
        ``exact`` what one call of exactly these dimensions uses."""
        return int(self.lib.kvc_trt_workspace_size(attribute_text(attrs), batch, heads, added, total, int(exact)))

    def supports(self, attrs: dict, pos: int, element_bytes: int, linear: bool = True) -> bool:
        return bool(self.lib.kvc_trt_supports(attribute_text(attrs), pos, element_bytes, int(linear)))

    def field_roundtrip(self, attrs: dict) -> str:
        out, error = ctypes.create_string_buffer(8192), ctypes.create_string_buffer(512)
        self._check(self.lib.kvc_trt_field_roundtrip(attribute_text(attrs), out, 8192, error, 512), error)
        return out.value.decode()

    def emulate(self, attrs: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the GPU kernels' block programs on the CPU; returns the output and the present parts."""
        in_bytes, out_bytes = self.io(attrs)
        inputs = [np.ascontiguousarray(a, dtype=DTYPES[b]) for a, b in zip(inputs, in_bytes)]
        dims = self.output_dims(attrs, [a.shape for a in inputs])
        outputs = [np.zeros(d, DTYPES[b]) for d, b in zip(dims, out_bytes)]
        flat = (ctypes.c_int64 * (4 * len(inputs)))(*[int(v) for a in inputs for v in a.shape])
        in_ptrs = (ctypes.c_void_p * len(inputs))(*[a.ctypes.data for a in inputs])
        out_ptrs = (ctypes.c_void_p * len(outputs))(*[a.ctypes.data for a in outputs])
        error = ctypes.create_string_buffer(512)
        self._check(self.lib.kvc_trt_emulate(attribute_text(attrs), len(inputs), flat, in_ptrs, out_ptrs, error, 512),
                    error)
        return outputs

    def enqueue_on_gpu(self, attrs: dict, inputs: list, outputs: list, workspace, stream: int = 0) -> None:
        """The plugin's enqueue on CUDA torch tensors (outputs allocated by the caller, shaped by
        :meth:`output_dims`; ``workspace`` a uint8 tensor of :meth:`workspace_size` bytes), without
        TensorRT: the kernels the engine runs, launched through the CUDA driver API."""
        flat = (ctypes.c_int64 * (4 * len(inputs)))(*[int(v) for a in inputs for v in a.shape])
        in_ptrs = (ctypes.c_void_p * len(inputs))(*[a.data_ptr() for a in inputs])
        out_ptrs = (ctypes.c_void_p * len(outputs))(*[a.data_ptr() for a in outputs])
        error = ctypes.create_string_buffer(512)
        self._check(self.lib.kvc_trt_enqueue(attribute_text(attrs), len(inputs), flat, in_ptrs, out_ptrs,
                                             workspace.data_ptr(), workspace.numel(), stream, error, 512), error)

    def fatbin(self) -> bytes:
        """The embedded fat binary (the kernels' cubins and PTX)."""
        size = ctypes.c_size_t()
        address = self.lib.kvc_trt_fatbin(ctypes.byref(size))
        return ctypes.string_at(address, size.value)

    def params_size(self) -> int:
        """sizeof the kernels' parameter struct on the host (each kernel takes one, by value)."""
        return int(self.lib.kvc_trt_params_size())
