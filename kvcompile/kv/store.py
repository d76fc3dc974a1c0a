"""The packed segments of one head group: the store every cache implementation shares.

:class:`SegmentStore` holds one segment per class (:class:`~kvcompile.quant.QuantizedTensor`,
``[B, H, positions, D]``: sinks, recent, age tiers, bulk) of the kv heads that share their schemes
and appends positions to them as :mod:`kvcompile.kv.segments` prescribes::

    k        = clamp(n - P, 0, S)                  new positions that are sinks
    sink'    = sink ++ Q_sink(x[:k])
    tier_0'  = recent ++ Q_recent(x[k:])
    for i = 1 .. K+1:                              (age1 .. ageK, then bulk)
        m_i      = c_i(P + S) - c_i(P)             positions reaching tier i
        tier_i'  = tier_i ++ Q_i(D_{i-1}(tier_{i-1}'[:m_i]));  tier_{i-1}' = tier_{i-1}'[m_i:]

Without age tiers that is one move, recent -> bulk.

A segment whose scheme stores keys before RoPE (``-pr``, :mod:`kvcompile.kv.rope`) quantizes its
rows rotated back by their positions and rotates them forward when read; the store passes each
segment's first position, so a position keeps its angle whichever segment holds it.

The torch cache (:mod:`kvcompile.cache.mixed`), the custom ops' torch references
(:mod:`kvcompile.ops.cache_update`) and the TensorRT plugin all append through this class, so
they share one definition.  ``quantize(scheme, x)`` may be replaced by a bit-identical kernel
(:func:`kvcompile.kernels.quantize_for_store`).  Importing this module loads torch, not transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvcompile.kv.rope import RopeTable, dequantize_at, quantize_at, stores_pre_rope
from kvcompile.kv.segments import SegmentRule, storage_order
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
    """Packed segments, one per class, of the kv heads ``heads`` that share ``schemes``
    (``{class: scheme}``: sink, recent, age1 .. ageK, bulk), placed by ``rule``; ``rope``: the
    layer's RoPE tables, needed when a scheme stores keys before RoPE."""

    def __init__(self, heads: list[int], schemes: dict[str, StorageScheme], rule: SegmentRule,
                 quantize: Quantizer = reference_quantize, rope: RopeTable | None = None):
        pre_rope = sorted({s.name for s in schemes.values() if stores_pre_rope(s)})
        if pre_rope and rope is None:
            raise ValueError(f"SegmentStore: {', '.join(pre_rope)} stores keys before RoPE; pass the layer's RoPE "
                             "tables (rope=...)")
        self.quantize = quantize
        self.rope = rope
        self.heads = heads
        self.rule = rule
        self.order = storage_order(len(rule.ages))
        if set(schemes) != set(self.order):
            raise ValueError(f"SegmentStore: schemes for {sorted(schemes)}, the rule has classes {sorted(self.order)}")
        self.schemes = dict(schemes)
        self.segments: dict[str, QuantizedTensor | None] = {c: None for c in self.order}

    @classmethod
    def three_class(cls, heads: list[int], sink: StorageScheme, recent: StorageScheme, bulk: StorageScheme,
                    sink_tokens: int, recent_window: int, quantize: Quantizer = reference_quantize) -> "SegmentStore":
        """A store without age tiers."""
        return cls(heads, {"sink": sink, "recent": recent, "bulk": bulk},
                   SegmentRule(sink_tokens, recent_window, bulk.token_group), quantize)

    @property
    def length(self) -> int:
        """Positions stored."""
        return sum(q.num_tokens for q in self.segments.values() if q is not None)

    def append(self, x: torch.Tensor, start: int, on_move: Callable | None = None) -> None:
        """Store ``x`` [B, h, t, D], the states of positions ``start .. start+t-1``.

        ``on_move(tier, first, states)``: called for each move into ``rule.tiers[tier]`` (1 = age1 or
        bulk) with the de-quantized rows leaving the tier before (positions ``first ..``); returns
        the rows to quantize instead (cross-layer prediction re-encodes its residuals there)."""
        new = x.shape[-2]
        n_sink = self.rule.new_sinks(start, new)
        seg = self.segments
        if n_sink:
            seg["sink"] = QuantizedTensor.cat_tokens([seg["sink"], self._quantize("sink", x[..., :n_sink, :], start)])
        if new > n_sink:
            seg["recent"] = QuantizedTensor.cat_tokens([seg["recent"], self._quantize("recent", x[..., n_sink:, :],
                                                                                       start + n_sink)])
        tiers = self.rule.tiers
        for tier, ((younger, older), moved) in enumerate(zip(zip(tiers[:-1], tiers[1:]), self.rule.moves(start, new)), 1):
            if not moved:  # positions aging out of a tier: re-quantized into the next one
                continue
            first = self._first_position(younger)
            leaving = seg[younger].slice_tokens(0, moved)
            rest = seg[younger].num_tokens
            seg[younger] = seg[younger].slice_tokens(moved, rest) if rest > moved else None
            states = dequantize_at(self.schemes[younger], leaving, self.rope, first)
            if on_move is not None:
                states = on_move(tier, first, states)
            seg[older] = QuantizedTensor.cat_tokens([seg[older], self._quantize(older, states, first)])

    def _quantize(self, cls: str, x: torch.Tensor, start: int) -> QuantizedTensor:
        return quantize_at(self.quantize, self.schemes[cls], x, self.rope, start)

    def _first_position(self, cls: str) -> int:
        """Position of the first row of segment ``cls`` (segments hold consecutive positions in storage order)."""
        before = self.order[: self.order.index(cls)]
        return sum(q.num_tokens for c in before if (q := self.segments[c]) is not None)

    def stored(self, heads: list[int]) -> list[tuple[int, Stored]]:
        """``[(start, Stored)]`` of the non-empty segments in position order, restricted to ``heads``."""
        return _stored(self, heads)

    def read(self) -> torch.Tensor:
        """De-quantized states of all stored positions, [B, h, L, D] float32 (pre-RoPE keys rotated)."""
        parts, start = [], 0
        for c in self.order:
            if (q := self.segments[c]) is not None:
                parts.append(dequantize_at(self.schemes[c], q, self.rope, start))
                start += q.num_tokens
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.segments.values() if q is not None)


