"""ONNX graph of a Llama-like decoder whose KV cache goes through ``kvcompile`` ops.

One builder serves every registered architecture: what a family changes in the layer (norm
placement and weight offset, q/k norms, activation, embedding scale) is its adapter's
:class:`~kvcompile.models.adapters.DecoderTraits`, and per-layer RoPE tables come from the model's
own rotary module (one per layer type, e.g. Gemma 3's local and global bases).

One graph serves prefill and decode: ``input_ids`` ``[batch, sequence]`` (positions
``P .. P+S-1``, P the number of cached positions read off the past inputs of the first
full-attention layer) and the past cache in; ``logits`` ``[batch, sequence, vocab]`` (float32) and
the present cache out.  Per layer (Llama; see ``DecoderTraits`` for the others)::

    h = x + o_proj(attention(rope(q(rms(x))), rope(k(rms(x))), v(rms(x)), cache))
    x' = h + down(silu(gate(rms(h))) * up(rms(h)))

where attention is causal softmax attention with GQA (each kv head serves ``q_heads / kv_heads``
query heads) that appends the new keys and values to the cache and reads it.  Per joint head
group (:mod:`kvcompile.export.layout`) that is one ``KVAttention`` node, which reads the packed
segments without a de-quantized copy in the graph; a plain fp16 group concatenates and attends in
standard ops.  The *unfused* form (``fused=False``, what the TensorRT target's Python-plugin
fallback builds) has a ``KVCacheUpdate`` node per stream returning every position
de-quantized, and standard attention over that.  The maths follows the model's ``transformers``
implementation in float32; RoPE uses cos/sin tables computed by the model's own rotary module
(so any RoPE scaling it implements is reproduced), which bounds the context at the table length.

A sliding-window layer (window W) attends over its stored positions ``P - R .. P - 1`` (R <= W - 1
rows in its past inputs) and the new ones, masked to ``q - W < k <= q``, and returns the last
``W - 1`` of them as its present cache: fp16, or a per-token scheme appended and read by the
bodies of ``KVQuantize`` and ``KVDequantize`` inlined as standard ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcompile.errors import ExportError
from kvcompile.export.layout import HeadGroup
from kvcompile.models.adapters import DecoderTraits
from kvcompile.ops.builder import Builder
from kvcompile.ops.attention import KV_ATTENTION, KV_ATTENTION_PORTABLE, attention_attrs
from kvcompile.ops.cache_update import KV_CACHE_UPDATE, parse_age_tiers, pre_rope
from kvcompile.ops.quantize import KV_DEQUANTIZE, KV_QUANTIZE
from kvcompile.ops.window_attention import KV_WINDOW_ATTENTION, window_attrs
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


def _rms_norm(b: Builder, w: Weights, x: str, module, name: str, eps: float, offset: float = 0.0) -> str:
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last axis."""
    variance = b.op("ReduceMean", b.op("Mul", x, x), b.i64(-1), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps))))
    weight = module.weight.detach().float().numpy() + np.float32(offset)
    return b.op("Mul", w.add(f"{name}.weight", weight), b.op("Mul", x, inv))


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
    """P as a 1-D int64 tensor, from the first full-attention layer's first key group (every group
    of such a layer holds P positions; a window layer holds at most W - 1)."""
    full = [g for g in groups if not g.window]
    if not full:
        raise ExportError("every layer has a sliding window, so the cache does not tell the position; expected at "
                          "least one full-attention layer")
    g = full[0]
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


def _window_states(b: Builder, group: HeadGroup, states: str, head_dim: int) -> str:
    """A window layer's group: ``all = past ++ new`` (fp16, or the parts of its per-token scheme),
    the present cache = the last ``W - 1`` rows of it; returns ``all`` de-quantized, float32."""
    keep, end, axis = b.i64(-(group.window - 1)), b.i64(np.iinfo(np.int64).max), b.i64(2)
    if group.plain:
        port = group.ports[0]
        full = b.op("Concat", port.past, b.op("Cast", states, to=10), axis=2)
        b.op("Slice", full, keep, end, axis, outputs=[port.present])
        return b.op("Cast", full, to=1)
    # The KVQuantize / KVDequantize bodies, inlined: TensorRT's ONNX parser resolves model-local
    # functions by name only, so two schemes' overloads of one op in a graph would collide there.
    attrs = {"scheme": group.bulk_scheme, "head_dim": head_dim}
    new = KV_QUANTIZE.body(b, attrs, [states])
    parts = []
    for port, part in zip(group.ports, new):
        full = b.op("Concat", port.past, part, axis=2)
        b.op("Slice", full, keep, end, axis, outputs=[port.present])
        parts.append(full)
    return KV_DEQUANTIZE.body(b, attrs, parts)[0]


