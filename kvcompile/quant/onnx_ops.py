"""Building blocks for writing a storage format in standard ONNX ops (its *ONNX lowering*).

A family's lowering lives in the family's module beside its torch reference and reproduces it
operation for operation, in the same float32 order, so that ONNX Runtime produces the *same bits*
(tested on edge values in ``tests/unit/test_ops.py``).  Functions here take a graph builder ``b``
(:class:`kvcompile.ops.builder.Builder`: ``op``, ``const``, ``i64``, ``dim``, ``reshape``) and
tensor names, and return tensor names; nothing here imports onnx.

Scales are rounded *up* and zero points *down* to float16 (``quant.base.round_to_dtype``); ONNX
has no directed-rounding cast, so :func:`round_fp16` does it arithmetically in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcompile.quant.hadamard import check_power_of_two, rotation_scale
from kvcompile.quant.packing import block_shape

#: a graph builder (kvcompile.ops.builder.Builder or anything with the same methods)
GraphBuilder = Any


def round_fp16(b: GraphBuilder, t: str, direction: str) -> str:
    """float32 ``t`` rounded to the float16 grid toward +inf (``"up"``) or -inf (``"down"``).

    Returned as a *float64* tensor holding an exact float16 value: cast it to float16 to store
    and to float32 to compute.  Computed arithmetically, as ``ceil(t / u) * u`` (or ``floor``)
    with ``u = 2^(max(floor(log2 |t|), -14) - 10)`` the float16 spacing of ``t``'s binade,
    rather than through float32 -> float16 -> float32 casts, because ONNX Runtime fuses such cast
    chains into nothing (even with graph optimizations off), dropping the rounding.
    """
    t64 = b.op("Cast", t, to=11)  # DOUBLE: exact for float32
    log2 = b.op("Div", b.op("Log", b.op("Abs", t64)), b.const(np.log(2.0), np.float64))
    exponent = b.op("Max", b.op("Floor", log2), b.const(-14.0, np.float64))  # log2(0) = -inf -> subnormal step
    spacing = b.op("Pow", b.const(2.0, np.float64), b.op("Sub", exponent, b.const(10.0, np.float64)))
    steps = b.op("Ceil" if direction == "up" else "Floor", b.op("Div", t64, spacing))
    return b.op("Mul", steps, spacing)


def stored_zero(b: GraphBuilder, t: str, float16: bool) -> tuple[str, str]:
    """``(stored, as_float32)`` zero point: rounded down to float16, or float32 as is (``-s32``)."""
    if not float16:
        return t, t
    r = round_fp16(b, t, "down")
    return b.op("Cast", r, to=10), b.op("Cast", r, to=1)


def stored_scale(b: GraphBuilder, t: str, float16: bool) -> tuple[str, str]:
    """``(stored, as_float32)`` scale: rounded up to float16 (or float32 as is), a zero scale (a
    constant group) replaced by the dtype's smallest normal value, as in the reference."""
    tiny = float(np.finfo(np.float16 if float16 else np.float32).tiny)
    r = round_fp16(b, t, "up") if float16 else t
    zero, small = (b.const(0.0, np.float64), b.const(tiny, np.float64)) if float16 else (b.const(0.0), b.const(tiny))
    r = b.op("Where", b.op("Equal", r, zero), small, r)
    return (b.op("Cast", r, to=10), b.op("Cast", r, to=1)) if float16 else (r, r)


def grouped_shape(b: GraphBuilder, x: str, group: int, axis: str) -> str:
    """Shape of ``x`` [B,H,T,D] split into groups: [B,H,T,D/G,G] (token) or [B,H,T/G,G,D] (channel)."""
    lead = b.op("Shape", x, start=0, end=2)
    t, d = b.dim(x, 2), b.dim(x, 3)
    g = b.i64(group)
    if axis == "token":
        return b.op("Concat", lead, t, b.op("Div", d, g), g, axis=0)
    return b.op("Concat", lead, b.op("Div", t, g), g, d, axis=0)


