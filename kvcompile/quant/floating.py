"""Floating-point storage: ``fp16`` (IEEE half) and ``fp8`` (OCP FP8 E4M3 with a per-position scale).

fp16 stores values as they are in half precision: relative error <= 2^-11 for normal values,
absolute error <= 2^-25 in the subnormal range; |x| > 65504 is rejected (it would become inf).

fp8 is the KV format TensorRT-LLM and vLLM ship (E4M3: 4 exponent bits, 3 mantissa bits, max 448,
no inf).  Each position of a head gets a float16 scale ``s = round_up(amax / 448)`` so the row
fills the E4M3 range; ``y = x / s`` is rounded to E4M3.  For |y| in a normal binade [2^e, 2^(e+1))
the spacing is 2^(e-3), so the error is <= 2^-4 |y|; below 2^-6 (subnormals, spacing 2^-9) it
is <= 2^-10.  Bits per element: 8 + 16 / D.  The codes are the E4M3 bytes in an int8 container
(TensorRT plugin I/O has no FP8 type everywhere); the ONNX lowering rounds arithmetically
(:func:`_e4m3_bytes`) and de-quantizes by a 256-entry table, the native library and the TensorRT
plugin do the same arithmetic in C++ (``native/src/e4m3.h``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcompile.quant.base import FP16_MAX, QuantizedTensor, StorageScheme, check_input, register_family, round_to_dtype
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import KIND_FP16, NATIVE_FP16, NATIVE_FP8, FamilyTraits, KernelFormat, register_traits

E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP16Scheme(StorageScheme):
    bits: int = 16
    name: str = "fp16"

    def bits_per_element(self, head_dim: int) -> float:
        return 16.0

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = check_input(x, self, FP16_MAX)
        return QuantizedTensor(self.name, tuple(x.shape), {"values": x.half()})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return q.parts["values"].float()

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        u = 2.0**-11
        return q.parts["values"].float().abs() * u / (1 - u) + 2.0**-25


@dataclass(frozen=True)
class FP8Scheme(StorageScheme):
    bits: int = 8
    name: str = "fp8"

    def bits_per_element(self, head_dim: int) -> float:
        return 8 + 16 / head_dim

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = check_input(x, self, FP16_MAX)
        scale = round_to_dtype(x.abs().amax(-1, keepdim=True) / E4M3_MAX, torch.float16, "up")
        scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
        y = (x / scale.float()).clamp(-E4M3_MAX, E4M3_MAX)
        codes = y.to(torch.float8_e4m3fn).view(torch.int8)  # int8 container: plugin I/O has no fp8 in every TRT
        return QuantizedTensor(self.name, tuple(x.shape), {"codes": codes, "scale": scale})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        y = q.parts["codes"].view(torch.float8_e4m3fn).float()
        return y * q.parts["scale"].float()

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        y = q.parts["codes"].view(torch.float8_e4m3fn).float().abs()
        u = 2.0**-4
        return torch.maximum(y * u / (1 - u), torch.tensor(2.0**-10)) * q.parts["scale"].float() * (1 + 1e-6)


register_family("fp16", lambda n: FP16Scheme() if n == "fp16" else None, ("fp16",))
register_family("fp8", lambda n: FP8Scheme() if n in ("fp8", "fp8-e4m3") else None, ("fp8",))


# ----------------------------------------------------------------------------- traits: ONNX and kernels

def _fp16_quantize(b: ox.GraphBuilder, scheme: FP16Scheme, x: str, head_dim: int) -> list[str]:
    return [b.op("Cast", x, to=10)]


def _fp16_dequantize(b: ox.GraphBuilder, scheme: FP16Scheme, parts: list[str], head_dim: int) -> str:
    return b.op("Cast", parts[0], to=1)


register_traits(FP16Scheme, FamilyTraits(
    onnx=(_fp16_quantize, _fp16_dequantize),
    native=lambda s: {"kind": NATIVE_FP16, "bits": 16, "group": 1, "channel": 0, "symmetric": 0, "scale_bytes": 0,
                      "rotate": 0, "double_quant": 0},
    kernel=KernelFormat(unsupported=lambda s: None,
                        arguments=lambda s: {"KIND": KIND_FP16, "BITS": 16, "G": 1, "SYM": False, "LEVELS": 0},
                        pointers=lambda s, parts: (parts["values"].contiguous(),) * 3)))


#: the 15 powers of two that start E4M3's binades: 2^-6 (the smallest normal) .. 2^8
_E4M3_BINADES = [2.0**k for k in range(-6, 9)]


def e4m3_table() -> np.ndarray:
    """float32 [256]: the value of each E4M3 byte (0x7F and 0xFF are NaN; never stored)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _e4m3_bytes(b: ox.GraphBuilder, y: str) -> str:
    """float32 ``y`` with |y| <= 448 -> int64 E4M3 bytes, rounded to nearest even as torch's cast.

    With ``E`` the number of binade starts ``2^-6 .. 2^8`` that ``a = |y|`` reaches (0: subnormal),
    the E4M3 spacing at ``a`` is ``2^(max(E, 1) - 10)``; ``q = round_half_even(a / spacing) * spacing``
    (exact: a power-of-two division) is the rounded value, which may start the next binade.  Its byte
    is ``8 E' + (q 2^(10 - E') - 8)`` for a normal ``q`` (``E' >= 1``), ``q 2^9`` for a subnormal one,
    plus 128 for a negative sign (also of -0.0: ``1 / y < 0``)."""
    a = b.op("Abs", y)
    binades = b.const(_E4M3_BINADES)
    one, two = b.const(1.0), b.const(2.0)

    def exponent(v: str) -> str:
        reached = b.op("Cast", b.op("GreaterOrEqual", b.op("Unsqueeze", v, b.i64(-1)), binades), to=1)
        return b.op("ReduceSum", reached, b.i64(-1), keepdims=0)

    spacing = b.op("Pow", two, b.op("Sub", b.op("Max", exponent(a), one), b.const(10.0)))
    q = b.op("Mul", b.op("Round", b.op("Div", a, spacing)), spacing)
    e = exponent(q)
    normal = b.op("Sub", b.op("Add", b.op("Mul", e, b.const(8.0)),
                              b.op("Mul", q, b.op("Pow", two, b.op("Sub", b.const(10.0), e)))), b.const(8.0))
    byte = b.op("Where", b.op("GreaterOrEqual", e, one), normal, b.op("Mul", q, b.const(512.0)))
    negative = b.op("Cast", b.op("Less", b.op("Div", one, y), b.const(0.0)), to=1)
    return b.op("Cast", b.op("Add", byte, b.op("Mul", negative, b.const(128.0))), to=7)


