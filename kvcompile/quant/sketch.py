"""A 1-bit residual sketch on top of a per-token key format (TurboQuant's inner-product variant).

TurboQuant (Zandieh et al., arXiv 2504.19874, sec. 3.2) observes that an MSE-optimal quantizer
biases inner products, and adds a 1-bit Quantized Johnson-Lindenstrauss sketch of the residual
(QJL, Zandieh et al., arXiv 2406.03482): with ``r = x - D(Q(x))`` and a Gaussian matrix ``S``
[m, D] of unit-variance entries, store ``sign(S r)`` (m bits) and ``||r||`` (fp16).  For any query
``q``, ``E_S[<S q, sign(S r)>] = m * sqrt(2/pi) * <q, r> / ||r||``, so

    x_hat = D(Q(x)) + sqrt(pi/2) / m * ||r|| * S^T sign(S r)

gives ``E_S[<q, x_hat>] = <q, x>``: attention scores are unbiased over the draw of S (one fixed,
seeded S per head dimension here; it is part of the format, not stored).  The price is variance:
each score gains noise of about ``||q|| ||r|| sqrt(pi/2 - 1) / sqrt(m)``.

Name grammar: ``<base>-qjl``, base a per-token format (``lm2-rot-qjl``, ``int2-qjl``); m = D.
Bits: the base's plus ``1 + 16/D`` (the signs and the norm).  Error bound (deterministic, for the
fixed S): ``|x - x_hat|_i <= |r_i| + sqrt(pi/2)/m * ||r|| * sum_j |S_ji|`` with ``|r_i|`` bounded by
the base format's bound.  No ONNX lowering, kernel or native reader: an export or the kernel cache
refuses it in one line.  ``bench/quality_per_bit.py --stages sketch`` measures whether it pays
(README: it does not; the added score noise costs more than the bias it removes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvcompile.errors import SchemeError
from kvcompile.quant.base import (FP16_MAX, DerivedScheme, QuantizedTensor, check_input, derived_parser,
                                  empty_quantized, is_empty, register_family, round_to_dtype)
from kvcompile.quant.packing import pack_bits, unpack_bits

SEED = 20250414  # the sketch matrix of each head dimension is fixed by this seed


@functools.lru_cache(maxsize=8)
def sketch_matrix(head_dim: int) -> torch.Tensor:
    """``S`` [D, D] float32, i.i.d. N(0, 1), the same for every vector of this head dimension."""
    return torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(SEED + head_dim))


@dataclass(frozen=True)
class SketchScheme(DerivedScheme):
    own_parts = ("sketch_signs", "residual_norm")

    def __post_init__(self) -> None:
        if self.base.token_group != 1 or isinstance(self.base, SketchScheme) or getattr(self.base, "pre_rope", False):
            raise SchemeError(f"{self.base.name}-qjl: the base of a residual sketch must be a per-token format")

    def suffix(self) -> str:
        return "-qjl"

    def bits_per_element(self, head_dim: int) -> float:
        return self.base.bits_per_element(head_dim) + 1 + 16 / head_dim

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = check_input(x, self, FP16_MAX)
        if is_empty(x):
            return empty_quantized(self, tuple(x.shape))
        q = self.base.quantize(x)
        r = x - self.base.dequantize(q)
        signs = (r @ sketch_matrix(x.shape[-1]).T >= 0).to(torch.uint8)
        norm = round_to_dtype(r.norm(dim=-1, keepdim=True), torch.float16, "up")
        return QuantizedTensor(self.name, q.shape, {**q.parts, "sketch_signs": pack_bits(signs, 1),
                                                    "residual_norm": norm})

    def _sketch(self, q: QuantizedTensor) -> torch.Tensor:
        d = q.shape[-1]
        signs = unpack_bits(q.parts["sketch_signs"], 1, d).float() * 2 - 1
        return math.sqrt(math.pi / 2) / d * q.parts["residual_norm"].float() * (signs @ sketch_matrix(d))

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if is_empty(q.shape):
            return torch.zeros(q.shape)
        return self.base.dequantize(self.base_part(q)) + self._sketch(q)

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        d = q.shape[-1]
        spread = math.sqrt(math.pi / 2) / d * sketch_matrix(d).abs().sum(0)  # [D]: sum_j |S_ji| scaled
        return (self.base.error_bound(self.base_part(q)) + q.parts["residual_norm"].float() * spread) * (1 + 1e-6)


register_family("sketch", derived_parser("-qjl", SketchScheme), ("lm2-rot-qjl", "int2-qjl"))
