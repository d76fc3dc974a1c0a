"""``kvcompile::KVWindowAttention``: sliding-window attention that reads and extends a packed window.

One node per (sliding-window layer, joint head group): the H kv heads whose key scheme and value
scheme are equal, and the ``H * r`` query heads they serve.  A window layer stores each position
once, in one per-token scheme per stream (:class:`kvcompile.kv.store.WindowStore`), and a query
at position i reads keys ``i - W < j <= i``; so between steps the cache holds only the last
``W - 1`` positions.

Inputs::

    query   float32 [B, H*r, S, D]   queries of positions P .. P+S-1 (RoPE applied)
    key     float32 [B, H, S, D]     their keys (RoPE applied)
    value   float32 [B, H, S, D]     their values
    past_key_window.{part}, past_value_window.{part}   the scheme's parts, T <= W - 1 rows each

Outputs::

    output  float32 [B, H*r, S, D]   o_i = sum_{T+i-W < j <= T+i} softmax_j(scale * q_i . k_j) v_j
    present_key_window.{part}, present_value_window.{part}   the last min(T + S, W - 1) rows

over the stored positions ``j = 0 .. T+S-1`` of ``past ++ Q(new)`` (query i is stored position
``T + i``), each read de-quantized, the new ones too, as later steps will read them.  Absolute
positions do not enter: the window counts stored positions back from the query, which is exact
because the stored positions are the consecutive last ones.

Three implementations of this one meaning:

* the torch reference (the oracle): :class:`~kvcompile.kv.store.WindowStore` appends and evicts,
  attention in float32 over the de-quantized ``past ++ new``;
* the ONNX function body (standard ops): the scheme's lowering (quantize, Concat, de-quantize),
  masked MatMul / Softmax attention, ``Slice`` of the last ``W - 1`` rows;
* the native kernel (``native/src/kv_attention.cc``, ``run_window_attention``): quantizes the new
  rows, attends with de-quantization inside the dot products from the past rows and the new ones,
  and copies the kept rows into the present outputs.
"""

from __future__ import annotations

import torch

from kvcompile.kv.store import WindowStore, reference_quantize
from kvcompile.ops.attention import attention_body, causal_attention
from kvcompile.ops.builder import INT_MAX
from kvcompile.ops.lowering import lowering
from kvcompile.ops.quantize import part_ports
from kvcompile.ops.spec import Attribute, OpSpec, Port, register_op
from kvcompile.quant import QuantizedTensor, get_scheme
from kvcompile.quant.base import part_layout

ATTRIBUTES = (
    Attribute("key_scheme", "string", "the keys' per-token storage scheme"),
    Attribute("value_scheme", "string", "the values' per-token storage scheme"),
    Attribute("window", "int", "W >= 2: a query reads itself and the W - 1 positions before it"),
    Attribute("head_dim", "int", "D, the head dimension"),
    Attribute("q_per_kv", "int", "r, query heads per kv head (GQA ratio; 1 = multi-head attention)"),
    Attribute("scale", "float", "softmax scale applied to q.k"),
)


def check_window_attrs(attrs) -> None:
    """One line (ValueError) unless the window and the schemes are ones this op can hold."""
    if attrs["window"] < 2:
        raise ValueError(f"KVWindowAttention: window must be >= 2, got {attrs['window']}")
    for stream in ("key", "value"):
        scheme = get_scheme(attrs[f"{stream}_scheme"])
        if scheme.token_group != 1:
            raise ValueError(f"KVWindowAttention: {scheme.name} groups positions; a window holds a per-token scheme")


def window_attrs(key_scheme: str, value_scheme: str, window: int, head_dim: int, q_per_kv: int, scale: float) -> dict:
    """The op's attributes, checked (:func:`check_window_attrs`)."""
    attrs = {"key_scheme": key_scheme, "value_scheme": value_scheme, "window": int(window), "head_dim": int(head_dim),
             "q_per_kv": int(q_per_kv), "scale": float(scale)}
    check_window_attrs(attrs)
    return attrs


def _ports(attrs, prefix: str) -> tuple[Port, ...]:
    return (*part_ports(attrs["key_scheme"], attrs["head_dim"], prefix=f"{prefix}_key_window."),
            *part_ports(attrs["value_scheme"], attrs["head_dim"], prefix=f"{prefix}_value_window."))


def _inputs(attrs):
    return (Port("query", "float32", ("B", "H*r", "S", "D")), Port("key", "float32", ("B", "H", "S", "D")),
            Port("value", "float32", ("B", "H", "S", "D")), *_ports(attrs, "past"))


def _outputs(attrs):
    return (Port("output", "float32", ("B", "H*r", "S", "D")), *_ports(attrs, "present"))


def run_window_attention(attrs, tensors: list, quantize=None) -> tuple:
    """The op on torch tensors: ``(output, *present key parts, *present value parts)``."""
    check_window_attrs(attrs)
    query, key, value = tensors[:3]
    d, w = attrs["head_dim"], attrs["window"]
    it = iter(tensors[3:])
    reads, presents = [], []
    for stream, states in (("key", key), ("value", value)):
        scheme = get_scheme(attrs[f"{stream}_scheme"])
        layout = part_layout(scheme, d)
        parts = {p.name: next(it) for p in layout}
        store = WindowStore([], scheme, w, quantize or reference_quantize)
        rows = parts[layout[0].name].shape[-2]
        if rows > w - 1:
            raise ValueError(f"KVWindowAttention: the past {stream} window holds {rows} positions, expected at most "
                             f"W - 1 = {w - 1}")
        if rows:
            store.segments["window"] = QuantizedTensor(scheme.name, (*states.shape[:2], rows, d), parts)
        store.append(states, 0)
        reads.append(store.read())
        store.evict()
        kept = store.segments["window"]
        presents.extend(kept.parts[p.name] if kept is not None else
                        torch.empty(*states.shape[:2], 0, p.width, dtype=p.dtype, device=states.device) for p in layout)
    output = causal_attention(query, reads[0], reads[1], attrs["q_per_kv"], attrs["scale"], w)
    return (output, *presents)


def _reference(attrs, *tensors):
    return run_window_attention(attrs, list(tensors))


def _body(b, attrs, inputs):
    query, key, value = inputs[:3]
    d, w, r = attrs["head_dim"], attrs["window"], attrs["q_per_kv"]
    it = iter(inputs[3:])
    keep, end, axis = b.i64(-(w - 1)), b.i64(INT_MAX), b.i64(2)
    full, presents = [], []
    for stream, states in (("key", key), ("value", value)):
        scheme = get_scheme(attrs[f"{stream}_scheme"])
        quantize, dequantize = lowering(scheme)
        past = [next(it) for _ in part_layout(scheme, d)]
        parts = [b.op("Concat", p, n, axis=2) for p, n in zip(past, quantize(b, scheme, states, d))]
        presents.extend(b.op("Slice", p, keep, end, axis) for p in parts)
        full.append(dequantize(b, scheme, parts, d))
    keys, values = full
    return [attention_body(b, query, keys, values, r, attrs["scale"], w), *presents]


KV_WINDOW_ATTENTION = register_op(OpSpec(
    name="KVWindowAttention", version=1,
    doc="Append new K/V positions to a sliding-window head group's packed window, attend over the "
        "last W positions of each query, and keep the last W - 1.",
    attributes=ATTRIBUTES,
    inputs=_inputs,
    outputs=_outputs,
    reference=_reference,
    body=_body,
))

__all__ = ["KV_WINDOW_ATTENTION", "check_window_attrs", "run_window_attention", "window_attrs"]
