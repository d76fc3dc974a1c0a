"""torch backend: the source model with MixedPrecisionCache and the export's map (the reference)."""

from __future__ import annotations

import numpy as np

from kvcompile.runtime import register_backend
from kvcompile.runtime.base import Decoder, check_context, check_finite, check_ids


class TorchDecoder(Decoder):
    name = "torch"

    def __init__(self, export, lm=None):
        super().__init__(export)
        self.lm = lm

    def activate(self) -> "TorchDecoder":
        if self.lm is None:
            from kvcompile.models import load_model

            self.lm = load_model(self.export.model)
        return super().activate()

    def start(self, batch: int):
        from kvcompile.cache import MixedPrecisionCache, model_ropes

        if not hasattr(self, "_ropes"):  # computed once (None unless the map stores keys before RoPE)
            self._ropes = model_ropes(self.lm.model, self.export.pmap, self.export.max_context)
        return {"cache": MixedPrecisionCache(self.export.pmap, self.export.max_context, rope=self._ropes), "length": 0}

    def step(self, ids: np.ndarray, state):
        import torch

        self._check_active()
        check_ids(ids)
        check_context(self.export, state["length"] + ids.shape[1])
        with torch.no_grad():
            logits = self.lm.model(torch.from_numpy(ids), cache=state["cache"], use_cache=True).logits
        logits = logits.float().numpy()
        check_finite(logits, self.name)
        return logits, {"cache": state["cache"], "length": state["length"] + ids.shape[1]}

    def cache_bytes(self, state) -> int:
        return int(state["cache"].nbytes())


register_backend("torch", TorchDecoder)
