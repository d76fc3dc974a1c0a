"""Exact parallel simulation of decoding through a :class:`MixedPrecisionCache`.

Decoding token by token, query ``i`` reads every key/value ``j <= i`` as it is stored when the
cache holds ``L_i`` positions; with a prefill of ``P`` positions, ``L_i = max(i + 1, P)``.  A
position is stored in one of two forms over its life:

* *early*: its sink form (``j < n``) or its recent-window form ``Q_recent(x_j)``;
* *late*:  its bulk form ``Q_bulk(Q_recent(x))`` (re-quantized from the window form, per
  position or per block of G positions), once ``j < e(L_i)`` (:meth:`kvcompile.kv.segments.SegmentRule.bulk_end`).

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
from kvcompile.kv.segments import SegmentRule
from kvcompile.models.attention_state import attention_state, state_of

IMPLEMENTATION = "kvcompile_sim"


@dataclass
class _Active:
    pmap: PrecisionMap
    prefill_length: int


@functools.lru_cache(maxsize=64)
def late_mask(seq_len: int, sink_tokens: int, recent_window: int, token_group: int, prefill_length: int) -> torch.Tensor:
    """``[T, T]`` bool: True where query i reads key j in its bulk (late) form."""
    lengths = torch.clamp(torch.arange(1, seq_len + 1), min=prefill_length)
    rule = SegmentRule(sink_tokens, recent_window, token_group)
    ends = torch.tensor([rule.bulk_end(int(L)) for L in lengths])
    j = torch.arange(seq_len)
    return (j[None, :] >= min(sink_tokens, seq_len)) & (j[None, :] < ends[:, None])


def stored_forms(x: torch.Tensor, pmap: PrecisionMap, layer: int, stream: str, prefill_length: int):
    """Early and late stored forms of ``x`` [B, H, T, D] and the per-head late mask [H, T, T]."""
    b, h, t, d = x.shape
    early = torch.empty(b, h, t, d)
    late = torch.empty(b, h, t, d)
    masks = torch.empty(h, t, t, dtype=torch.bool)
    for (sink, recent, bulk), heads in stream_groups(pmap, layer, stream):
        xs = x[:, heads].float()
        n = min(pmap.sink_tokens, t)
        window_form = recent.roundtrip(xs[..., n:, :]) if t > n else xs[..., n:, :]
        e = torch.cat([sink.roundtrip(xs[..., :n, :]), window_form], -2) if n else window_form
        g = bulk.token_group
        full = SegmentRule(pmap.sink_tokens, 0, g).bulk_length(t)  # every position that ever reaches the bulk
        lt = e.clone()
        if full:
            lt[..., n : n + full, :] = bulk.roundtrip(window_form[..., :full, :])
        early[:, heads], late[:, heads] = e, lt
        masks[heads] = late_mask(t, pmap.sink_tokens, pmap.recent_window, g, prefill_length)
    return early, late, masks


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _simulated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    active = state_of(module, "kvcompile_sim (simulate_cache)")
    if key.shape[-2] != query.shape[-2]:
        raise RuntimeError("the cache simulation scores a whole window in one pass; call the model without a cache")
    pmap, p = active.pmap, active.prefill_length
    groups = query.shape[1] // key.shape[1]
    k_early, k_late, k_mask = stored_forms(key, pmap, module.layer_idx, "key", p)
    v_early, v_late, v_mask = stored_forms(value, pmap, module.layer_idx, "value", p)
    # Compute in the model's dtype, as attention over the cache's (de-quantized) K/V would.
    q, dt = query, query.dtype
    k_early, k_late, v_early, v_late = (t.to(dt) for t in (k_early, k_late, v_early, v_late))
    k_mask = k_mask.repeat_interleave(groups, 0)
    v_mask = v_mask.repeat_interleave(groups, 0).to(dt)
    scores = torch.where(
        k_mask,
        q @ _repeat_heads(k_late, groups).transpose(-1, -2),
        q @ _repeat_heads(k_early, groups).transpose(-1, -2),
    ) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(dt)
    weights = torch.softmax(scores, dim=-1)
    out = (weights * v_mask) @ _repeat_heads(v_late, groups) + (weights * (1 - v_mask)) @ _repeat_heads(v_early, groups)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _simulated_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def simulate_cache(model, pmap: PrecisionMap, prefill_length: int = 1):
    """Within the block, a no-cache forward of ``model`` reads K/V as the mixed-precision cache would.

    ``prefill_length``: positions fed at once before token-by-token decoding (1 = decode every
    position).  Call the model with ``use_cache=False``; batches must not contain padding.
    """
    with attention_state(model, _Active(pmap, max(1, prefill_length)), IMPLEMENTATION, "simulate_cache()"):
        yield