def attention_op(key_group: HeadGroup, value_group: HeadGroup):
    """The op a fused head group emits: ``KVAttention``, or ``KVAttentionPortable`` (its function
    body always runs) when a format of its keys or values has no native kernel (:func:`native_readable`)."""
    schemes = [name for g in (key_group, value_group)
               for name in (g.sink_scheme, g.recent_scheme, g.bulk_scheme, *(n for n, _ in parse_age_tiers(g.age_tiers)))]
    return KV_ATTENTION if all(native_readable(get_scheme(s)) for s in schemes) else KV_ATTENTION_PORTABLE


def layer_attention(b: Builder, pmap: PrecisionMap, key_groups: list[HeadGroup], value_groups: list[HeadGroup],
                    q: str, k: str, v: str, shape: tuple[int, int, int], scale: float, mask: str, fused: bool,
                    window_op: bool = True, rope: tuple[str, str] = ()) -> str:
    """One layer's attention over its head groups; returns the context [B, Hq, S, D].

    ``shape`` = (query heads, kv heads, head dim); ``mask`` [S, L] additive, L the keys this layer
    reads (a window layer: its stored rows and the new ones).  A window layer's packed group attends
    through one ``KVWindowAttention`` node (``fused`` and ``window_op``, formats the native library
    reads), else, like its plain fp16 group, in standard ops over its window (:func:`_window_states`).  Each joint head group attends on its own
    query heads: a plain group over its fp16 cache in standard ops; a packed one through one
    ``KVAttention`` node (``fused``) or, unfused, a ``KVCacheUpdate`` node per stream followed by
    standard attention over the de-quantized states.  ``rope``: the layer's RoPE tables [N, D]
    (initializer names), passed to the nodes whose keys are stored before RoPE.
    """
    hq, hkv, d = shape
    r = hq // hkv
    outputs, order = [], []
    for kg, vg in zip(key_groups, value_groups):
        assert kg.heads == vg.heads and kg.plain == vg.plain
        q_heads = tuple(h * r + j for h in kg.heads for j in range(r))
        q_g = _select_heads(b, q, q_heads, hq)
        k_g, v_g = _select_heads(b, k, kg.heads, hkv), _select_heads(b, v, kg.heads, hkv)
        if kg.window and not kg.plain and fused and window_op and all(
                native_readable(get_scheme(g.bulk_scheme)) for g in (kg, vg)):
            attrs = window_attrs(kg.bulk_scheme, vg.bulk_scheme, kg.window, d, r, scale)
            names = [b.fresh("attention")] + [p.present for p in kg.ports] + [p.present for p in vg.ports]
            inputs = [q_g, k_g, v_g] + [p.past for p in kg.ports] + [p.past for p in vg.ports]
            out = KV_WINDOW_ATTENTION.emit(b, attrs, inputs, names)[0]
        elif kg.window:
            out = _attention(b, q_g, _window_states(b, kg, k_g, d), _window_states(b, vg, v_g, d), len(kg.heads), r, d,
                             scale, mask)
        elif kg.plain:
            out = _attention(b, q_g, _plain_states(b, kg, k_g), _plain_states(b, vg, v_g), len(kg.heads), r, d, scale,
                             mask)
        elif fused:
            attrs = attention_attrs(kg.op_attrs(pmap), vg.op_attrs(pmap), r, scale)
            names = [b.fresh("attention")] + [p.present for p in kg.ports] + [p.present for p in vg.ports]
            inputs = [q_g, k_g, v_g] + [p.past for p in kg.ports] + [p.past for p in vg.ports]
            inputs += list(rope) if pre_rope(kg.op_attrs(pmap)) else []
            out = attention_op(kg, vg).emit(b, attrs, inputs, names)[0]
        else:
            states = []
            for g, x in ((kg, k_g), (vg, v_g)):
                names = [p.present for p in g.ports] + [b.fresh("all_states")]
                tables = list(rope) if pre_rope(g.op_attrs(pmap)) else []
                states.append(KV_CACHE_UPDATE.emit(b, g.op_attrs(pmap), [p.past for p in g.ports] + [x] + tables,
                                                   names)[-1])
            out = _attention(b, q_g, *states, len(kg.heads), r, d, scale, mask)
        outputs.append(out)
        order.extend(q_heads)
    ctx = b.op("Concat", *outputs, axis=1) if len(outputs) > 1 else outputs[0]
    if order != list(range(hq)):
        ctx = b.op("Gather", ctx, b.const(list(np.argsort(order)), np.int64), axis=1)
    return ctx


