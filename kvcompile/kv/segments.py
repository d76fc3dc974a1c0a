"""The segment algebra: where each cached position is stored, written once over integers.

A (layer, kv head, K|V) stream holding ``L`` positions stores them in three segments:

* ``sink``   positions ``[0, s)``        with ``s = min(n, L)``, ``n = sink_tokens``;
* ``bulk``   positions ``[s, s + b)``    with ``b = G * floor(max(L - w - s, 0) / G)``;
* ``recent`` positions ``[s + b, L)``,   the last ``w = recent_window`` positions and any
  positions still waiting for a complete block of ``G`` (the bulk scheme's ``token_group``:
  1 for per-token formats, the group size for per-channel formats).

Appending ``S`` positions to ``P`` stored ones moves ``m = b(P + S) - b(P)`` positions from the
front of the recent segment into the bulk (re-quantized); ``k = clamp(n - P, 0, S)`` of the new
positions are sinks.  These formulas are evaluated by Python code (the cache, the planner's bit
counts, the simulation's masks), by ONNX shape ops (the exported graph) and by TensorRT dimension
expressions (plugin output shapes).  Each of those is an :class:`IntegerOps` backend, and
:class:`SegmentRule` is written once against that interface, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kvcompile.errors import KvcompileError

CLASSES = ("sink", "recent", "bulk")
#: storage order of the segments along the position axis
STORAGE_ORDER = ("sink", "bulk", "recent")

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
    """Where a stream with ``sink_tokens`` sinks, a ``recent_window`` and a bulk block of
    ``token_group`` positions stores each position.  Every method takes lengths in the
    representation of ``ops`` (default: Python ints) and returns the same representation."""

    sink_tokens: int
    recent_window: int
    token_group: int = 1

    def __post_init__(self) -> None:
        if self.sink_tokens < 0 or self.recent_window < 0 or self.token_group < 1:
            raise KvcompileError(f"segment rule needs sink_tokens >= 0, recent_window >= 0 and token_group >= 1, got "
                                 f"{self.sink_tokens}, {self.recent_window}, {self.token_group}")

    def sinks(self, length, ops: IntegerOps = PYTHON):
        """``s = min(n, L)``: positions in the sink segment."""
        return ops.min(ops.const(self.sink_tokens), length)

    def bulk_length(self, length, ops: IntegerOps = PYTHON):
        """``b = G * floor(max(L - w - s, 0) / G)``: positions in the bulk segment."""
        free = ops.max(ops.sub(ops.sub(length, ops.const(self.recent_window)), self.sinks(length, ops)), ops.const(0))
        g = ops.const(self.token_group)
        return ops.mul(ops.floordiv(free, g), g)

    def bulk_end(self, length, ops: IntegerOps = PYTHON):
        """``e = s + b``: the first position of the recent segment."""
        return ops.add(self.sinks(length, ops), self.bulk_length(length, ops))

    def recent_length(self, length, ops: IntegerOps = PYTHON):
        """``L - s - b``: positions in the recent segment."""
        return ops.sub(ops.sub(length, self.sinks(length, ops)), self.bulk_length(length, ops))

    def lengths(self, length, ops: IntegerOps = PYTHON) -> dict:
        """``{"sink": s, "bulk": b, "recent": L - s - b}``."""
        return {"sink": self.sinks(length, ops), "bulk": self.bulk_length(length, ops),
                "recent": self.recent_length(length, ops)}

    def new_sinks(self, past, new, ops: IntegerOps = PYTHON):
        """``k = clamp(n - P, 0, S)``: how many of ``S`` positions appended to ``P`` are sinks."""
        return ops.max(ops.const(0), ops.min(ops.sub(ops.const(self.sink_tokens), past), new))

    def aging(self, past, new, ops: IntegerOps = PYTHON):
        """``m = b(P + S) - b(P)``: positions leaving the recent segment for the bulk on that append."""
        return ops.sub(self.bulk_length(ops.add(past, new), ops), self.bulk_length(past, ops))

    def counted(self, context: int, memory: str = "final") -> dict[str, int]:
        """Positions counted per class at a context of ``context`` positions (Python ints).

        ``memory="allocated"``: the recent segment's length ``L - e(L)`` is ``L - s`` up to ``s + w``
        and ``w + ((L - w - s) mod G)`` after, so its maximum over ``L <= N`` is ``min(N - s, w + G - 1)``.
        """
        if memory not in MEMORY_ACCOUNTING:
            raise KvcompileError(f"memory accounting must be one of {', '.join(MEMORY_ACCOUNTING)}, got {memory!r}")
        counts = self.lengths(context)
        if memory == "allocated":
            counts["recent"] = min(context - counts["sink"], self.recent_window + self.token_group - 1)
        return counts


def bulk_end(seq_len: int, sink_tokens: int, recent_window: int, token_group: int) -> int:
    """First position of the recent segment for a sequence of ``seq_len`` positions."""
    return SegmentRule(sink_tokens, recent_window, token_group).bulk_end(seq_len)


def class_lengths(seq_len: int, sink_tokens: int, recent_window: int, token_group: int,
                  memory: str = "final") -> dict[str, int]:
    """Positions counted per class (sink, bulk, recent) at a context of ``seq_len`` positions."""
    return SegmentRule(sink_tokens, recent_window, token_group).counted(seq_len, memory)
