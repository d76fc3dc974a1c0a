"""Fit cross-layer predictors (:mod:`kvcompile.kv.predict`) on calibration text.

Per layer ``l >= 1``, ridge regression over every position of ``windows`` windows::

    keys:   x = [K_{l-1}, V_{l-1}],  y = K_l
    values: x = [K_l,     V_{l-1}],  y = V_l          (x [2 H D], y [H D], keys before RoPE)

    W = (C_xx + lambda * mean(diag C_xx) * I)^-1 C_xy,   c = mean(y) - mean(x) W

with ``C`` the centred (co)variance sums, accumulated in float64.  Inputs are the exact K/V; at
run time the predictors read the stored forms, whose error the residual then absorbs.
"""

from __future__ import annotations

import time

from kvcompile.data import DEFAULT_CALIBRATION_TEXT, load_text
from kvcompile.errors import KvcompileError

DEFAULT_RIDGE = 1e-2


class _Moments:
    """Running sums of x, y, x x^T and x y^T (float64)."""

    def __init__(self, dx: int, dy: int):
        import torch

        self.n = 0
        self.sx, self.sy = torch.zeros(dx, dtype=torch.float64), torch.zeros(dy, dtype=torch.float64)
        self.sxx, self.sxy = torch.zeros(dx, dx, dtype=torch.float64), torch.zeros(dx, dy, dtype=torch.float64)

    def add(self, x, y) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y

    def solve(self, ridge: float):
        import torch

        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * torch.outer(mx, mx)
        cxy = self.sxy - self.n * torch.outer(mx, my)
        cxx += ridge * cxx.diagonal().mean() * torch.eye(cxx.shape[0], dtype=torch.float64)
        w = torch.linalg.solve(cxx, cxy)
        return w.float(), (my - mx @ w).float()


def fit_predictors(lm, text: str = DEFAULT_CALIBRATION_TEXT, windows: int = 8, window: int = 512,
                   ridge: float = DEFAULT_RIDGE, progress: bool = True):
    """:class:`~kvcompile.kv.predict.CrossLayerPredictors` of ``lm`` fitted on ``windows`` windows of
    ``window`` tokens of ``text``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from kvcompile.kv.predict import CrossLayerPredictors
    from kvcompile.measure.quality import token_windows
    from kvcompile.models.rope import layer_ropes

    g = lm.geometry
    if any(g.layer_windows):
        raise KvcompileError(f"cross-layer predictors need full-attention layers; {lm.name} has sliding-window layers")
    if g.num_layers < 2:
        raise KvcompileError("cross-layer predictors need a model of at least 2 layers")
    if not ridge > 0:
        raise KvcompileError(f"ridge must be positive, got {ridge}")
    width = g.num_kv_heads * g.head_dim
    moments = {s: [_Moments(2 * width, width) for _ in range(g.num_layers)] for s in ("key", "value")}
    start = time.perf_counter()
    ids_all = token_windows(lm.tokenizer, load_text(text), window, windows)

    rope = layer_ropes(lm.model, window)[0]  # keys un-rotated: the maps must hold at every position

    def flat(x):  # [1, H, T, D] -> [T, H D]
        return x[0].float().permute(1, 0, 2).reshape(x.shape[-2], width)

    with torch.no_grad():
        for ids in tqdm(ids_all, desc="fit predictors", unit="window", disable=not progress, leave=False):
            cache = lm.model(ids[None], use_cache=True, past_key_values=DynamicCache()).past_key_values
            ks = [flat(rope.unrotate(layer.keys.float())) for layer in cache.layers]
            vs = [flat(layer.values) for layer in cache.layers]
            for l in range(1, g.num_layers):
                moments["key"][l].add(torch.cat([ks[l - 1], vs[l - 1]], 1), ks[l])
                moments["value"][l].add(torch.cat([ks[l], vs[l - 1]], 1), vs[l])
    maps = {s: {l: moments[s][l].solve(ridge) for l in range(1, g.num_layers)} for s in ("key", "value")}
    fit = {"text": str(text), "windows": len(ids_all), "window": window, "ridge": ridge,
           "seconds": round(time.perf_counter() - start, 3)}
    return CrossLayerPredictors(lm.name, g.num_layers, g.num_kv_heads, g.head_dim, maps, fit)
