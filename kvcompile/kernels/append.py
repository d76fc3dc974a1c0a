"""Append kernel: quantize-and-pack for integer schemes, bit-identical to ``IntegerScheme.quantize``.

One program quantizes one position (per-token groups: ``D/G`` groups of G channels) or one block
of G positions (per-channel groups: D groups of G positions).  The arithmetic follows the torch
reference step by step: float32 min/max, float16 parameters rounded *up* (scale) or *down*
(zero point) by stepping the float16 bit pattern, IEEE division (``div_rn``; plain ``/`` is
approximate on GPUs), round half to even, clamp, and packing of ``8/b`` codes per byte, low bits
first, into signed int8 containers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcompile.errors import SchemeError
from kvcompile.quant import QuantizedTensor
from kvcompile.quant.base import check_input
from kvcompile.quant.integer import IntegerScheme


@triton.jit
def _fp16_round_up(t):
    """Smallest float16 >= float32 ``t`` (as float16)."""
    r = t.to(tl.float16)
    bits = r.to(tl.int16, bitcast=True).to(tl.int32)
    up = tl.where(bits >= 0, bits + 1, bits - 1)  # magnitude up for +, down for -
    up = tl.where(bits == -32768, 1, up)  # -0 -> smallest positive subnormal
    bumped = up.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(r.to(tl.float32) < t, bumped, r)


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _params(g, REDUCE: tl.constexpr, LEVELS: tl.constexpr, SYM: tl.constexpr, HALF: tl.constexpr, TINY: tl.constexpr):
    """(scale, zero) as float32 values of the stored parameters, reduced along axis REDUCE."""
    if SYM:
        t = tl.math.div_rn(tl.max(tl.abs(g), axis=REDUCE), LEVELS * 1.0)
        zero = t * 0.0
    else:
        lo = tl.min(g, axis=REDUCE)
        if HALF:
            zero = -(_fp16_round_up(-lo).to(tl.float32))
        else:
            zero = lo
        t = tl.math.div_rn(tl.max(g, axis=REDUCE) - zero, LEVELS * 1.0)
    if HALF:
        scale = _fp16_round_up(t).to(tl.float32)
    else:
        scale = t
    scale = tl.where(scale == 0.0, TINY, scale)
    return scale, zero


@triton.jit
def _codes(g, scale, zero, LEVELS: tl.constexpr, SYM: tl.constexpr):
    if SYM:
        q = _round_half_even(tl.math.div_rn(g, scale))
        q = tl.minimum(tl.maximum(q, -LEVELS * 1.0), LEVELS * 1.0) + LEVELS
    else:
        q = _round_half_even(tl.math.div_rn(g - zero, scale))
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
    return q.to(tl.int32)


@triton.jit
def _pack_store(codes_ptr, codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Pack int32 codes [ROWS, D] into ROWS x D*BITS/8 bytes at codes_ptr."""
    PER: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PER
    grouped = tl.reshape(codes, (ROWS, W, PER))
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)  # 0..255
    packed = tl.where(packed > 127, packed - 256, packed).to(tl.int8)
    offs = tl.arange(0, ROWS)[:, None] * W + tl.arange(0, W)[None, :]
    tl.store(codes_ptr + offs, packed)


@triton.jit
def _quantize_token_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, D: tl.constexpr, G: tl.constexpr,
                           BITS: tl.constexpr, LEVELS: tl.constexpr, SYM: tl.constexpr, HALF: tl.constexpr,
                           TINY: tl.constexpr):
    row = tl.program_id(0)
    NG: tl.constexpr = D // G
    x = tl.load(x_ptr + row * D + tl.arange(0, D))
    g = tl.reshape(x, (NG, G))
    scale, zero = _params(g, 1, LEVELS, SYM, HALF, TINY)
    codes = _codes(g, scale[:, None], zero[:, None], LEVELS, SYM)
    _pack_store(codes_ptr + row * (D * BITS // 8), tl.reshape(codes, (1, D)), 1, D, BITS)
    offs = row * NG + tl.arange(0, NG)
    tl.store(scale_ptr + offs, scale.to(scale_ptr.dtype.element_ty))
    if not SYM:
        tl.store(zero_ptr + offs, zero.to(zero_ptr.dtype.element_ty))


@triton.jit
def _quantize_channel_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, D: tl.constexpr, G: tl.constexpr,
                             BITS: tl.constexpr, LEVELS: tl.constexpr, SYM: tl.constexpr, HALF: tl.constexpr,
                             TINY: tl.constexpr):
    block = tl.program_id(0)  # G consecutive positions of one (batch, head)
    offs = tl.arange(0, G)[:, None] * D + tl.arange(0, D)[None, :]
    g = tl.load(x_ptr + block * G * D + offs)  # [G, D]
    scale, zero = _params(g, 0, LEVELS, SYM, HALF, TINY)
    codes = _codes(g, scale[None, :], zero[None, :], LEVELS, SYM)
    _pack_store(codes_ptr + block * G * (D * BITS // 8), codes, G, D, BITS)
    offs_d = block * D + tl.arange(0, D)
    tl.store(scale_ptr + offs_d, scale.to(scale_ptr.dtype.element_ty))
    if not SYM:
        tl.store(zero_ptr + offs_d, zero.to(zero_ptr.dtype.element_ty))


def quantize(scheme: IntegerScheme, x: torch.Tensor) -> QuantizedTensor:
    """Kernel version of ``scheme.quantize(x)`` for ``x`` [..., T, D]: the same parts, bit for bit."""
    from kvcompile.kernels import unsupported_reason

    reason = unsupported_reason(scheme)
    if reason or not isinstance(scheme, IntegerScheme):
        raise SchemeError(reason or f"{scheme.name}: no quantize kernel")
    x = check_input(x, scheme)  # float32, contiguous, finite, T a multiple of the position block
    *lead, t, d = x.shape
    g = scheme.group_size
    if d % (8 // scheme.bits) or (scheme.axis == "token" and d % g):
        raise SchemeError(f"{scheme.name}: head dim {d} does not fit groups of {g}")
    half = scheme.scale_dtype == torch.float16
    if half and x.numel() and x.abs().max().item() > 65504.0 / 2:
        raise SchemeError(f"{scheme.name}: |x| exceeds what its float16 scales can represent; use -s32")
    rows = x.numel() // d
    codes = torch.empty(*lead, t, d * scheme.bits // 8, dtype=torch.int8, device=x.device)
    n_params = (t, d // g) if scheme.axis == "token" else (t // g, d)
    scale = torch.empty(*lead, *n_params, dtype=scheme.scale_dtype, device=x.device)
    zero = torch.empty_like(scale) if not scheme.symmetric else scale  # unused when symmetric
    tiny = float(torch.finfo(scheme.scale_dtype).tiny)
    args = dict(D=d, G=g, BITS=scheme.bits, LEVELS=scheme.levels, SYM=scheme.symmetric, HALF=half, TINY=tiny)
    if rows:
        if scheme.axis == "token":
            _quantize_token_kernel[(rows,)](x, codes, scale, zero, **args)
        else:
            _quantize_channel_kernel[(rows // g,)](x, codes, scale, zero, **args)
    parts = {"codes": codes, "scale": scale}
    if not scheme.symmetric:
        parts["zero"] = zero
    return QuantizedTensor(scheme.name, tuple(x.shape), parts)