def _rope_tables(model, max_context: int) -> dict[str, tuple]:
    """``{layer type: (cos, sin)}`` ``[max_context, D]`` float32 numpy arrays (:func:`kvcompile.models.rope.rope_tables`)."""
    from kvcompile.models.rope import rope_tables

    return {kind: (cos.numpy(), sin.numpy()) for kind, (cos, sin) in rope_tables(model, max_context).items()}


def _mask(b: Builder, pos: str, first_key: str, total: str, window: int) -> str:
    """[S, L] additive mask: query at ``pos`` reads key ``first_key + j`` iff it is not later and,
    with a window W, fewer than W positions back."""
    keys = b.op("Range", b.op("Squeeze", first_key), b.op("Squeeze", total), b.scalar_i64(1))  # [L]
    k, q = b.op("Unsqueeze", keys, b.i64(0)), b.op("Unsqueeze", pos, b.i64(1))
    allowed = b.op("LessOrEqual", k, q)
    if window:
        allowed = b.op("And", allowed, b.op("Less", b.op("Sub", q, k), b.i64(window)))
    return b.op("Where", allowed, b.const(0.0), b.const(-np.inf))


def _activation(b: Builder, x: str, kind: str) -> str:
    if kind == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if kind == "gelu_tanh":
        return b.op("Gelu", x, approximate="tanh")
    raise ExportError(f"activation {kind!r} is not supported; expected silu or gelu_tanh")


