"""ONNX graph of a Llama-style decoder whose KV cache goes through ``kvcompile`` ops.

One graph serves prefill and decode: ``input_ids`` ``[batch, sequence]`` (positions
``P .. P+S-1``, P the number of cached positions read off the past inputs) and the past cache
in; ``logits`` ``[batch, sequence, vocab]`` (float32) and the present cache out.  Per layer::

    h = x + o_proj(attention(rope(q(rms(x))), cache(rope(k(rms(x)))), cache(v(rms(x)))))
    x' = h + down(silu(gate(rms(h))) * up(rms(h)))

where ``cache(.)`` is a ``KVCacheUpdate`` node per head group (or a plain fp16 concat), which
returns every cached position de-quantized, and attention is causal softmax attention with GQA
(each kv head serves ``q_heads / kv_heads`` query heads).  The maths follows ``transformers``'
``LlamaForCausalLM`` in float32; RoPE uses cos/sin tables computed by the model's own rotary
module (so any RoPE scaling it implements is reproduced), which bounds the context at the
table length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcompile.errors import ExportError
from kvcompile.export.layout import HeadGroup
from kvcompile.ops.builder import Builder
from kvcompile.ops.cache_update import KV_CACHE_UPDATE
from kvcompile.kv.precision_map import PrecisionMap


class Weights:
    """Collects initializers (float32 numpy arrays) under stable names."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, array) -> str:
        self.arrays[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name


def _linear(b: Builder, w: Weights, x: str, module, name: str) -> str:
    y = b.op("MatMul", x, w.add(f"{name}.weight_t", module.weight.detach().numpy().T))
    if getattr(module, "bias", None) is not None:
        y = b.op("Add", y, w.add(f"{name}.bias", module.bias.detach().numpy()))
    return y


def _rms_norm(b: Builder, w: Weights, x: str, module, name: str, eps: float) -> str:
    variance = b.op("ReduceMean", b.op("Mul", x, x), b.i64(-1), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps))))
    return b.op("Mul", w.add(f"{name}.weight", module.weight.detach().numpy()), b.op("Mul", x, inv))


