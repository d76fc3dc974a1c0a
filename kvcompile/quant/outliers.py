"""Dense-and-sparse storage: the k largest-magnitude values of each vector in fp16, the rest in a base format.

KVQuant (Hooper et al., arXiv 2401.18079, sec. 3.5) keeps about 1 % of K/V values -- the outliers
that would stretch a group's range -- in full precision, sparse, and quantizes the dense remainder
with a narrower range.  Here the sparse part has a fixed size per position so that every part
keeps one row per position (what the cache's segments need): for each position (a vector of D
channels of one kv head) the k values of largest magnitude (ties: the lower channel) are stored as
fp16 ``outlier_values`` with their channel in ``outlier_index`` (uint8 as int8), the vector with
those entries set to 0 is stored in the base format, and de-quantizing writes the fp16 values back
over the base format's result.  KVQuant picks outliers by a calibrated per-channel threshold
instead; a fixed count per vector is the variant that fits fixed-size segments.

Name grammar: ``<base>-o<k>``, base any integer or Lloyd-Max format without rotation (a rotation
would spread the outliers the sparse part removes), k from 1 to 8.  Bits: the base's plus
``k * (16 + 8) / D``: 0.375 per element for k = 1 at D = 64.  Error: at an outlier, fp16 rounding
rounded up (``|v| * 2^-10``, at least the smallest subnormal step); elsewhere the base format's bound on
the zeroed vector.  The ONNX lowering (TopK, ScatterElements, the base's lowering) is bit-exact;
no native reader or kernel (such head groups run the ``KVAttention`` function body).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcompile.errors import SchemeError
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import (FP16_MAX, DerivedScheme, FamilyTraits, QuantizedTensor, check_input,
                                  derived_parser, empty_quantized, family_traits, is_empty, register_family,
                                  register_traits, round_to_dtype)

MAX_OUTLIERS = 8


@dataclass(frozen=True)
class OutlierScheme(DerivedScheme):
    outliers: int = 1
    own_parts = ("outlier_values", "outlier_index")

    def __post_init__(self) -> None:
        if not 1 <= self.outliers <= MAX_OUTLIERS:
            raise SchemeError(f"{self.base.name}-o{self.outliers}: outliers per vector must be from 1 to {MAX_OUTLIERS}")
        if getattr(self.base, "rotate", False) or type(self.base).__name__ not in ("IntegerScheme", "LloydMaxScheme"):
            raise SchemeError(f"{self.base.name}-o{self.outliers}: the base of an outlier format must be an integer or "
                              "Lloyd-Max format without -rot")

    def suffix(self) -> str:
        return f"-o{self.outliers}"

    def bits_per_element(self, head_dim: int) -> float:
        return self.base.bits_per_element(head_dim) + self.outliers * 24 / head_dim

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, dense)``: the outliers' channels [..., T, k] (int64) and ``x`` with them zeroed."""
        if x.shape[-1] > 256 or x.shape[-1] < self.outliers:
            raise SchemeError(f"{self.name}: needs a head dim from {self.outliers} to 256, got {x.shape[-1]}")
        index = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :self.outliers]
        return index, x.scatter(-1, index, 0.0)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = check_input(x, self, FP16_MAX)
        if is_empty(x):
            return empty_quantized(self, tuple(x.shape))
        index, dense = self._split(x)
        q = self.base.quantize(dense)
        # rounded up, not to nearest: the ONNX lowering has directed fp16 rounding (ox.round_fp16) only
        parts = {**q.parts, "outlier_values": round_to_dtype(x.gather(-1, index), torch.float16, "up"),
                 "outlier_index": index.to(torch.uint8).view(torch.int8)}
        return QuantizedTensor(self.name, tuple(x.shape), parts)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if is_empty(q.shape):
            return torch.zeros(q.shape)
        index = q.parts["outlier_index"].view(torch.uint8).long()
        return self.base.dequantize(self.base_part(q)).scatter(-1, index, q.parts["outlier_values"].float())

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        index = q.parts["outlier_index"].view(torch.uint8).long()
        values = q.parts["outlier_values"].float().abs()
        fp16 = torch.clamp(values * 2.0 ** -10, min=2.0 ** -24) * (1 + 1e-6)  # one fp16 step
        return self.base.error_bound(self.base_part(q)).scatter(-1, index, fp16)


register_family("outliers", derived_parser(r"-o(?P<k>[0-9]+)", lambda base, k: OutlierScheme(base, int(k))),
                ("int2-ch-o1", "int2-o1", "lm2-o2"))


# ----------------------------------------------------------------------------- ONNX lowering

def _split_onnx(b: ox.GraphBuilder, s: OutlierScheme, x: str) -> tuple[str, str]:
    _, index = b.op("TopK", b.op("Abs", x), b.i64(s.outliers), axis=-1, largest=1, sorted=1, outputs=2)
    picked = b.op("GatherElements", x, index, axis=-1)
    dense = b.op("ScatterElements", x, index, b.op("Sub", picked, picked), axis=-1)  # +0, as torch's scatter
    return index, dense


def _outliers_quantize(b: ox.GraphBuilder, s: OutlierScheme, x: str, head_dim: int) -> list[str]:
    index, dense = _split_onnx(b, s, x)
    base_parts = family_traits(s.base).onnx[0](b, s.base, dense, head_dim)
    values = b.op("Cast", ox.round_fp16(b, b.op("GatherElements", x, index, axis=-1), "up"), to=10)
    return [*base_parts, values, ox.to_int8_container(b, index)]


def _outliers_dequantize(b: ox.GraphBuilder, s: OutlierScheme, parts: list[str], head_dim: int) -> str:
    dense = family_traits(s.base).onnx[1](b, s.base, parts[:-2], head_dim)
    index = b.op("Mod", b.op("Cast", parts[-1], to=7), b.const(256, np.int64))
    return b.op("ScatterElements", dense, index, b.op("Cast", parts[-2], to=1), axis=-1)


register_traits(OutlierScheme, FamilyTraits(onnx=(_outliers_quantize, _outliers_dequantize)))
