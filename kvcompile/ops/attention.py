"""``kvcompile::KVAttention``: causal attention that reads and extends a head group's packed cache.

One node per (layer, joint head group): the H kv heads whose key schemes and value schemes are
equal in every position class (:func:`kvcompile.kv.grouping.joint_groups`), and the ``H * r``
query heads they serve (GQA ratio ``r = q_per_kv``; kv head j serves query heads ``j r .. j r + r-1``
of the group).

Inputs::

    query   float32 [B, H*r, S, D]   queries of positions P .. P+S-1 (RoPE applied)
    key     float32 [B, H, S, D]     their keys (RoPE applied)
    value   float32 [B, H, S, D]     their values
    past key segments' parts, then past value segments' parts   (as KVCacheUpdate's inputs)
    rope_cos, rope_sin  float32 [N, D]  only when a key scheme stores keys before RoPE (``-pr``)

Outputs::

    output  float32 [B, H*r, S, D]   o_i = sum_{j <= P+i} softmax_j(scale * q_i . k_j) v_j
    present key segments' parts, then present value segments' parts

where ``k_j`` / ``v_j`` are the positions *as stored* (de-quantized from the segment that holds
them after this step's append), so the new positions are read quantized, as later steps will read
them.  The append is :mod:`kvcompile.ops.cache_update`'s, for keys and values separately; the
attributes are those of the two streams' ``KVCacheUpdate`` prefixed ``key_`` / ``value_`` (the
sink count, window and head dim shared), plus ``q_per_kv`` and the softmax ``scale``.

Three implementations of this one meaning:

* the torch reference (the oracle): :class:`~kvcompile.kv.store.SegmentStore` appends, then
  attention in float32 over the de-quantized segments;
* the ONNX function body (standard ops, stock ONNX Runtime): KVCacheUpdate's body inlined twice,
  then MatMul / Softmax attention.  The de-quantized cache exists only inside the function;
* the native kernel (``native/``, :mod:`kvcompile.kernels.native`): appends into the present
  buffers and attends with de-quantization inside the dot products, never materializing the cache.

``KVAttentionPortable`` is the same op under a name the native library does not claim: the
exporter emits it for a head group whose formats the library cannot read, so that group runs the
function body while the others run natively.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvcompile.ops.cache_update import rope_ports, run_cache_update, segment_ports, update_body
from kvcompile.ops.spec import Attribute, OpSpec, Port, register_op

STREAM_ATTRIBUTES = ("sink_scheme", "recent_scheme", "bulk_scheme", "age_tiers")
SHARED_ATTRIBUTES = ("sink_tokens", "recent_window", "head_dim")

ATTRIBUTES = (
    *(Attribute(f"{stream}_{name}", "string", f"the {stream} stream's KVCacheUpdate attribute {name}")
      for stream in ("key", "value") for name in STREAM_ATTRIBUTES),
    Attribute("sink_tokens", "int", "n, number of sink positions (0 = no sink segment)"),
    Attribute("recent_window", "int", "w, positions kept in the recent scheme"),
    Attribute("head_dim", "int", "D, the head dimension"),
    Attribute("q_per_kv", "int", "r, query heads per kv head (GQA ratio; 1 = multi-head attention)"),
    Attribute("scale", "float", "softmax scale applied to q.k (1/sqrt(D) for most models)"),
)


def stream_attrs(attrs, stream: str) -> dict:
    """The KVCacheUpdate attributes of one stream (``"key"`` or ``"value"``) of a KVAttention node."""
    out = {name: attrs[f"{stream}_{name}"] for name in STREAM_ATTRIBUTES}
    out.update({name: attrs[name] for name in SHARED_ATTRIBUTES})
    return out


def attention_attrs(key: dict, value: dict, q_per_kv: int, scale: float) -> dict:
    """KVAttention attributes from the two streams' KVCacheUpdate attributes."""
    for name in SHARED_ATTRIBUTES:
        if key[name] != value[name]:
            raise ValueError(f"KVAttention: key and value streams must share {name}, got {key[name]} and {value[name]}")
    attrs = {f"{stream}_{name}": a[name] for stream, a in (("key", key), ("value", value)) for name in STREAM_ATTRIBUTES}
    attrs.update({name: key[name] for name in SHARED_ATTRIBUTES})
    attrs.update({"q_per_kv": int(q_per_kv), "scale": float(scale)})
    return attrs


def _inputs(attrs):
    return (Port("query", "float32", ("B", "H*r", "S", "D")), Port("key", "float32", ("B", "H", "S", "D")),
            Port("value", "float32", ("B", "H", "S", "D")),
            *segment_ports(stream_attrs(attrs, "key"), "past_key"),
            *segment_ports(stream_attrs(attrs, "value"), "past_value"),
            *rope_ports(stream_attrs(attrs, "key")))