class WindowStore:
    """The packed states of a sliding-window layer's kv heads ``heads``: one per-token ``scheme``,
    each position quantized once and dropped when no later query can read it.

    With window W, a query at position i reads keys ``i - W < j <= i``; once L positions have been
    seen, later queries read only the last ``W - 1`` of them, so :meth:`evict` keeps those.
    """

    def __init__(self, heads: list[int], scheme: StorageScheme, window: int, quantize: Quantizer = reference_quantize):
        if scheme.token_group != 1:
            raise ValueError(f"WindowStore: {scheme.name} groups positions; a window layer needs a per-token scheme")
        self.heads, self.scheme, self.window, self.quantize = heads, scheme, window, quantize
        # one segment, named as SegmentStore names its segments (snapshots and validate read these)
        self.order = ("window",)
        self.schemes = {"window": scheme}
        self.segments: dict[str, QuantizedTensor | None] = {"window": None}

    @property
    def length(self) -> int:
        """Positions stored (at most ``W - 1`` between updates)."""
        return 0 if self.segments["window"] is None else self.segments["window"].num_tokens

    def append(self, x: torch.Tensor, start: int) -> None:
        """Store ``x`` [B, h, t, D], the states of positions ``start .. start+t-1``."""
        self.segments["window"] = QuantizedTensor.cat_tokens([self.segments["window"], self.quantize(self.scheme, x)])

    def evict(self) -> None:
        """Drop the positions no later query reads: keep the last ``W - 1``."""
        excess = self.length - (self.window - 1)
        if excess > 0:
            rest = self.length
            kept = self.segments["window"].slice_tokens(excess, rest) if rest > excess else None
            # a copy, so the dropped positions' storage is freed (a slice would keep it alive)
            self.segments["window"] = None if kept is None else QuantizedTensor(
                kept.scheme, kept.shape, {k: v.clone() for k, v in kept.parts.items()})

    def read(self) -> torch.Tensor:
        """De-quantized states of the stored positions, [B, h, stored, D] float32."""
        return self.scheme.dequantize(self.segments["window"])

    def stored(self, heads: list[int]) -> list[tuple[int, Stored]]:
        """``[(0, Stored)]`` of the window restricted to ``heads`` (``[]`` when empty); start 0 is
        the oldest position held, not position 0 of the sequence."""
        return _stored(self, heads)

    def nbytes(self) -> int:
        return 0 if self.segments["window"] is None else self.segments["window"].nbytes


def _stored(store: "SegmentStore | WindowStore", heads: list[int]) -> list[tuple[int, Stored]]:
    """A store's non-empty segments in position order as ``[(start, Stored)]``, restricted to ``heads``."""
    index = None if heads == store.heads else torch.tensor([store.heads.index(h) for h in heads])
    out, start = [], 0
    for c in store.order:
        q = store.segments[c]
        if q is None:
            continue
        parts = q.parts if index is None else {k: v.index_select(1, index.to(v.device)) for k, v in q.parts.items()}
        out.append((start, Stored(store.schemes[c], parts, q.num_tokens)))
        start += q.num_tokens
    return out