def build_decoder_graph(model: Any, pmap: PrecisionMap, groups: list[HeadGroup], max_context: int, fused: bool = True,
                        traits: DecoderTraits = DecoderTraits(), window_op: bool = True):
    """Returns ``(builder, weights, cache output names)`` for a ``*ForCausalLM`` whose layers
    follow ``traits`` (``fused``: attention through ``KVAttention`` nodes, and window layers'
    packed groups through ``KVWindowAttention`` nodes unless ``window_op`` is False; else
    ``KVCacheUpdate`` + standard ops)."""
    config = model.config
    inner = model.model
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    eps = float(config.rms_norm_eps)
    activation = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    expected = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}[traits.activation]
    if activation not in expected:
        raise ExportError(f"{config.model_type}: activation {activation!r} is not supported; expected "
                          f"{' or '.join(expected)}")
    b, w = Builder("model"), Weights()
    offset = traits.norm_weight_offset

    def norm(x: str, module, name: str) -> str:
        return _rms_norm(b, w, x, module, name, eps, offset)

    embed = w.add("embed_tokens.weight", inner.embed_tokens.weight.detach().numpy())
    x = b.op("Gather", embed, "input_ids", axis=0)  # [B, S, hidden]
    if traits.embedding_scale != 1.0:  # Gemma: the scale rounded to the weights' dtype, as the model does
        x = b.op("Mul", x, b.const(float(np.float32(traits.embedding_scale))))
    p_len = past_length(b, groups)
    s_len = b.op("Shape", "input_ids", start=1, end=2)
    total = b.op("Add", p_len, s_len)
    pos = b.op("Range", b.op("Squeeze", p_len), b.op("Squeeze", total), b.scalar_i64(1))  # [S]
    tables, full_tables = {}, {}
    for kind, (cos, sin) in _rope_tables(model, max_context).items():
        suffix = f".{kind}" if kind else ""
        full_tables[kind] = tuple(w.add(f"rope{suffix}.{n}", t) for n, t in (("cos", cos), ("sin", sin)))  # [N, D]
        gather = [b.op("Unsqueeze", b.op("Gather", table, pos, axis=0), b.i64(0, 1))
                  for table in full_tables[kind]]  # [1, 1, S, D]
        tables[kind] = tuple(gather)
    layer_types = getattr(config, "layer_types", None)
    predictor_weights, previous = None, None
    if pmap.predictors is not None:  # every layer's states go through kvcompile.export.predicted
        from kvcompile.export.predicted import add_predictor_weights
        from kvcompile.kv.predict import resolve

        predictor_weights = add_predictor_weights(w, resolve(pmap.predictors))

    cache_outputs = [p.present for g in groups for p in g.ports]
    by_layer: dict[tuple[int, str], list[HeadGroup]] = {}
    for g in groups:
        by_layer.setdefault((g.layer, g.stream), []).append(g)
    full_mask = _mask(b, pos, b.i64(0), total, 0)
    names = traits.norm_names

    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        name = f"layers.{i}"
        kind = layer_types[i] if len(tables) > 1 else next(iter(tables))
        cos, sin = tables[kind]
        window = pmap.window(i)
        if window:  # keys: the rows this layer's first group stores, then the new positions
            port = by_layer[(i, "key")][0].ports[0]
            first = b.op("Sub", p_len, b.op("Shape", port.past, start=2, end=3))
            mask = _mask(b, pos, first, total, window)
        else:
            mask = full_mask
        h = norm(x, getattr(layer, names[0]), f"{name}.{names[0]}")
        q = _heads(b, _linear(b, w, h, attn.q_proj, f"{name}.q_proj"), hq, d)
        k = _heads(b, _linear(b, w, h, attn.k_proj, f"{name}.k_proj"), hkv, d)
        if traits.qk_norms:
            q, k = norm(q, attn.q_norm, f"{name}.q_norm"), norm(k, attn.k_norm, f"{name}.k_norm")
        q, k = _rope(b, q, cos, sin, d), _rope(b, k, cos, sin, d)
        v = _heads(b, _linear(b, w, h, attn.v_proj, f"{name}.v_proj"), hkv, d)
        if predictor_weights is not None:
            from kvcompile.export.predicted import predicted_states

            previous = predicted_states(b, pmap, i, {s: by_layer[(i, s)] for s in ("key", "value")},
                                        {"key": k, "value": v}, p_len, full_tables[kind], predictor_weights, previous)
            ctx = _attention(b, q, previous["full"]["key"], previous["full"]["value"], hkv, hq // hkv, d,
                             float(attn.scaling), mask)
        else:
            ctx = layer_attention(b, pmap, by_layer[(i, "key")], by_layer[(i, "value")], q, k, v, (hq, hkv, d),
                                  float(attn.scaling), mask, fused, window_op, full_tables[kind])
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]), b.i64(0, 0, hq * d))
        out = _linear(b, w, ctx, attn.o_proj, f"{name}.o_proj")
        if names[1]:
            out = norm(out, getattr(layer, names[1]), f"{name}.{names[1]}")
        x = b.op("Add", x, out)
        h = norm(x, getattr(layer, names[2]), f"{name}.{names[2]}")
        gate = _linear(b, w, h, mlp.gate_proj, f"{name}.gate_proj")
        act = b.op("Mul", _activation(b, gate, traits.activation), _linear(b, w, h, mlp.up_proj, f"{name}.up_proj"))
        out = _linear(b, w, act, mlp.down_proj, f"{name}.down_proj")
        if names[3]:
            out = norm(out, getattr(layer, names[3]), f"{name}.{names[3]}")
        x = b.op("Add", x, out)

    x = norm(x, inner.norm, "norm")
    hidden = config.hidden_size
    flat = b.op("Reshape", x, b.i64(-1, hidden))
    head = model.lm_head.weight
    head_name = embed if head.data_ptr() == inner.embed_tokens.weight.data_ptr() else w.add("lm_head.weight",
                                                                                            head.detach().numpy())
    logits = b.op("Gemm", flat, head_name, transB=1)
    out_shape = b.op("Concat", b.op("Shape", "input_ids"), b.i64(-1), axis=0)
    b.op("Reshape", logits, out_shape, outputs=["logits"])
    return b, w, cache_outputs
