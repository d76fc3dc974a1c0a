"""ONNX Runtime backend: runs ``model.onnx`` of an export, feeding the packed cache back each step.

By default the session registers kvcompile's native library (:mod:`kvcompile.kernels.native`), so
``KVAttention`` nodes run its C++ kernel, which reads the packed cache directly; ``native=False``
(or ``KVCOMPILE_NATIVE=0``) runs the ops' ONNX function bodies instead, as stock ONNX Runtime does.
"""

from __future__ import annotations

import numpy as np

from kvcompile.errors import RuntimeBackendError
from kvcompile.runtime import register_backend
from kvcompile.runtime.base import GraphDecoder


class OrtDecoder(GraphDecoder):
    name = "onnxruntime"

    def __init__(self, export, providers: list[str] | None = None, threads: int | None = None,
                 native: bool | None = None):
        super().__init__(export)
        self.requested_providers, self.threads = providers, threads
        self.native = native  # None: register the native library when it is built and not disabled
        self.native_library = None
        self.session = None
        self.providers: list[str] = []

    def activate(self) -> "OrtDecoder":
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeBackendError("the ort backend needs onnxruntime (pip install onnxruntime)") from None
        providers = self.requested_providers
        if providers is None:  # the CUDA provider when this onnxruntime build has it
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        from kvcompile.kernels import native

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.native or (self.native is None and native.enabled()):
            self.native_library = native.register(options)  # native=True and no library: one-line error
            self.name = "onnxruntime+native"
        self.session = ort.InferenceSession(str(self.export.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        return super().activate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self.output_names, self.session.run(None, feed)))
        except Exception as e:  # onnxruntime's errors: keep the kernel's own message, on one line
            text = str(e)
            reason = text.split("Status Message: ", 1)[-1].strip().splitlines()[0] if text else type(e).__name__
            raise RuntimeBackendError(f"{self.name}: {reason}") from None

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()


register_backend("ort", OrtDecoder)
