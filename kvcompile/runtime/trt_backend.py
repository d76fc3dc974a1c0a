"""TensorRT backend: runs ``model.engine`` of a ``--target trt`` export through polygraphy's TrtRunner.

Needs an NVIDIA GPU that the installed TensorRT can run on (TensorRT-RTX: RTX-class GPUs only;
full TensorRT for SM90), the plugins — the export's ``libkvcompile_trt.so`` loaded into the
registry for engines built with the compiled library (the default), the Python plugins registered
for ``plugins="python"`` engines — and, for TensorRT-RTX, ``libtensorrt_rtx.so`` resolvable at
process start (see :mod:`kvcompile.targets.trt.build`).  Where any of that is missing, opening the
backend fails with one line saying which.  Not run in this project's CI (no GPU): see
docs/deploy.md and bench/gpu_check.sh.
"""

from __future__ import annotations

import ctypes.util

import numpy as np

from kvcompile.errors import RuntimeBackendError
from kvcompile.runtime import register_backend
from kvcompile.runtime.base import GraphDecoder


def why_not_runnable(export) -> str | None:
    """One line on why the engine cannot run here, or None."""
    from kvcompile.targets.trt.loader import find_tensorrt

    if not export.trt:
        return f"{export.path} has no TensorRT engine; export it with --target trt"
    section = export.trt
    if not isinstance(section.get("engine"), str) or section["engine"] not in section["files"] \
            or type(section.get("max_batch")) is not int or section["max_batch"] < 1 \
            or section.get("tensorrt") not in (None, "tensorrt", "tensorrt_rtx"):
        return (f"{export.path}: the manifest's trt section must name its engine among its files, a max_batch >= 1 "
                "and the TensorRT flavour; re-run `kvcompile export --target trt`")
    if section.get("plugins", "python") == "compiled" and (
            not isinstance(section.get("plugin_library"), str) or section["plugin_library"] not in section["files"]):
        return (f"{export.path}: the manifest's trt section must name its plugin library among its files; re-run "
                "`kvcompile export --target trt`")
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


class TrtDecoder(GraphDecoder):
    name = "tensorrt"

    def __init__(self, export, **_):
        super().__init__(export)
        self.runner = None

    def activate(self) -> "TrtDecoder":
        reason = why_not_runnable(self.export)
        if reason:
            raise RuntimeBackendError(f"the trt backend cannot run here: {reason}")
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from kvcompile.targets.trt.loader import import_tensorrt
        from kvcompile.targets.trt.plugin import register_plugins

        trt = import_tensorrt(self.export.trt.get("tensorrt"))
        if self.export.trt.get("plugins", "python") == "compiled":
            library = self.export.path / self.export.trt["plugin_library"]
            if trt.get_plugin_registry().load_library(str(library)) is None:
                raise RuntimeBackendError(f"the trt backend cannot run here: TensorRT could not load {library}")
        else:
            register_plugins(trt)
        self.runner = TrtRunner(EngineFromBytes((self.export.path / self.export.trt["engine"]).read_bytes()))
        self.runner.activate()
        return super().activate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.infer(feed, copy_outputs_to_host=True)

    def deactivate(self) -> None:
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None
        super().deactivate()


register_backend("trt", TrtDecoder)
