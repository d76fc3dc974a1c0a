"""torch backend: the source model with MixedPrecisionCache and the export's map (the reference)."""

from __future__ import annotations

import numpy as np

from kvcompile.runtime import check_context, check_finite, register_backend


class TorchDecoder:
    def __init__(self, export, lm=None):
        from kvcompile.models import load_model

        self.export = export
        self.lm = lm if lm is not None else load_model(export.model)

    def start(self, batch: int):
        from kvcompile.cache import MixedPrecisionCache

        return {"cache": MixedPrecisionCache(self.export.pmap, self.export.max_context), "length": 0}

    def step(self, ids: np.ndarray, state):
        import torch

        check_context(self.export, state["length"] + ids.shape[1])
        with torch.no_grad():
            logits = self.lm.model(torch.from_numpy(ids), cache=state["cache"], use_cache=True).logits
        logits = logits.float().numpy()
        check_finite(logits, "torch")
        return logits, {"cache": state["cache"], "length": state["length"] + ids.shape[1]}

    def cache_bytes(self, state) -> int:
        return int(state["cache"].nbytes())


register_backend("torch", TorchDecoder)
