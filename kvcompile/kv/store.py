"""The packed segments of one head group: the store every cache implementation shares.

:class:`SegmentStore` holds the sink, bulk and recent segments (:class:`~kvcompile.quant.QuantizedTensor`,
``[B, H, positions, D]``) of the kv heads that share one (sink, recent, bulk) scheme triple and
appends positions to them as :mod:`kvcompile.kv.segments` prescribes::

    k       = clamp(n - P, 0, S)                  new positions that are sinks
    sink'   = sink ++ Q_sink(x[:k])
    recent' = recent ++ Q_recent(x[k:])
    m       = b(P + S) - b(P)                      positions leaving the window
    bulk'   = bulk ++ Q_bulk(D_recent(recent'[:m]));  recent' = recent'[m:]

The torch cache (:mod:`kvcompile.cache.mixed`), the custom ops' torch references
(:mod:`kvcompile.ops.cache_update`) and the TensorRT plugin all append through this class, so
they share one definition.  ``quantize(scheme, x)`` may be replaced by a bit-identical kernel
(:func:`kvcompile.kernels.quantize_for_store`).  Importing this module loads torch, not transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvcompile.kv.segments import STORAGE_ORDER, SegmentRule
from kvcompile.quant import QuantizedTensor, StorageScheme


def reference_quantize(scheme: StorageScheme, x: torch.Tensor) -> QuantizedTensor:
    """The storage format's torch reference (the oracle every kernel is tested against)."""
    return scheme.quantize(x)


Quantizer = Callable[[StorageScheme, torch.Tensor], QuantizedTensor]


@dataclass(frozen=True)
class Stored:
    """A stored segment of one stream: scheme, parts ``[B, Hkv, rows, width]`` for ``positions``."""

    scheme: StorageScheme
    parts: dict
    positions: int


class SegmentStore:
    """Packed sink / bulk / recent segments of the kv heads ``heads`` that share one scheme triple."""

    def __init__(self, heads: list[int], sink: StorageScheme, recent: StorageScheme, bulk: StorageScheme,
                 sink_tokens: int, recent_window: int, quantize: Quantizer = reference_quantize):
        self.quantize = quantize
        self.heads = heads
        self.schemes = {"sink": sink, "recent": recent, "bulk": bulk}
        self.rule = SegmentRule(sink_tokens, recent_window, bulk.token_group)
        self.segments: dict[str, QuantizedTensor | None] = {c: None for c in STORAGE_ORDER}

    @property
    def length(self) -> int:
        """Positions stored."""
        return sum(q.num_tokens for q in self.segments.values() if q is not None)

    def append(self, x: torch.Tensor, start: int) -> None:
        """Store ``x`` [B, h, t, D], the states of positions ``start .. start+t-1``."""
        new = x.shape[-2]
        n_sink = self.rule.new_sinks(start, new)
        seg = self.segments
        if n_sink:
            seg["sink"] = QuantizedTensor.cat_tokens([seg["sink"], self.quantize(self.schemes["sink"], x[..., :n_sink, :])])
        if new > n_sink:
            seg["recent"] = QuantizedTensor.cat_tokens([seg["recent"], self.quantize(self.schemes["recent"], x[..., n_sink:, :])])
        moved = self.rule.aging(start, new)
        if moved:  # positions aging out of the window: recent precision -> bulk precision
            leaving = seg["recent"].slice_tokens(0, moved)
            rest = seg["recent"].num_tokens
            seg["recent"] = seg["recent"].slice_tokens(moved, rest) if rest > moved else None
            requantized = self.quantize(self.schemes["bulk"], self.schemes["recent"].dequantize(leaving))
            seg["bulk"] = QuantizedTensor.cat_tokens([seg["bulk"], requantized])

    def stored(self, heads: list[int]) -> list[tuple[int, Stored]]:
        """``[(start, Stored)]`` of the non-empty segments in position order, restricted to ``heads``."""
        index = None if heads == self.heads else torch.tensor([self.heads.index(h) for h in heads])
        out, start = [], 0
        for c in STORAGE_ORDER:
            q = self.segments[c]
            if q is None:
                continue
            parts = q.parts if index is None else {k: v.index_select(1, index.to(v.device)) for k, v in q.parts.items()}
            out.append((start, Stored(self.schemes[c], parts, q.num_tokens)))
            start += q.num_tokens
        return out

    def read(self) -> torch.Tensor:
        """De-quantized states of all stored positions, [B, h, L, D] float32."""
        parts = [self.schemes[c].dequantize(q) for c in STORAGE_ORDER if (q := self.segments[c]) is not None]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.segments.values() if q is not None)
