"""Exact parallel simulation of decoding through a :class:`MixedPrecisionCache`.

Decoding token by token, query ``i`` reads every key/value ``j <= i`` as it is stored when the
cache holds ``L_i`` positions; with a prefill of ``P`` positions, ``L_i = max(i + 1, P)``.  A
position is stored in one of two forms over its life:

* *early*: its sink form (``j < n``) or its recent-window form ``Q_recent(x_j)``;
* *late*:  its bulk form ``Q_bulk(Q_recent(x))`` (re-quantized from the window form, per
  position or per block of G positions), once ``j < e(L_i)`` (:meth:`kvcompile.kv.segments.SegmentRule.bulk_end`).

A sliding-window layer (``pmap.window(layer) = W``) stores one form, quantized once, and
evicts keys older than its window; ``transformers``' sliding-window mask for that layer removes
exactly those keys from each query's row, so the same pass scores it.

Keys stored before RoPE (``-pr`` schemes) are rotated back by their position before each
quantization and forward after (:func:`kvcompile.kv.rope.roundtrip_at`), as the cache does.

A map with cross-layer predictors (:mod:`kvcompile.kv.predict`) stores, in each tier, the residual
of the prediction from the layer before in the same tier; the layers run in order in one pass, so
layer l reads layer l - 1's forms as just computed.

Sink positions never change and bulk blocks never change once complete, so one forward pass
over the whole window can score every position: for each (query i, key j) pick the late form if
``n <= j < e(L_i)`` and the early form otherwise, both in the scores (keys) and in the weighted
sum (values).  Quantization is elementwise per position or per complete block, so the stored
forms are bit-identical to the cache's; the only difference from real decoding is that the
K/V *inputs* of a parallel pass and of token-by-token passes differ by float rounding of the
matrix products (~1e-6 in float32), see ``tests/integration/test_simulation.py``.

Use::

    with simulate_cache(model, pmap, prefill_length=1):
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcompile.kv.grouping import stream_groups
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.kv.rope import RopeTable, roundtrip_at
from kvcompile.kv.segments import SegmentRule
from kvcompile.models.attention_state import attention_state, state_of

IMPLEMENTATION = "kvcompile_sim"
QUERY_CHUNK = 512


@dataclass
class _Active:
    pmap: PrecisionMap
    prefill_length: int
    model: object = None
    ropes: list | None = None  # per layer, read off the model when a key scheme is pre-RoPE
    predictors: object = None  # CrossLayerPredictors of a map that names them
    predictor_rope: RopeTable | None = None  # the model's RoPE tables, read off it when predicting
    previous: tuple | None = None  # (layer, key forms, value forms) of the layer just scored, when predicting

    def rope_for_predictors(self, positions: int) -> RopeTable:
        if self.predictor_rope is None or self.predictor_rope.positions < positions:
            from kvcompile.models.rope import layer_ropes

            self.predictor_rope = layer_ropes(self.model, positions)[0]
        return self.predictor_rope

    def rope(self, layer: int, positions: int) -> RopeTable | None:
        if not self.pmap.keys_pre_rope(layer):
            return None
        if self.ropes is None or self.ropes[layer].positions < positions:
            from kvcompile.models.rope import layer_ropes

            self.ropes = layer_ropes(self.model, positions)
        return self.ropes[layer]


@functools.lru_cache(maxsize=64)
def tier_index(seq_len: int, rule: SegmentRule, prefill_length: int) -> torch.Tensor:
    """``[T, T]`` int8: the tier (0 = sink or recent, 1 = age1 / bulk, ...) in whose form query i
    reads key j, i.e. the number of tiers t >= 1 with ``j - n < c_t(L_i)``, ``L_i = max(i + 1, P)``."""
    lengths = torch.clamp(torch.arange(1, seq_len + 1), min=prefill_length)
    reached = torch.tensor([rule.reached(int(L))[1:] for L in lengths])  # [T, K + 1]
    u = torch.arange(seq_len) - rule.sink_tokens  # non-sink index; negative for sinks
    tiers = (u[None, :, None] < reached[:, None, :]).sum(-1)
    return torch.where(u[None, :] >= 0, tiers, 0).to(torch.int8)


def stored_forms(x: torch.Tensor, pmap: PrecisionMap, layer: int, stream: str, prefill_length: int,
                 rope: RopeTable | None = None, predictions: list[torch.Tensor] | None = None):
    """Every stored form of ``x`` [B, H, T, D] (positions 0 .. T-1) and which one each query reads.

    Returns ``(forms, index)``: ``forms[t]`` [B, H, T, D] is each position as tier t stores it
    (t = 0: its sink or recent form; t >= 1: re-quantized tier by tier, ``Q_t(Q_{t-1}(...))``, for
    the whole blocks that can reach tier t), and ``index`` [H, T, T] the tier query i reads key j in.
    ``rope``: the layer's RoPE tables, needed when a scheme of ``stream`` stores keys before RoPE.
    ``predictions``: per tier t, the cross-layer prediction ``p_t`` [B, H, T, D] (:mod:`kvcompile.kv.predict`)
    from the layer before in its tier-t form; each tier then stores ``p_t + Q_t(form_{t-1} - p_t)``.
    """
    b, h, t, d = x.shape
    tiers = len(pmap.age_windows) + 2
    if pmap.window(layer):  # a window layer: one form, quantized once; its mask drops what it evicts
        form = torch.empty(b, h, t, d)
        for schemes, heads in stream_groups(pmap, layer, stream):
            form[:, heads] = schemes["bulk"].roundtrip(x[:, heads].float())
        return [form] * tiers, torch.full((h, t, t), tiers - 1, dtype=torch.int8)
    forms = [torch.empty(b, h, t, d) for _ in range(tiers)]
    index = torch.empty(h, t, t, dtype=torch.int8)
    for schemes, heads in stream_groups(pmap, layer, stream):
        rule = pmap.segment_rule(layer, heads[0], stream)

        def stored(name, values, tier, start):  # values: positions start.. of these heads
            if predictions is None:
                return roundtrip_at(schemes[name], values, rope, start)
            p = predictions[tier][:, heads, start : start + values.shape[-2]].float()
            return p + schemes[name].roundtrip(values - p)

        xs = x[:, heads].float()
        n = min(pmap.sink_tokens, t)
        form = xs[..., n:, :]
        form = stored("recent", form, 0, n) if t > n else form
        forms[0][:, heads] = torch.cat([stored("sink", xs[..., :n, :], 0, 0), form], -2) if n else form
        full = t - n  # positions that can reach the tier (whole blocks of each tier on the way)
        for i, ((_, block), name) in enumerate(zip(rule._boundaries(), rule.tiers[1:]), 1):
            full = block * (full // block)
            form = form.clone()
            if full:
                form[..., :full, :] = stored(name, form[..., :full, :], i, n)
            forms[i][:, heads, :n] = forms[0][:, heads, :n]
            forms[i][:, heads, n:] = form
        index[heads] = tier_index(t, rule, prefill_length)
    return forms, index


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _simulated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    active = state_of(module, "kvcompile_sim (simulate_cache)")
    if key.shape[-2] != query.shape[-2]:
        raise RuntimeError("the cache simulation scores a whole window in one pass; call the model without a cache")
    pmap, p = active.pmap, active.prefill_length
    groups = query.shape[1] // key.shape[1]
    rope = active.rope(module.layer_idx, key.shape[-2])
    layer, pred = module.layer_idx, active.predictors
    if pred is not None and layer:
        if active.previous is None or active.previous[0] != layer - 1:
            raise RuntimeError("cross-layer prediction needs the layers scored in order in one forward pass")
        _, k_prev, v_prev = active.previous
        table = active.rope_for_predictors(key.shape[-2])
        k_forms, k_index = stored_forms(key, pmap, layer, "key", p, rope,
                                        [pred.predict("key", layer, a, b, table) for a, b in zip(k_prev, v_prev)])
        v_forms, v_index = stored_forms(value, pmap, layer, "value", p, None,
                                        [pred.predict("value", layer, a, b, table) for a, b in zip(k_forms, v_prev)])
    else:
        k_forms, k_index = stored_forms(key, pmap, layer, "key", p, rope)
        v_forms, v_index = stored_forms(value, pmap, layer, "value", p)
    if pred is not None:
        active.previous = (layer, k_forms, v_forms)
    # Compute in the model's dtype, as attention over the cache's (de-quantized) K/V would.
    dt = query.dtype
    k_index = k_index.repeat_interleave(groups, 0)
    v_index = v_index.repeat_interleave(groups, 0)
    k_forms = [_repeat_heads(k.to(dt), groups) for k in k_forms]
    v_forms = [_repeat_heads(v.to(dt), groups) for v in v_forms]
    t = key.shape[-2]
    last = len(k_forms) - 1
    outs = []
    # Queries in chunks of QUERY_CHUNK rows (rows of a softmax are independent).  With the causal
    # mask, rows [i0, i1) read keys [0, i1) only.  Within a chunk, the keys that every row reads in
    # the oldest (bulk) form of both K and V form one run [lo, hi) after the sinks: that run takes
    # one plain product with the bulk form; only the columns outside it (sinks, the recent window
    # and the age tiers near the diagonal) need a product per form and a selection by index.
    for i0 in range(0, t, QUERY_CHUNK):
        i1 = min(i0 + QUERY_CHUNK, t)
        keys = i1 if attention_mask is not None else t
        q = query[:, :, i0:i1]
        ki, vi = k_index[:, i0:i1, :keys], v_index[:, i0:i1, :keys]
        lo, hi = _bulk_run((ki == last).all(0).all(0) & (vi == last).all(0).all(0))
        spans = [(0, lo), (lo, hi), (hi, keys)]
        scores = torch.cat([q @ k_forms[last][:, :, a:b].transpose(-1, -2) if (a, b) == (lo, hi)
                            else _tiered_scores(q, k_forms, ki[:, :, a:b], a, b) for a, b in spans], dim=-1)
        scores = scores * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[..., i0:i1, :keys].to(dt)
        weights = torch.softmax(scores, dim=-1)
        out = weights[..., lo:hi] @ v_forms[last][:, :, lo:hi]
        for a, b in ((0, lo), (hi, keys)):
            if b > a:
                for tier in reversed(range(len(v_forms))):
                    where = vi[:, :, a:b] == tier
                    if where.any():
                        out = out + (weights[..., a:b] * where.to(dt)) @ v_forms[tier][:, :, a:b]
        outs.append(out)
    out = torch.cat(outs, dim=-2)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _bulk_run(uniform: torch.Tensor) -> tuple[int, int]:
    """``(lo, hi)``: the longest run of True in ``uniform`` [keys] (empty: ``(0, 0)``)."""
    if not uniform.any():
        return 0, 0
    x = torch.cat([torch.zeros(1, dtype=torch.int8), uniform.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = torch.nonzero(x.diff()).flatten()
    starts, stops = edges[0::2], edges[1::2]
    i = int((stops - starts).argmax())
    return int(starts[i]), int(stops[i])


def _tiered_scores(q, k_forms, index, a: int, b: int) -> torch.Tensor:
    """``q @ k^T`` over key columns [a, b), each (row, column) from the form ``index`` names."""
    scores = q @ k_forms[0][:, :, a:b].transpose(-1, -2)
    for tier, k in enumerate(k_forms[1:], 1):
        where = index == tier
        if b > a and where.any():
            scores = torch.where(where, q @ k[:, :, a:b].transpose(-1, -2), scores)
    return scores


ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _simulated_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def simulate_cache(model, pmap: PrecisionMap, prefill_length: int = 1):
    """Within the block, a no-cache forward of ``model`` reads K/V as the mixed-precision cache would.

    ``prefill_length``: positions fed at once before token-by-token decoding (1 = decode every
    position).  Call the model with ``use_cache=False``; batches must not contain padding.
    """
    predictors = None
    if pmap.predictors is not None:
        from kvcompile.kv.predict import resolve

        predictors = resolve(pmap.predictors)
    active = _Active(pmap, max(1, prefill_length), model, predictors=predictors)
    with attention_state(model, active, IMPLEMENTATION, "simulate_cache()"):
        yield