def _fp8_quantize(b: ox.GraphBuilder, scheme: FP8Scheme, x: str, head_dim: int) -> list[str]:
    amax = b.op("ReduceMax", b.op("Abs", x), b.i64(-1), keepdims=1)
    scale, scale_f = ox.stored_scale(b, b.op("Div", amax, b.const(E4M3_MAX)), True)
    y = b.op("Clip", b.op("Div", x, scale_f), b.const(-E4M3_MAX), b.const(E4M3_MAX))
    return [ox.to_int8_container(b, _e4m3_bytes(b, y)), scale]


def _fp8_dequantize(b: ox.GraphBuilder, scheme: FP8Scheme, parts: list[str], head_dim: int) -> str:
    byte = b.op("Mod", b.op("Add", b.op("Cast", parts[0], to=7), b.const(256, np.int64)), b.const(256, np.int64))
    values = b.op("Gather", b.const(e4m3_table()), byte, axis=0)
    return b.op("Mul", values, b.op("Cast", parts[1], to=1))


register_traits(FP8Scheme, FamilyTraits(
    onnx=(_fp8_quantize, _fp8_dequantize),
    native=lambda s: {"kind": NATIVE_FP8, "bits": 8, "group": 0, "channel": 0, "symmetric": 1, "scale_bytes": 2,
                      "rotate": 0, "double_quant": 0}))
