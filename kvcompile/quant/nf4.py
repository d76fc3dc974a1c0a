"""NF4 (4-bit NormalFloat) with double-quantized scales.

NF4 (Dettmers et al., "QLoRA", 2023, sec. 3) is a 16-value codebook on [-1, 1] built from
quantiles of N(0, 1), so that normally distributed data uses every code about equally often;
it has an exact zero.  We build the codebook from that definition: 8 positive levels at
``Phi^-1`` of ``linspace(1 - delta, 1/2, 9)[:-1]``, 7 negative levels at ``-Phi^-1`` of
``linspace(1 - delta, 1/2, 8)[:-1]``, and 0, each side divided by its largest magnitude, with
``delta = 1/2 (1/32 + 1/30)`` as in the paper.

Per position, each group of G channels gets an absmax scale ``s_g``.  *Double quantization*
stores those scales as 8-bit codes ``c_g = ceil(255 s_g / S)`` relative to one float16 second-level
scale per position ``S = round_up_fp16(max_g s_g)``; the dequantized scale
``s'_g = S c_g / 255 >= s_g`` still covers the group, so nothing clips and
``|x - x_hat| <= s'_g * max_gap / 2`` where ``max_gap`` is the widest codebook gap.  QLoRA
double-quantizes blocks of 256 scales; a per-position store only has D/G scales per row, so the
block here is one position (still a saving: at D=64, G=16 it costs 4.75 bits/element against
5.0 with float16 scales).  Name grammar: ``nf4[-g<G>][-nodq]`` (default G=16, double-quantized).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch

from kvcompile.errors import SchemeError
from kvcompile.quant.base import (FP16_MAX, channel_groups, QuantizedTensor, StorageScheme, check_input,
                                  empty_quantized, is_empty, register_family, round_to_dtype)
from kvcompile.quant.packing import pack_bits, unpack_bits
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import NATIVE_NF4, FamilyTraits, register_traits

DEFAULT_GROUP = 16
_NAME = re.compile(r"nf4(?:-g(?P<group>[0-9]+))?(?P<nodq>-nodq)?")


@functools.lru_cache(maxsize=1)
def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] (float32)."""
    delta = 0.5 * (1 / 32 + 1 / 30)
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = ndtri(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])  # magnitudes
    levels = torch.cat([-neg / neg.max(), torch.zeros(1, dtype=torch.float64), pos / pos.max()])
    return torch.sort(levels).values.float()


@dataclass(frozen=True)
class NF4Scheme(StorageScheme):
    group_size: int = DEFAULT_GROUP
    double_quant: bool = True
    bits: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.group_size <= 65536:
            raise SchemeError(f"nf4: group size must be from 1 to 65536, got {self.group_size}")

    @property
    def name(self) -> str:
        return "nf4" + (f"-g{self.group_size}" if self.group_size != DEFAULT_GROUP else "") + ("" if self.double_quant else "-nodq")

    def bits_per_element(self, head_dim: int) -> float:
        groups = head_dim // self.group_size
        scale_bits = 8 * groups + 16 if self.double_quant else 16 * groups
        return 4 + scale_bits / head_dim

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return channel_groups(self, x, self.group_size)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        x = check_input(x, self, FP16_MAX)
        if is_empty(x):
            return empty_quantized(self, tuple(x.shape))
        g = self._grouped(x)
        absmax = g.abs().amax(-1)  # [..., T, n_groups]
        if self.double_quant:
            super_scale = round_to_dtype(absmax.amax(-1, keepdim=True), torch.float16, "up")
            super_scale = torch.where(super_scale == 0, torch.finfo(torch.float16).tiny, super_scale)
            scale_codes = torch.ceil(absmax / super_scale.float() * 255).clamp(1, 255)
            parts = {"scale_codes": scale_codes.to(torch.uint8).view(torch.int8), "super_scale": super_scale}
        else:
            scale = round_to_dtype(absmax, torch.float16, "up")
            parts = {"scale": torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)}
        q = QuantizedTensor(self.name, tuple(x.shape), parts)
        scale = self._scales(q).unsqueeze(-1)
        y = g / scale
        book = nf4_codebook()
        codes = (y.unsqueeze(-1) - book).abs().argmin(-1).to(torch.uint8).reshape(x.shape)
        return QuantizedTensor(self.name, tuple(x.shape), {"codes": pack_bits(codes, 4), **parts})

    def _scales(self, q: QuantizedTensor) -> torch.Tensor:
        """Dequantized first-level scales, [..., T, n_groups] float32."""
        if self.double_quant:
            codes = q.parts["scale_codes"].view(torch.uint8).float()
            return q.parts["super_scale"].float() * codes / 255
        return q.parts["scale"].float()

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if is_empty(q.shape):
            return torch.zeros(q.shape)
        codes = unpack_bits(q.parts["codes"], 4, q.shape[-1]).long()
        values = self._grouped(nf4_codebook()[codes]) * self._scales(q).unsqueeze(-1)
        return values.reshape(q.shape)

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        half_gap = (nf4_codebook().diff().max() / 2).item()
        bound = self._scales(q).unsqueeze(-1) * half_gap * (1 + 1e-6)
        return (self._grouped(torch.zeros(q.shape)) + bound).reshape(q.shape)


