"""ONNX Runtime backend: runs ``model.onnx`` of an export, feeding the packed cache back each step."""

from __future__ import annotations

import numpy as np

from kvcompile.errors import RuntimeBackendError
from kvcompile.runtime import register_backend
from kvcompile.runtime.base import GraphDecoder


class OrtDecoder(GraphDecoder):
    name = "onnxruntime"

    def __init__(self, export, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(export)
        self.requested_providers, self.threads = providers, threads
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
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.export.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        return super().activate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feed)))

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()


register_backend("ort", OrtDecoder)
