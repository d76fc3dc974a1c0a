"""TensorRT backend: runs ``model.engine`` of a ``--target trt`` export through polygraphy's TrtRunner.

Needs an NVIDIA GPU that the installed TensorRT can run on (TensorRT-RTX: RTX-class GPUs only),
the kvcompile plugins registered in this process, and ``libtensorrt_rtx.so`` resolvable at
process start (see :mod:`kvcompile.targets.trt.build`).  Where any of that is missing,
opening the backend fails with one line saying which.  Not run in this project's CI or on its
lent GPU (an H100: not RTX-class; full TensorRT is not installable here): see docs/deploy.md.
"""

from __future__ import annotations

import ctypes.util

import numpy as np

from kvcompile.errors import RuntimeBackendError
from kvcompile.runtime import check_context, check_finite, register_backend


def why_not_runnable(export) -> str | None:
    """One line on why the engine cannot run here, or None."""
    from kvcompile.targets.trt.loader import find_tensorrt

    if not export.trt:
        return f"{export.path} has no TensorRT engine; export it with --target trt"
    flavour = find_tensorrt(export.trt.get("tensorrt"))
    if flavour is None:
        return "TensorRT is not installed (pip install tensorrt-rtx, or tensorrt)"
    import torch

    if not torch.cuda.is_available():
        return f"the engine needs an NVIDIA GPU ({'RTX-class for TensorRT-RTX' if flavour == 'tensorrt_rtx' else 'CUDA'}); none is visible here"
    if flavour == "tensorrt_rtx" and ctypes.util.find_library("tensorrt_rtx") is None:
        return ("libtensorrt_rtx.so does not resolve in this process; start it with LD_LIBRARY_PATH including "
                "kvcompile's trt-libs directory (see docs/deploy.md)")
    return None


class TrtDecoder:
    def __init__(self, export, **_):
        reason = why_not_runnable(export)
        if reason:
            raise RuntimeBackendError(f"the trt backend cannot run here: {reason}")
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from kvcompile.targets.trt.plugin import register_plugins
        from kvcompile.targets.trt.loader import import_tensorrt

        register_plugins(import_tensorrt(export.trt.get("tensorrt")))
        self.export = export
        self.runner = TrtRunner(EngineFromBytes((export.path / export.trt["engine"]).read_bytes()))
        self.runner.activate()
        self.ports = [p for g in export.groups for p in g.ports]
        self.heads = {p.past: len(g.heads) for g in export.groups for p in g.ports}

    def start(self, batch: int):
        from kvcompile.runtime.ort_backend import NUMPY_DTYPES

        return {"past": {p.past: np.zeros((batch, self.heads[p.past], 0, p.width), NUMPY_DTYPES[p.dtype])
                         for p in self.ports}, "length": 0}

    def step(self, ids: np.ndarray, state):
        check_context(self.export, state["length"] + ids.shape[1])
        out = self.runner.infer({"input_ids": ids, **state["past"]}, copy_outputs_to_host=True)
        check_finite(out["logits"], "tensorrt")
        return out["logits"], {"past": {p.past: out[p.present] for p in self.ports},
                               "length": state["length"] + ids.shape[1]}

    def cache_bytes(self, state) -> int:
        return int(sum(a.nbytes for a in state["past"].values()))


register_backend("trt", TrtDecoder)
