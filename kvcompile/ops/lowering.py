"""Storage schemes in standard ONNX ops: the bodies of ``KVQuantize`` / ``KVDequantize``.

Each lowering reproduces its scheme's torch reference (:mod:`kvcompile.quant`) operation for
operation, in the same float32 order, so that ONNX Runtime produces the *same bits* (tested
exhaustively on edge values in ``tests/unit/test_ops.py``), ``-rot`` schemes included: the
Hadamard rotation is a butterfly of elementwise adds on both sides, not a matmul.  Inputs are ``[B, H, T, D]`` float32 tensors with
any T, including 0 (an empty cache segment).

Adding a family's lowering = one ``register_lowering(SchemeClass, quantize, dequantize)`` call.
A scheme without one is rejected at export with a one-line error.

Scales are rounded *up* and zero points *down* to float16 (``quant.base.round_to_dtype``); ONNX
has no directed-rounding cast, so :func:`round_fp16` does it arithmetically in float64.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kvcompile.errors import ExportError
from kvcompile.ops.builder import Builder
from kvcompile.quant import get_scheme
from kvcompile.quant.base import StorageScheme
from kvcompile.quant.floating import FP16Scheme
from kvcompile.quant.hadamard import check_power_of_two, rotation_scale
from kvcompile.quant.integer import IntegerScheme
from kvcompile.quant.nf4 import NF4Scheme, nf4_codebook
from kvcompile.quant.packing import block_shape


#: ``quantize(builder, scheme, x, head_dim) -> part names`` (in :func:`part_layout` order)
QuantizeLowering = Callable[[Builder, StorageScheme, str, int], list[str]]
#: ``dequantize(builder, scheme, part names, head_dim) -> float32 [B,H,T,D]``
DequantizeLowering = Callable[[Builder, StorageScheme, list[str], int], str]
_LOWERINGS: dict[type, tuple[QuantizeLowering, DequantizeLowering]] = {}


def register_lowering(scheme_class: type, quantize: QuantizeLowering, dequantize: DequantizeLowering) -> None:
    _LOWERINGS[scheme_class] = (quantize, dequantize)


def lowering(scheme: StorageScheme | str) -> tuple[QuantizeLowering, DequantizeLowering]:
    scheme = get_scheme(scheme)
    if type(scheme) not in _LOWERINGS:
        names = sorted(c.__name__.replace("Scheme", "").lower() for c in _LOWERINGS)
        raise ExportError(f"storage scheme {scheme.name!r} has no ONNX lowering yet; the onnx target supports "
                          f"the families {', '.join(names)}")
    return _LOWERINGS[type(scheme)]


def check_lowerable(scheme: StorageScheme, head_dim: int) -> None:
    """Raise :class:`ExportError` if ``scheme`` cannot be emitted for ``head_dim``."""
    lowering(scheme)
    bits = getattr(scheme, "bits", 16)
    if bits < 16 and head_dim % block_shape(bits)[0]:
        raise ExportError(f"{scheme.name}: head dim {head_dim} is not a multiple of {block_shape(bits)[0]} codes "
                          "per packed block, which the ONNX lowering needs")


# --------------------------------------------------------------------------- shared pieces


def round_fp16(b: Builder, t: str, direction: str) -> str:
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


def stored_zero(b: Builder, t: str, float16: bool) -> tuple[str, str]:
    """``(stored, as_float32)`` zero point: rounded down to float16, or float32 as is (``-s32``)."""
    if not float16:
        return t, t
    r = round_fp16(b, t, "down")
    return b.op("Cast", r, to=10), b.op("Cast", r, to=1)


def stored_scale(b: Builder, t: str, float16: bool) -> tuple[str, str]:
    """``(stored, as_float32)`` scale: rounded up to float16 (or float32 as is), a zero scale (a
    constant group) replaced by the dtype's smallest normal value, as in the reference."""
    tiny = float(np.finfo(np.float16 if float16 else np.float32).tiny)
    r = round_fp16(b, t, "up") if float16 else t
    zero, small = (b.const(0.0, np.float64), b.const(tiny, np.float64)) if float16 else (b.const(0.0), b.const(tiny))
    r = b.op("Where", b.op("Equal", r, zero), small, r)
    return (b.op("Cast", r, to=10), b.op("Cast", r, to=1)) if float16 else (r, r)


def grouped_shape(b: Builder, x: str, group: int, axis: str) -> str:
    """Shape of ``x`` [B,H,T,D] split into groups: [B,H,T,D/G,G] (token) or [B,H,T/G,G,D] (channel)."""
    lead = b.op("Shape", x, start=0, end=2)
    t, d = b.dim(x, 2), b.dim(x, 3)
    g = b.i64(group)
    if axis == "token":
        return b.op("Concat", lead, t, b.op("Div", d, g), g, axis=0)
    return b.op("Concat", lead, b.op("Div", t, g), g, d, axis=0)


def pack(b: Builder, codes: str, bits: int) -> str:
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


def to_int8_container(b: Builder, byte: str) -> str:
    """int64 values in [0, 256) -> the same bytes as signed int8 (TensorRT plugin I/O has no UINT8)."""
    signed = b.op("Sub", b.op("Mod", b.op("Add", byte, b.const(128, np.int64)), b.const(256, np.int64)),
                  b.const(128, np.int64))
    return b.op("Cast", signed, to=3)  # INT8


def unpack(b: Builder, packed: str, bits: int) -> str:
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