def _rope(b: Builder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (halves of D)."""
    half = b.i64(head_dim // 2)
    x1 = b.op("Slice", x, b.i64(0), half, b.i64(-1))
    x2 = b.op("Slice", x, half, b.i64(head_dim), b.i64(-1))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _heads(b: Builder, x: str, n: int, d: int) -> str:
    """[B, S, n*d] -> [B, n, S, d]."""
    return b.op("Transpose", b.op("Reshape", x, b.i64(0, 0, n, d)), perm=[0, 2, 1, 3])


def _select_heads(b: Builder, x: str, heads: tuple[int, ...], total: int) -> str:
    if heads == tuple(range(total)):
        return x
    return b.op("Gather", x, b.const(list(heads), np.int64), axis=1)


def past_length(b: Builder, groups: list[HeadGroup]) -> str:
    """P as a 1-D int64 tensor, from layer 0's first key group (every group holds P positions)."""
    g = groups[0]
    if g.plain:
        return b.op("Shape", g.ports[0].past, start=2, end=3)
    firsts, seen = [], set()
    for port in g.ports:  # first part of each segment has one row per position
        seg = port.past.rsplit(".", 2)[-2]
        if seg not in seen:
            seen.add(seg)
            firsts.append(b.op("Shape", port.past, start=2, end=3))
    total = firsts[0]
    for t in firsts[1:]:
        total = b.op("Add", total, t)
    return total


def cache_states(b: Builder, pmap: PrecisionMap, groups: list[HeadGroup], states: str, num_kv_heads: int,
                 outputs: list[str]) -> str:
    """Run one layer-stream's head groups; returns all positions [B, Hkv, L, D] float32."""
    pieces, order = [], []
    for g in groups:
        x = _select_heads(b, states, g.heads, num_kv_heads)
        if g.plain:
            port = g.ports[0]
            present = b.op("Concat", port.past, b.op("Cast", x, to=10), axis=2, outputs=[port.present])
            pieces.append(b.op("Cast", present, to=1))
        else:
            names = [p.present for p in g.ports] + [b.fresh("all_states")]
            out = KV_CACHE_UPDATE.emit(b, g.op_attrs(pmap), [p.past for p in g.ports] + [x], names)
            pieces.append(out[-1])
        outputs.extend(p.present for p in g.ports)
        order.extend(g.heads)
    full = b.op("Concat", *pieces, axis=1) if len(pieces) > 1 else pieces[0]
    if order != list(range(num_kv_heads)):
        full = b.op("Gather", full, b.const(list(np.argsort(order)), np.int64), axis=1)
    return full


def build_llama_graph(model: Any, pmap: PrecisionMap, groups: list[HeadGroup], max_context: int):
    """Returns ``(nodes, weights, cache output names)`` for a ``LlamaForCausalLM``-like model."""
    import torch

    config = model.config
    inner = model.model
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    eps = float(config.rms_norm_eps)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"{config.model_type}: activation {config.hidden_act!r} is not supported; expected silu")
    b, w = Builder("model"), Weights()

    with torch.no_grad():  # RoPE tables from the model's own rotary module
        positions = torch.arange(max_context)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cos_table = w.add("rope.cos", cos[0].float().numpy())
    sin_table = w.add("rope.sin", sin[0].float().numpy())

    embed = w.add("embed_tokens.weight", inner.embed_tokens.weight.detach().numpy())
    x = b.op("Gather", embed, "input_ids", axis=0)  # [B, S, hidden]
    p_len = past_length(b, groups)
    s_len = b.op("Shape", "input_ids", start=1, end=2)
    total = b.op("Add", p_len, s_len)
    pos = b.op("Range", b.op("Squeeze", p_len), b.op("Squeeze", total), b.scalar_i64(1))  # [S]
    cos = b.op("Unsqueeze", b.op("Gather", cos_table, pos, axis=0), b.i64(0, 1))  # [1, 1, S, D]
    sin = b.op("Unsqueeze", b.op("Gather", sin_table, pos, axis=0), b.i64(0, 1))
    keys = b.op("Range", b.scalar_i64(0), b.op("Squeeze", total), b.scalar_i64(1))  # [L]
    allowed = b.op("LessOrEqual", b.op("Unsqueeze", keys, b.i64(0)), b.op("Unsqueeze", pos, b.i64(1)))  # [S, L]
    mask = b.op("Where", allowed, b.const(0.0), b.const(-np.inf))

    cache_outputs: list[str] = []
    by_layer: dict[tuple[int, str], list[HeadGroup]] = {}
    for g in groups:
        by_layer.setdefault((g.layer, g.stream), []).append(g)

    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        name = f"layers.{i}"
        h = _rms_norm(b, w, x, layer.input_layernorm, f"{name}.input_layernorm", eps)
        q = _rope(b, _heads(b, _linear(b, w, h, attn.q_proj, f"{name}.q_proj"), hq, d), cos, sin, d)
        k = _rope(b, _heads(b, _linear(b, w, h, attn.k_proj, f"{name}.k_proj"), hkv, d), cos, sin, d)
        v = _heads(b, _linear(b, w, h, attn.v_proj, f"{name}.v_proj"), hkv, d)
        k_all = cache_states(b, pmap, by_layer[(i, "key")], k, hkv, cache_outputs)
        v_all = cache_states(b, pmap, by_layer[(i, "value")], v, hkv, cache_outputs)
        if hq != hkv:  # GQA: kv head j serves query heads j*r .. j*r + r-1
            expand = b.i64(1, 1, hq // hkv, 1, 1)
            k_all = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", k_all, b.i64(2)), expand), b.i64(0, hq, -1, d))
            v_all = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", v_all, b.i64(2)), expand), b.i64(0, hq, -1, d))
        scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k_all, perm=[0, 1, 3, 2])),
                      b.const(float(attn.scaling)))
        probs = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
        ctx = b.op("Reshape", b.op("Transpose", b.op("MatMul", probs, v_all), perm=[0, 2, 1, 3]), b.i64(0, 0, hq * d))
        x = b.op("Add", x, _linear(b, w, ctx, attn.o_proj, f"{name}.o_proj"))
        h = _rms_norm(b, w, x, layer.post_attention_layernorm, f"{name}.post_attention_layernorm", eps)
        gate = _linear(b, w, h, mlp.gate_proj, f"{name}.gate_proj")
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), _linear(b, w, h, mlp.up_proj, f"{name}.up_proj"))
        x = b.op("Add", x, _linear(b, w, act, mlp.down_proj, f"{name}.down_proj"))

    x = _rms_norm(b, w, x, inner.norm, "norm", eps)
    hidden = config.hidden_size
    flat = b.op("Reshape", x, b.i64(-1, hidden))
    head = model.lm_head.weight
    head_name = embed if head.data_ptr() == inner.embed_tokens.weight.data_ptr() else w.add("lm_head.weight",
                                                                                            head.detach().numpy())
    logits = b.op("Gemm", flat, head_name, transB=1)
    out_shape = b.op("Concat", b.op("Shape", "input_ids"), b.i64(-1), axis=0)
    b.op("Reshape", logits, out_shape, outputs=["logits"])
    return b, w, cache_outputs