def _parse(name: str) -> NF4Scheme | None:
    m = _NAME.fullmatch(name) if isinstance(name, str) else None  # fullmatch: no trailing newline
    if not m:
        return None
    return NF4Scheme(group_size=int(m["group"]) if m["group"] else DEFAULT_GROUP, double_quant=not m["nodq"])


register_family("nf4", _parse, ("nf4", "nf4-g32"))


# ----------------------------------------------------------------------------- traits: ONNX and native (no Triton kernel yet)

def _nf4_scales(b: ox.GraphBuilder, s: NF4Scheme, params: list[str]) -> str:
    """Dequantized first-level scales [B,H,T,D/G] float32."""
    if s.double_quant:
        codes = b.op("Cast", b.op("Mod", b.op("Cast", params[0], to=7), b.const(256, np.int64)), to=1)
        return b.op("Div", b.op("Mul", b.op("Cast", params[1], to=1), codes), b.const(255.0))
    return b.op("Cast", params[0], to=1)


def _nf4_quantize(b: ox.GraphBuilder, s: NF4Scheme, x: str, head_dim: int) -> list[str]:
    g = b.reshape(x, ox.grouped_shape(b, x, s.group_size, "token"))
    absmax = b.op("ReduceMax", b.op("Abs", g), b.i64(-1), keepdims=0)  # [B,H,T,ng]
    if s.double_quant:
        sup, sup_f = ox.stored_scale(b, b.op("ReduceMax", absmax, b.i64(-1), keepdims=1), True)
        c = b.op("Clip", b.op("Ceil", b.op("Mul", b.op("Div", absmax, sup_f), b.const(255.0))),
                 b.const(1.0), b.const(255.0))
        params = [ox.to_int8_container(b, b.op("Cast", c, to=7)), sup]
    else:
        params = [ox.stored_scale(b, absmax, True)[0]]
    scales = b.op("Unsqueeze", _nf4_scales(b, s, params), b.i64(-1))
    y = b.op("Div", g, scales)
    book = b.const(nf4_codebook().numpy())
    codes = b.op("ArgMin", b.op("Abs", b.op("Sub", b.op("Unsqueeze", y, b.i64(-1)), book)), axis=-1, keepdims=0)
    codes = b.reshape(codes, b.op("Shape", x))
    return [ox.pack(b, codes, 4), *params]


def _nf4_dequantize(b: ox.GraphBuilder, s: NF4Scheme, parts: list[str], head_dim: int) -> str:
    codes = ox.unpack(b, parts[0], 4)
    values = b.op("Gather", b.const(nf4_codebook().numpy()), codes, axis=0)
    g = b.reshape(values, ox.grouped_shape(b, values, s.group_size, "token"))
    x = b.op("Mul", g, b.op("Unsqueeze", _nf4_scales(b, s, parts[1:]), b.i64(-1)))
    return b.reshape(x, b.op("Shape", values))


register_traits(NF4Scheme, FamilyTraits(
    onnx=(_nf4_quantize, _nf4_dequantize),
    native=lambda s: {"kind": NATIVE_NF4, "bits": 4, "group": s.group_size, "channel": 0, "symmetric": 1,
                      "scale_bytes": 1 if s.double_quant else 2, "rotate": 0, "double_quant": int(s.double_quant)}))
