"""Floating-point storage: ``fp16`` (IEEE half) and ``fp8`` (OCP FP8 E4M3 with a per-position scale).

fp16 stores values as they are in half precision: relative error <= 2^-11 for normal values,
absolute error <= 2^-25 in the subnormal range; |x| > 65504 is rejected (it would become inf).

fp8 is the KV format TensorRT-LLM and vLLM ship (E4M3: 4 exponent bits, 3 mantissa bits, max 448,
no inf).  Each position of a head gets a float16 scale ``s = round_up(amax / 448)`` so the row
fills the E4M3 range; ``y = x / s`` is rounded to E4M3.  For |y| in a normal binade [2^e, 2^(e+1))
the spacing is 2^(e-3), so the error is <= 2^-4 |y|; below 2^-6 (subnormals, spacing 2^-9) it
is <= 2^-10.  Bits per element: 8 + 16 / D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompile.quant.base import FP16_MAX, QuantizedTensor, StorageScheme, check_input, register_family, round_to_dtype
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import KIND_FP16, NATIVE_FP16, FamilyTraits, KernelFormat, register_traits

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
