"""ONNX graph of a Llama-style decoder whose KV cache goes through ``kvcompile`` ops.

One graph serves prefill and decode: ``input_ids`` ``[batch, sequence]`` (positions
``P .. P+S-1``, P the number of cached positions read off the past inputs) and the past cache
in; ``logits`` ``[batch, sequence, vocab]`` (float32) and the present cache out.  Per layer::

    h = x + o_proj(attention(rope(q(rms(x))), rope(k(rms(x))), v(rms(x)), cache))
    x' = h + down(silu(gate(rms(h))) * up(rms(h)))

where attention is causal softmax attention with GQA (each kv head serves ``q_heads / kv_heads``
query heads) that appends the new keys and values to the cache and reads it.  Per joint head
group (:mod:`kvcompile.export.layout`) that is one ``KVAttention`` node, which reads the packed
segments without a de-quantized copy in the graph; a plain fp16 group concatenates and attends in
standard ops.  The *unfused* form (``fused=False``, what the TensorRT target builds until its
plugin implements KVAttention) has a ``KVCacheUpdate`` node per stream returning every position
de-quantized, and standard attention over that.  The maths follows ``transformers``'
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
from kvcompile.ops.attention import KV_ATTENTION, KV_ATTENTION_PORTABLE, attention_attrs
from kvcompile.ops.cache_update import KV_CACHE_UPDATE, parse_age_tiers
from kvcompile.quant import get_scheme
from kvcompile.quant.base import native_readable
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


def _plain_states(b: Builder, group: HeadGroup, states: str) -> str:
    """A plain group's fp16 cache: ``present = past ++ fp16(states)``; returns it as float32."""
    port = group.ports[0]
    present = b.op("Concat", port.past, b.op("Cast", states, to=10), axis=2, outputs=[port.present])
    return b.op("Cast", present, to=1)


def _expand_kv(b: Builder, x: str, heads: int, r: int, d: int) -> str:
    """[B, heads, L, D] -> [B, heads r, L, D]: kv head j serves query heads j r .. j r + r - 1 (GQA)."""
    if r == 1:
        return x
    return b.op("Reshape", b.op("Expand", b.op("Unsqueeze", x, b.i64(2)), b.i64(1, 1, r, 1, 1)),
                b.i64(0, heads * r, -1, d))


def _attention(b: Builder, q: str, k_all: str, v_all: str, heads: int, r: int, d: int, scale: float, mask: str) -> str:
    """Causal softmax attention in standard ops: q [B, heads r, S, D] over k_all / v_all [B, heads, L, D]."""
    k_all, v_all = _expand_kv(b, k_all, heads, r, d), _expand_kv(b, v_all, heads, r, d)
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k_all, perm=[0, 1, 3, 2])), b.const(scale))
    return b.op("MatMul", b.op("Softmax", b.op("Add", scores, mask), axis=-1), v_all)


def attention_op(key_group: HeadGroup, value_group: HeadGroup):
    """The op a fused head group emits: ``KVAttention``, or ``KVAttentionPortable`` (its function
    body always runs) when a format of its keys or values has no native kernel (:func:`native_readable`)."""
    schemes = [name for g in (key_group, value_group)
               for name in (g.sink_scheme, g.recent_scheme, g.bulk_scheme, *(n for n, _ in parse_age_tiers(g.age_tiers)))]
    return KV_ATTENTION if all(native_readable(get_scheme(s)) for s in schemes) else KV_ATTENTION_PORTABLE


def layer_attention(b: Builder, pmap: PrecisionMap, key_groups: list[HeadGroup], value_groups: list[HeadGroup],
                    q: str, k: str, v: str, shape: tuple[int, int, int], scale: float, mask: str, fused: bool) -> str:
    """One layer's attention over its head groups; returns the context [B, Hq, S, D].

    ``shape`` = (query heads, kv heads, head dim).  Each joint head group attends on its own
    query heads: a plain group over its fp16 cache in standard ops; a packed one through one
    ``KVAttention`` node (``fused``) or, unfused, a ``KVCacheUpdate`` node per stream followed by
    standard attention over the de-quantized states.
    """
    hq, hkv, d = shape
    r = hq // hkv
    outputs, order = [], []
    for kg, vg in zip(key_groups, value_groups):
        assert kg.heads == vg.heads and kg.plain == vg.plain
        q_heads = tuple(h * r + j for h in kg.heads for j in range(r))
        q_g = _select_heads(b, q, q_heads, hq)
        k_g, v_g = _select_heads(b, k, kg.heads, hkv), _select_heads(b, v, kg.heads, hkv)
        if kg.plain:
            out = _attention(b, q_g, _plain_states(b, kg, k_g), _plain_states(b, vg, v_g), len(kg.heads), r, d, scale,
                             mask)
        elif fused:
            attrs = attention_attrs(kg.op_attrs(pmap), vg.op_attrs(pmap), r, scale)
            names = [b.fresh("attention")] + [p.present for p in kg.ports] + [p.present for p in vg.ports]
            inputs = [q_g, k_g, v_g] + [p.past for p in kg.ports] + [p.past for p in vg.ports]
            out = attention_op(kg, vg).emit(b, attrs, inputs, names)[0]
        else:
            states = []
            for g, x in ((kg, k_g), (vg, v_g)):
                names = [p.present for p in g.ports] + [b.fresh("all_states")]
                states.append(KV_CACHE_UPDATE.emit(b, g.op_attrs(pmap), [p.past for p in g.ports] + [x], names)[-1])
            out = _attention(b, q_g, *states, len(kg.heads), r, d, scale, mask)
        outputs.append(out)
        order.extend(q_heads)
    ctx = b.op("Concat", *outputs, axis=1) if len(outputs) > 1 else outputs[0]
    if order != list(range(hq)):
        ctx = b.op("Gather", ctx, b.const(list(np.argsort(order)), np.int64), axis=1)
    return ctx


def build_llama_graph(model: Any, pmap: PrecisionMap, groups: list[HeadGroup], max_context: int, fused: bool = True):
    """Returns ``(builder, weights, cache output names)`` for a ``LlamaForCausalLM``-like model
    (``fused``: attention through ``KVAttention`` nodes; else ``KVCacheUpdate`` + standard ops)."""
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

    cache_outputs = [p.present for g in groups for p in g.ports]
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
        ctx = layer_attention(b, pmap, by_layer[(i, "key")], by_layer[(i, "value")], q, k, v, (hq, hkv, d),
                              float(attn.scaling), mask, fused)
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]), b.i64(0, 0, hq * d))
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
