"""The segment algebra: where each cached position is stored, written once over integers.

A (layer, kv head, K|V) stream holding ``L`` positions stores them as ``s = min(n, L)`` sinks
(``n = sink_tokens``) and the other ``L - s`` positions in *age tiers*, newest first:
``recent`` (the last ``w_1 = recent_window`` positions), then optional ``age1 .. ageK`` of
``w_2 .. w_{K+1}`` positions each, then the unbounded ``bulk``.  A position moves to the next tier
when it is older than the tier's window, re-quantized from its current form; a tier whose scheme
groups ``G`` positions (per-channel formats) takes whole blocks of ``G``, counted from the first
non-sink position, and a block still filling waits in the tier before.

With ``W_i = w_1 + ... + w_i`` (the age at which a position leaves tier i - 1), ``G_i`` the
position block of tier i's scheme (tier 0 = recent, tier K + 1 = bulk) and
``B_i = lcm(G_i, G_{i-1})`` (a block of a per-channel tier also leaves it whole), the number of
non-sink positions that have reached tier i or an older one is::

    c_0 = L - s
    c_1 = B_1 * floor(max(c_0 - W_1, 0) / B_1)
    c_i = B_i * floor(max(min(c_{i-1}, c_0 - W_i), 0) / B_i)        (i >= 2)

so tier i holds ``c_i - c_{i+1}`` positions (``c_{K+2} = 0``).  With no age tiers this is the
three-class model: bulk ``b = G * floor(max(L - w - s, 0) / G)``, recent ``L - s - b``.
Appending ``S`` positions to ``P`` moves ``c_i(P + S) - c_i(P)`` positions into tier i, for
i = 1, 2, ... in that order; ``clamp(n - P, 0, S)`` of the new positions are sinks.

These formulas are evaluated by Python code (the cache, the planner's bit counts, the
simulation's masks), by ONNX shape ops (the exported graph) and by TensorRT dimension expressions
(plugin output shapes).  Each of those is an :class:`IntegerOps` backend, and
:class:`SegmentRule` is written once against that interface, so the three cannot drift apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

from kvcompile.errors import KvcompileError

#: position classes of a map without age tiers (:func:`class_names` gives them with tiers)
CLASSES = ("sink", "recent", "bulk")
#: most age tiers between recent and bulk
MAX_AGE_TIERS = 6


def tier_names(age_tiers: int) -> tuple[str, ...]:
    """Tiers newest first: ``("recent", "age1", ..., "ageK", "bulk")``."""
    return ("recent", *(f"age{i}" for i in range(1, age_tiers + 1)), "bulk")


def class_names(age_tiers: int) -> tuple[str, ...]:
    """Every position class: the sinks, then the tiers newest first."""
    return ("sink", *tier_names(age_tiers))


def storage_order(age_tiers: int) -> tuple[str, ...]:
    """Segments along the position axis, oldest first: sinks, bulk, ageK, ..., age1, recent."""
    return ("sink", *reversed(tier_names(age_tiers)))


#: How memory is counted at a context of N positions (``memory=`` of :meth:`SegmentRule.counted`):
#: ``final``: what the cache stores holding exactly N positions;
#: ``allocated``: the per-class buffers a preallocated cache needs to hold any length L <= N, i.e.
#: the sinks, the bulk at N, and the recent segment at its longest, ``min(N - s, w + G - 1)``
#: positions: the window plus a per-channel block still waiting to fill.
MEMORY_ACCOUNTING = ("final", "allocated")


class IntegerOps(Protocol):
    """Integer arithmetic on some representation of non-negative integers."""

    def const(self, value: int) -> Any: ...
    def add(self, a, b) -> Any: ...
    def sub(self, a, b) -> Any: ...
    def mul(self, a, b) -> Any: ...
    def floordiv(self, a, b) -> Any: ...
    def min(self, a, b) -> Any: ...
    def max(self, a, b) -> Any: ...


class PythonInts:
    """Plain Python integers."""

    def const(self, value: int) -> int:
        return int(value)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def floordiv(self, a, b):
        return a // b

    def min(self, a, b):
        return min(a, b)

    def max(self, a, b):
        return max(a, b)


PYTHON = PythonInts()


class OnnxInts:
    """int64 scalar-or-[1] tensors in an ONNX graph under construction.

    ``builder`` needs ``i64(value)`` (an int64 constant) and ``op(type, *inputs)`` (one node, one
    output), as :class:`kvcompile.ops.builder.Builder` has; operands are tensor names.
    Floor division is ``Div`` on non-negative int64, which truncates, i.e. floors."""

    def __init__(self, builder):
        self.b = builder

    def const(self, value: int):
        return self.b.i64(int(value))

    def add(self, a, b):
        return self.b.op("Add", a, b)

    def sub(self, a, b):
        return self.b.op("Sub", a, b)

    def mul(self, a, b):
        return self.b.op("Mul", a, b)

    def floordiv(self, a, b):
        return self.b.op("Div", a, b)

    def min(self, a, b):
        return self.b.op("Min", a, b)

    def max(self, a, b):
        return self.b.op("Max", a, b)


class TensorRTDims:
    """TensorRT symbolic dimensions (``IDimensionExpr``), built with an ``IExprBuilder``.

    ``trt`` is the module (``tensorrt`` or ``tensorrt_rtx``), passed in, never imported here."""

    def __init__(self, trt, expr_builder):
        self.ops = trt.DimensionOperation
        self.expr = expr_builder

    def _op(self, kind: str, a, b):
        return self.expr.operation(getattr(self.ops, kind), a, b)

    def const(self, value: int):
        return self.expr.constant(int(value))

    def add(self, a, b):
        return self._op("SUM", a, b)

    def sub(self, a, b):
        return self._op("SUB", a, b)

    def mul(self, a, b):
        return self._op("PROD", a, b)

    def floordiv(self, a, b):
        return self._op("FLOOR_DIV", a, b)

    def min(self, a, b):
        return self._op("MIN", a, b)

    def max(self, a, b):
        return self._op("MAX", a, b)


@dataclass(frozen=True)
class SegmentRule:
    """Where a stream with ``sink_tokens`` sinks, a ``recent_window``, optional age tiers ``ages``
    (``((window, token_group), ...)``, newest first) and a bulk block of ``token_group`` positions
    stores each position.  Every method takes lengths in the representation of ``ops`` (default:
    Python ints) and returns the same representation."""

    sink_tokens: int
    recent_window: int
    token_group: int = 1
    ages: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.sink_tokens < 0 or self.recent_window < 0 or self.token_group < 1:
            raise KvcompileError(f"segment rule needs sink_tokens >= 0, recent_window >= 0 and token_group >= 1, got "
                                 f"{self.sink_tokens}, {self.recent_window}, {self.token_group}")
        if len(self.ages) > MAX_AGE_TIERS or any(w < 1 or g < 1 for w, g in self.ages):
            raise KvcompileError(f"segment rule: at most {MAX_AGE_TIERS} age tiers, each with a window >= 1 and "
                                 f"token_group >= 1, got {list(self.ages)}")

    @property
    def tiers(self) -> tuple[str, ...]:
        return tier_names(len(self.ages))

    def _boundaries(self) -> list[tuple[int, int]]:
        """``(W_i, B_i)`` for tiers i = 1 .. K + 1, with ``B_i = lcm(G_i, G_{i-1})``: positions move
        in whole blocks of the tier they enter and of the tier they leave (a per-channel block
        leaves whole)."""
        out, age, previous = [], self.recent_window, 1
        for window, group in (*self.ages, (None, self.token_group)):
            out.append((age, math.lcm(group, previous)))
            if window is not None:
                age += window
            previous = group
        return out

    def sinks(self, length, ops: IntegerOps = PYTHON):
        """``s = min(n, L)``: positions in the sink segment."""
        return ops.min(ops.const(self.sink_tokens), length)

    def reached(self, length, ops: IntegerOps = PYTHON) -> list:
        """``[c_0, c_1, ..., c_{K+1}]``: non-sink positions in tier i or an older one."""
        c0 = ops.sub(length, self.sinks(length, ops))
        counts = [c0]
        for i, (start, group) in enumerate(self._boundaries()):
            free = ops.sub(c0, ops.const(start))
            if i:  # a tier only takes positions the tier before has (c_1 <= c_0 holds already)
                free = ops.min(counts[-1], free)
            g = ops.const(group)
            counts.append(ops.mul(ops.floordiv(ops.max(free, ops.const(0)), g), g))
        return counts

    def bulk_length(self, length, ops: IntegerOps = PYTHON):
        """``c_{K+1}``; without age tiers ``b = G * floor(max(L - w - s, 0) / G)``: positions in the bulk."""
        return self.reached(length, ops)[-1]

    def bulk_end(self, length, ops: IntegerOps = PYTHON):
        """``s + c_{K+1}``: the first position after the bulk (of the recent tier, without age tiers)."""
        return ops.add(self.sinks(length, ops), self.bulk_length(length, ops))

    def recent_length(self, length, ops: IntegerOps = PYTHON):
        """``c_0 - c_1``: positions in the recent segment."""
        c = self.reached(length, ops)
        return ops.sub(c[0], c[1])

    def lengths(self, length, ops: IntegerOps = PYTHON) -> dict:
        """Positions per class: ``{"sink": s, "recent": c_0 - c_1, "age1": c_1 - c_2, ..., "bulk": c_{K+1}}``."""
        c = self.reached(length, ops)
        out = {"sink": self.sinks(length, ops)}
        for i, name in enumerate(self.tiers):
            out[name] = c[i] if name == "bulk" else ops.sub(c[i], c[i + 1])
        return out

    def new_sinks(self, past, new, ops: IntegerOps = PYTHON):
        """``k = clamp(n - P, 0, S)``: how many of ``S`` positions appended to ``P`` are sinks."""
        return ops.max(ops.const(0), ops.min(ops.sub(ops.const(self.sink_tokens), past), new))

    def moves(self, past, new, ops: IntegerOps = PYTHON) -> list:
        """``[c_i(P + S) - c_i(P) for i = 1 .. K+1]``: positions entering tier i on that append."""
        before, after = self.reached(past, ops), self.reached(ops.add(past, new), ops)
        return [ops.sub(a, b) for a, b in zip(after[1:], before[1:])]

    def counted(self, context: int, memory: str = "final") -> dict[str, int]:
        """Positions counted per class at a context of ``context`` positions (Python ints).

        ``memory="allocated"``: each class at its longest over ``L <= N``.  Without age tiers the
        recent segment's length is ``L - s`` up to ``s + w`` and ``w + ((L - w - s) mod G)`` after,
        so its maximum is ``min(N - s, w + G - 1)``; sinks and bulk only grow.  With age tiers the
        maxima are found by counting every ``L <= N``.
        """
        if memory not in MEMORY_ACCOUNTING:
            raise KvcompileError(f"memory accounting must be one of {', '.join(MEMORY_ACCOUNTING)}, got {memory!r}")
        if memory == "final":
            return self.lengths(context)
        return dict(_allocated(self, context))


@functools.lru_cache(maxsize=4096)
def _allocated(rule: SegmentRule, context: int) -> tuple[tuple[str, int], ...]:
    counts = rule.lengths(context)
    if not rule.ages:
        counts["recent"] = min(context - counts["sink"], rule.recent_window + rule.token_group - 1)
    else:
        for length in range(context):
            for name, n in rule.lengths(length).items():
                counts[name] = max(counts[name], n)
    return tuple(counts.items())


def bulk_end(seq_len: int, sink_tokens: int, recent_window: int, token_group: int) -> int:
    """First position of the recent segment for a sequence of ``seq_len`` positions."""
    return SegmentRule(sink_tokens, recent_window, token_group).bulk_end(seq_len)


def class_lengths(seq_len: int, sink_tokens: int, recent_window: int, token_group: int,
                  memory: str = "final") -> dict[str, int]:
    """Positions counted per class (sink, bulk, recent) at a context of ``seq_len`` positions."""
    return SegmentRule(sink_tokens, recent_window, token_group).counted(seq_len, memory)
