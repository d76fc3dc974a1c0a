"""Keys stored before RoPE: a per-channel key format applied to the un-rotated key.

RoPE turns each pair of channels ``(i, i + D/2)`` of a key at position p by the angle
``p * theta_i`` (``theta_i = base^(-2i/D)``).  A key's outlier channels are a property of the
projection, not of the position, so before RoPE a channel keeps its scale over a block of G
positions; after RoPE each pair's energy swings between its two channels with the position, which
widens the range a per-channel group of G positions has to cover.  KVQuant (Hooper et al., arXiv
2401.18079, sec. 3.2) therefore quantizes keys per channel *before* RoPE and applies RoPE to the
de-quantized key on read.

``<base>-pr`` is that format: the stored parts are exactly the base format's, of the key rotated
back to position 0 (``R(-p) k``); reading de-quantizes and rotates forward (``R(p) Q(R(-p) k)``).
The rotation needs the positions and the model's RoPE tables, which a format does not have, so
the stores apply it (:mod:`kvcompile.kv.rope`): the torch cache, the simulation and the
calibration.  This class only marks the format (``pre_rope = True``) and delegates the rest.

Name grammar: ``<base>-pr``, base a per-channel format (``-ch``: integer, Lloyd-Max or outlier),
keys only (values have no RoPE; precision maps refuse it there).  Bits: the base's.  Error bound:
the base's, in the storage (pre-RoPE) domain; the rotation is orthogonal per channel pair, so the
L2 error of each pair is the same after it.  ONNX lowering: the base's (the ``KVCacheUpdate`` /
``KVAttention`` bodies rotate around it, :func:`kvcompile.ops.cache_update.rope_body`).  No
kernel or native reader yet: such head groups run the ``KVAttention`` function body, and the
kernel cache refuses it with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompile.errors import SchemeError
from kvcompile.quant.base import (DerivedScheme, FamilyTraits, QuantizedTensor, derived_parser, family_traits,
                                  register_family, register_traits)


@dataclass(frozen=True)
class PreRopeScheme(DerivedScheme):
    #: read by the stores: quantize ``R(-p) x`` and rotate the de-quantized rows forward by RoPE
    pre_rope = True

    def __post_init__(self) -> None:
        if self.base.axis != "channel" or getattr(self.base, "pre_rope", False):
            raise SchemeError(f"{self.base.name}-pr: the base of a pre-RoPE key format must be a per-channel "
                              "(-ch) format, not itself -pr")

    def suffix(self) -> str:
        return "-pr"

    def bits_per_element(self, head_dim: int) -> float:
        return self.base.bits_per_element(head_dim)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        q = self.base.quantize(x)
        return QuantizedTensor(self.name, q.shape, q.parts)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return self.base.dequantize(self.base_part(q))

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        return self.base.error_bound(self.base_part(q))


register_family("pre-rope", derived_parser("-pr", PreRopeScheme), ("int2-ch-pr", "int4-ch-g16-pr"))


# ----------------------------------------------------------------------------- ONNX lowering: the base's

def _quantize_lowering(b, s: PreRopeScheme, x: str, head_dim: int) -> list[str]:
    return family_traits(s.base).onnx[0](b, s.base, x, head_dim)


def _dequantize_lowering(b, s: PreRopeScheme, parts: list[str], head_dim: int) -> str:
    return family_traits(s.base).onnx[1](b, s.base, parts, head_dim)


register_traits(PreRopeScheme, FamilyTraits(onnx=(_quantize_lowering, _dequantize_lowering)))
