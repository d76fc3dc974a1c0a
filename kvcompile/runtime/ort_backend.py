"""ONNX Runtime backend: runs ``model.onnx`` of an export, feeding the packed cache back each step."""

from __future__ import annotations

import numpy as np

from kvcompile.errors import RuntimeBackendError
from kvcompile.runtime import check_context, check_finite, register_backend

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


class OrtDecoder:
    """``state`` = dict of past tensors by graph input name, plus the cached length."""

    def __init__(self, export, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeBackendError("the ort backend needs onnxruntime (pip install onnxruntime)") from None
        self.export = export
        available = ort.get_available_providers()
        if providers is None:  # the CUDA provider when this onnxruntime build has it
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(export.onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ports = [p for g in export.groups for p in g.ports]
        self.heads = {p.past: len(g.heads) for g in export.groups for p in g.ports}

    def start(self, batch: int):
        past = {p.past: np.zeros((batch, self.heads[p.past], 0, p.width), NUMPY_DTYPES[p.dtype]) for p in self.ports}
        return {"past": past, "length": 0}

    def step(self, ids: np.ndarray, state):
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeBackendError(f"expected input ids [batch, tokens] with tokens >= 1, got shape {ids.shape}")
        check_context(self.export, state["length"] + ids.shape[1])
        out = dict(zip(self.output_names, self.session.run(None, {"input_ids": ids, **state["past"]})))
        check_finite(out["logits"], "onnxruntime")
        past = {p.past: out[p.present] for p in self.ports}
        return out["logits"], {"past": past, "length": state["length"] + ids.shape[1]}

    def cache_bytes(self, state) -> int:
        return int(sum(a.nbytes for a in state["past"].values()))


register_backend("ort", OrtDecoder)