def _outputs(attrs):
    return (Port("output", "float32", ("B", "H*r", "S", "D")),
            *segment_ports(stream_attrs(attrs, "key"), "present_key"),
            *segment_ports(stream_attrs(attrs, "value"), "present_value"))


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_per_kv: int,
                     scale: float, window: int = 0) -> torch.Tensor:
    """``softmax(scale q K^T + causal mask) V`` in float32.

    ``query`` [B, H*r, S, D] holds the last S of the L positions of ``keys`` / ``values`` [B, H, L, D];
    query i (position L - S + i) attends to positions 0 .. L - S + i, with ``window`` W > 0 only to
    those fewer than W back (``L - S + i - W < j``).
    """
    s, length = query.shape[2], keys.shape[2]
    k = keys.repeat_interleave(q_per_kv, dim=1)
    v = values.repeat_interleave(q_per_kv, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scale
    j, i = torch.arange(length)[None, :], torch.arange(length - s, length)[:, None]
    allowed = j <= i  # [S, L]
    if window:
        allowed &= i - j < window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs @ v


def run_attention(attrs, tensors: list, quantize=None) -> tuple:
    """The op on torch tensors: ``(output, *present key parts, *present value parts)``."""
    query, key, value = tensors[:3]
    k_attrs, v_attrs = stream_attrs(attrs, "key"), stream_attrs(attrs, "value")
    n_key, n_value = len(segment_ports(k_attrs, "past")), len(segment_ports(v_attrs, "past"))
    rope = tensors[3 + n_key + n_value:]  # the RoPE tables of pre-RoPE keys, else none
    k_out = run_cache_update(k_attrs, [*tensors[3:3 + n_key], key, *rope], quantize)
    v_out = run_cache_update(v_attrs, [*tensors[3 + n_key:3 + n_key + n_value], value], quantize)
    output = causal_attention(query, k_out[-1], v_out[-1], attrs["q_per_kv"], attrs["scale"])
    return (output, *k_out[:-1], *v_out[:-1])


def _reference(attrs, *tensors):
    return run_attention(attrs, list(tensors))


def _body(b, attrs, inputs):
    query, key, value = inputs[:3]
    k_attrs, v_attrs = stream_attrs(attrs, "key"), stream_attrs(attrs, "value")
    n_key, n_value = len(segment_ports(k_attrs, "past")), len(segment_ports(v_attrs, "past"))
    rope = tuple(inputs[3 + n_key + n_value:]) or None
    k_present, keys = update_body(b, k_attrs, inputs[3:3 + n_key], key, rope)
    v_present, values = update_body(b, v_attrs, inputs[3 + n_key:3 + n_key + n_value], value)
    return [attention_body(b, query, keys, values, attrs["q_per_kv"], attrs["scale"]), *k_present, *v_present]


def attention_body(b, query: str, keys: str, values: str, q_per_kv: int, scale: float, window: int = 0) -> str:
    """:func:`causal_attention` in standard ONNX ops: ``query`` [B, H*r, S, D] over the L stored
    positions of ``keys`` / ``values`` [B, H, L, D] (the last S of them are the queries')."""
    if q_per_kv > 1:  # kv head j serves query heads j r .. j r + r - 1: [B, H, L, D] -> [B, H r, L, D]
        expand = b.i64(1, 1, q_per_kv, 1, 1)
        shape = b.op("Concat", b.i64(0, -1), b.op("Shape", keys, start=2), axis=0)
        keys = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", keys, b.i64(2)), expand), shape)
        values = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", values, b.i64(2)), expand), shape)
    scores = b.op("Mul", b.op("MatMul", query, b.op("Transpose", keys, perm=[0, 1, 3, 2])), b.const(scale))
    total = b.op("Squeeze", b.dim(keys, 2))
    first = b.op("Sub", total, b.op("Squeeze", b.dim(query, 2)))
    positions = b.op("Unsqueeze", b.op("Range", first, total, b.scalar_i64(1)), b.i64(1))  # [S, 1]
    stored = b.op("Unsqueeze", b.op("Range", b.scalar_i64(0), total, b.scalar_i64(1)), b.i64(0))  # [1, L]
    allowed = b.op("LessOrEqual", stored, positions)
    if window:
        allowed = b.op("And", allowed, b.op("Less", b.op("Sub", positions, stored), b.scalar_i64(window)))
    mask = b.op("Where", allowed, b.const(0.0), b.const(float("-inf")))
    probs = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
    return b.op("MatMul", probs, values)


KV_ATTENTION = register_op(OpSpec(
    name="KVAttention", version=1,
    doc="Append new K/V positions to a head group's packed segments and attend causally over all "
        "stored positions (GQA); returns the attention output and the present segments.",
    attributes=ATTRIBUTES,
    inputs=_inputs,
    outputs=_outputs,
    reference=_reference,
    body=_body,
))

#: the same op under a name no native library claims (its function body always runs)
KV_ATTENTION_PORTABLE = register_op(replace(KV_ATTENTION, name="KVAttentionPortable"))

__all__ = ["KV_ATTENTION", "KV_ATTENTION_PORTABLE", "attention_attrs", "attention_body", "causal_attention",
           "run_attention", "stream_attrs"]
