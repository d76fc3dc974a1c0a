"""RoPE on read: the rotation that pre-RoPE key formats (``<base>-pr``) undo before storing.

Rotary position embedding in the rotate-half layout (Llama, Gemma; Su et al., arXiv 2104.09864)
turns the channel pair ``(i, i + D/2)`` of a vector at position p by the angle ``p * theta_i``:

    R(p) x = x * cos[p] + rotate_half(x) * sin[p],     rotate_half(x) = (-x[D/2:], x[:D/2])

with ``cos[p], sin[p]`` [D] the model's tables (both halves repeat ``cos(p theta_i)``; RoPE
scaling, if the model has any, is already in them).  ``R(p)`` is orthogonal, so
``R(p)^-1 = R(-p)``: ``x * cos[p] - rotate_half(x) * sin[p]``.  A store keeps ``Q(R(-p) k)`` for
a key ``k`` that the model rotated at position p and reads ``R(p) D(Q(R(-p) k))``.

Positions are absolute: a segment starting at position ``start`` holds rows ``start, start+1, ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvcompile.quant import QuantizedTensor, StorageScheme


@dataclass(frozen=True, eq=False)
class RopeTable:
    """One layer's RoPE tables: ``cos``, ``sin`` [N, D] float32 for positions ``0 .. N-1``."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __post_init__(self) -> None:
        if self.cos.shape != self.sin.shape or self.cos.dim() != 2 or self.cos.shape[-1] % 2:
            raise ValueError(f"RopeTable: expected cos and sin of one shape [positions, even head dim], got "
                             f"{list(self.cos.shape)} and {list(self.sin.shape)}")

    @property
    def positions(self) -> int:
        return self.cos.shape[0]

    def _tables(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[-2]
        if start < 0 or start + t > self.positions or x.shape[-1] != self.cos.shape[-1]:
            raise ValueError(f"RopeTable: rows [{start}, {start + t}) of head dim {x.shape[-1]}; the table covers "
                             f"{self.positions} positions of head dim {self.cos.shape[-1]}")
        return self.cos[start : start + t].to(x.device), self.sin[start : start + t].to(x.device)

    def rotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``R(p) x`` for ``x`` [..., T, D] float32 at positions ``start .. start+T-1``."""
        cos, sin = self._tables(x, start)
        return x * cos + _rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``R(-p) x``: the inverse of :meth:`rotate`."""
        cos, sin = self._tables(x, start)
        return x * cos - _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def stores_pre_rope(scheme: StorageScheme) -> bool:
    """Whether ``scheme`` stores keys before RoPE (a ``-pr`` format)."""
    return bool(getattr(scheme, "pre_rope", False))


def _need(rope: "RopeTable | None", scheme: StorageScheme) -> RopeTable:
    if rope is None:
        raise ValueError(f"{scheme.name} stores keys before RoPE; the store needs the layer's RoPE tables (rope=...)")
    return rope


def quantize_at(quantize: Callable, scheme: StorageScheme, x: torch.Tensor, rope: "RopeTable | None",
                start: int) -> QuantizedTensor:
    """``quantize(scheme, x)`` for rows at positions ``start ..``, un-rotated first if ``scheme`` is pre-RoPE."""
    if stores_pre_rope(scheme):
        x = _need(rope, scheme).unrotate(x.float(), start)
    return quantize(scheme, x)


def dequantize_at(scheme: StorageScheme, q: QuantizedTensor, rope: "RopeTable | None", start: int) -> torch.Tensor:
    """The float32 rows of ``q`` (positions ``start ..``) as attention reads them: rotated forward if pre-RoPE."""
    x = scheme.dequantize(q)
    return _need(rope, scheme).rotate(x, start) if stores_pre_rope(scheme) else x


def roundtrip_at(scheme: StorageScheme, x: torch.Tensor, rope: "RopeTable | None", start: int) -> torch.Tensor:
    """``x`` [..., T, D] (positions ``start ..``) as stored in ``scheme`` and read back."""
    if not stores_pre_rope(scheme):
        return scheme.roundtrip(x)
    rope = _need(rope, scheme)
    return rope.rotate(scheme.roundtrip(rope.unrotate(x.float(), start)), start)