def pack(b: GraphBuilder, codes: str, bits: int) -> str:
    """int64 codes [B,H,T,n] in [0, 2^bits) -> int8 [B,H,T,n*bits/8] (layout of quant.packing)."""
    per, nbytes = block_shape(bits)
    lead = b.op("Shape", codes, start=0, end=3)
    n = b.dim(codes, 3)
    blocks = b.reshape(codes, b.op("Concat", lead, b.op("Div", n, b.i64(per)), b.i64(per), axis=0))
    weights = b.const([1 << (bits * i) for i in range(per)], np.int64)
    value = b.op("ReduceSum", b.op("Mul", blocks, weights), b.i64(-1), keepdims=1)  # [..., nb, 1] < 2^24
    byte_div = b.const([1 << (8 * j) for j in range(nbytes)], np.int64)
    raw = b.op("Mod", b.op("Div", value, byte_div), b.const(256, np.int64))  # [..., nb, nbytes]
    flat = b.reshape(raw, b.op("Concat", lead, b.op("Mul", b.op("Div", n, b.i64(per)), b.i64(nbytes)), axis=0))
    return to_int8_container(b, flat)


def to_int8_container(b: GraphBuilder, byte: str) -> str:
    """int64 values in [0, 256) -> the same bytes as signed int8 (TensorRT plugin I/O has no UINT8)."""
    signed = b.op("Sub", b.op("Mod", b.op("Add", byte, b.const(128, np.int64)), b.const(256, np.int64)),
                  b.const(128, np.int64))
    return b.op("Cast", signed, to=3)  # INT8


def unpack(b: GraphBuilder, packed: str, bits: int) -> str:
    """int8 [B,H,T,m] -> int64 codes [B,H,T,m*8/bits] (inverse of :func:`pack`)."""
    per, nbytes = block_shape(bits)
    lead = b.op("Shape", packed, start=0, end=3)
    m = b.dim(packed, 3)
    raw = b.op("Mod", b.op("Cast", packed, to=7), b.const(256, np.int64))  # INT64, 0..255
    blocks = b.reshape(raw, b.op("Concat", lead, b.op("Div", m, b.i64(nbytes)), b.i64(nbytes), axis=0))
    value = b.op("ReduceSum", b.op("Mul", blocks, b.const([1 << (8 * j) for j in range(nbytes)], np.int64)),
                 b.i64(-1), keepdims=1)
    codes = b.op("Mod", b.op("Div", value, b.const([1 << (bits * i) for i in range(per)], np.int64)),
                 b.const(1 << bits, np.int64))
    return b.reshape(codes, b.op("Concat", lead, b.op("Mul", b.op("Div", m, b.i64(nbytes)), b.i64(per)), axis=0))


def rotate(b: GraphBuilder, x: str, head_dim: int) -> str:
    """The fast Walsh-Hadamard transform of :func:`kvcompile.quant.hadamard.rotate`, stage for stage.

    ``x``: ``[B, H, T, D]`` float32.  Stage ``h`` views the last axis as ``[D / 2h, 2, h]`` and maps
    the pair ``(a, b)`` to ``(a + b, a - b)``; elementwise adds give the reference's bits exactly
    (a MatMul would sum in another order).
    """
    check_power_of_two(head_dim)
    lead = b.op("Shape", x, start=0, end=-1)
    h = 1
    while h < head_dim:
        pairs = b.reshape(x, b.op("Concat", lead, b.i64(head_dim // (2 * h), 2, h), axis=0))
        first, second = b.op("Split", pairs, axis=-2, num_outputs=2, outputs=2)
        x = b.op("Concat", b.op("Add", first, second), b.op("Sub", first, second), axis=-2)
        h *= 2
    x = b.reshape(x, b.op("Concat", lead, b.i64(head_dim), axis=0))
    return b.op("Mul", x, b.const(rotation_scale(head_dim)))