def rotate(b: Builder, x: str, head_dim: int) -> str:
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


# --------------------------------------------------------------------------- fp16


def _fp16_quantize(b: Builder, scheme: FP16Scheme, x: str, head_dim: int) -> list[str]:
    return [b.op("Cast", x, to=10)]


def _fp16_dequantize(b: Builder, scheme: FP16Scheme, parts: list[str], head_dim: int) -> str:
    return b.op("Cast", parts[0], to=1)


register_lowering(FP16Scheme, _fp16_quantize, _fp16_dequantize)


# --------------------------------------------------------------------------- integer


def _int_quantize(b: Builder, s: IntegerScheme, x: str, head_dim: int) -> list[str]:
    if s.rotate:
        x = rotate(b, x, head_dim)
    g = b.reshape(x, grouped_shape(b, x, s.group_size, s.axis))
    r = b.i64(-1 if s.axis == "token" else -2)
    half = s.scale_dtype.itemsize == 2
    levels = float(s.levels)
    if s.symmetric:
        amax = b.op("ReduceMax", b.op("Abs", g), r, keepdims=1)
        scale, scale_f = stored_scale(b, b.op("Div", amax, b.const(levels)), half)
        q = b.op("Add", b.op("Clip", b.op("Round", b.op("Div", g, scale_f)), b.const(-levels), b.const(levels)),
                 b.const(levels))
        params = [scale]
    else:
        zero, zero_f = stored_zero(b, b.op("ReduceMin", g, r, keepdims=1), half)
        span = b.op("Sub", b.op("ReduceMax", g, r, keepdims=1), zero_f)
        scale, scale_f = stored_scale(b, b.op("Div", span, b.const(levels)), half)
        q = b.op("Clip", b.op("Round", b.op("Div", b.op("Sub", g, zero_f), scale_f)), b.const(0.0), b.const(levels))
        params = [scale, zero]
    codes = b.reshape(b.op("Cast", q, to=7), b.op("Shape", x))
    return [pack(b, codes, s.bits), *[b.op("Squeeze", p, r) for p in params]]


def _int_dequantize(b: Builder, s: IntegerScheme, parts: list[str], head_dim: int) -> str:
    codes = b.op("Cast", unpack(b, parts[0], s.bits), to=1)
    g = b.reshape(codes, grouped_shape(b, codes, s.group_size, s.axis))
    r = b.i64(-1 if s.axis == "token" else -2)
    scale = b.op("Unsqueeze", b.op("Cast", parts[1], to=1), r)
    if s.symmetric:
        x = b.op("Mul", b.op("Sub", g, b.const(float(s.levels))), scale)
    else:
        zero = b.op("Unsqueeze", b.op("Cast", parts[2], to=1), r)
        x = b.op("Add", zero, b.op("Mul", g, scale))
    x = b.reshape(x, b.op("Shape", codes))
    return rotate(b, x, head_dim) if s.rotate else x


register_lowering(IntegerScheme, _int_quantize, _int_dequantize)


# --------------------------------------------------------------------------- nf4


def _nf4_scales(b: Builder, s: NF4Scheme, params: list[str]) -> str:
    """Dequantized first-level scales [B,H,T,D/G] float32."""
    if s.double_quant:
        codes = b.op("Cast", b.op("Mod", b.op("Cast", params[0], to=7), b.const(256, np.int64)), to=1)
        return b.op("Div", b.op("Mul", b.op("Cast", params[1], to=1), codes), b.const(255.0))
    return b.op("Cast", params[0], to=1)


def _nf4_quantize(b: Builder, s: NF4Scheme, x: str, head_dim: int) -> list[str]:
    g = b.reshape(x, grouped_shape(b, x, s.group_size, "token"))
    absmax = b.op("ReduceMax", b.op("Abs", g), b.i64(-1), keepdims=0)  # [B,H,T,ng]
    if s.double_quant:
        sup, sup_f = stored_scale(b, b.op("ReduceMax", absmax, b.i64(-1), keepdims=1), True)
        c = b.op("Clip", b.op("Ceil", b.op("Mul", b.op("Div", absmax, sup_f), b.const(255.0))),
                 b.const(1.0), b.const(255.0))
        params = [to_int8_container(b, b.op("Cast", c, to=7)), sup]
    else:
        params = [stored_scale(b, absmax, True)[0]]
    scales = b.op("Unsqueeze", _nf4_scales(b, s, params), b.i64(-1))
    y = b.op("Div", g, scales)
    book = b.const(nf4_codebook().numpy())
    codes = b.op("ArgMin", b.op("Abs", b.op("Sub", b.op("Unsqueeze", y, b.i64(-1)), book)), axis=-1, keepdims=0)
    codes = b.reshape(codes, b.op("Shape", x))
    return [pack(b, codes, 4), *params]


def _nf4_dequantize(b: Builder, s: NF4Scheme, parts: list[str], head_dim: int) -> str:
    codes = unpack(b, parts[0], 4)
    values = b.op("Gather", b.const(nf4_codebook().numpy()), codes, axis=0)
    g = b.reshape(values, grouped_shape(b, values, s.group_size, "token"))
    x = b.op("Mul", g, b.op("Unsqueeze", _nf4_scales(b, s, parts[1:]), b.i64(-1)))
    return b.reshape(x, b.op("Shape", values))


register_lowering(NF4Scheme, _nf4_quantize, _nf4_dequantize)
