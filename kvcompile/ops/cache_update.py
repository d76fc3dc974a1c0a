"""``kvcompile::KVCacheUpdate``: append new positions to one head group's packed K or V cache.

The cache of H kv heads that share their schemes is, without age tiers, three packed
segments (see :mod:`kvcompile.kv.segments`): positions ``[0, s)`` in the sink scheme, ``[s, e)``
in the bulk scheme and ``[e, L)`` in the recent scheme, with ``s = min(sink_tokens, L)`` and
``e = s + G * floor(max(L - w - s, 0) / G)`` (G the bulk scheme's position block, w the window).

Inputs: the past segments' parts (P positions in all; the sink segment is absent when
``sink_tokens == 0``) and ``states`` float32 ``[B, H, S, D]``, positions ``P .. P+S-1``.
Outputs: the present segments' parts (P + S positions) and ``all_states`` float32
``[B, H, P+S, D]``, every position de-quantized from the precision it is now stored at, which
is what attention reads.  Per step::

    k       = clamp(n - P, 0, S)                      new positions that are sinks
    sink'   = sink ++ Q_sink(states[:k])
    recent' = recent ++ Q_recent(states[k:])
    m       = bulk_len(P + S) - bulk_len(P)           positions leaving the window
    bulk'   = bulk ++ Q_bulk(D_recent(recent'[:m]));  recent' = recent'[m:]

with ``bulk_len(L) = G * floor(max(L - w - min(n, L), 0) / G)``.  With age tiers (attribute
``age_tiers``) the segments are sink, bulk, ageK .. age1, recent, and the move repeats tier by tier,
recent -> age1 -> ... -> bulk, each with its ``m_i = c_i(P + S) - c_i(P)`` (:mod:`kvcompile.kv.segments`).
The reference is
:class:`kvcompile.kv.store.SegmentStore`, the store ``MixedPrecisionCache`` appends through, and
the function body evaluates the same :class:`~kvcompile.kv.segments.SegmentRule` with ONNX shape
ops, so the exported graph and the torch cache share one definition.

When a class scheme stores keys before RoPE (``-pr``, :mod:`kvcompile.kv.rope`) the op takes two
more inputs after ``states``, the layer's RoPE tables ``rope_cos`` / ``rope_sin`` [N, D] (the
graph's own tables, N = its maximum context): rows entering such a segment are rotated back by
their positions, ``R(-p) x = x cos[p] - rotate_half(x) sin[p]``, and rows read from it forward,
``x cos[p] + rotate_half(x) sin[p]``, with p the position each row holds (a segment's rows are
consecutive positions from the sum of the lengths of the segments before it).
"""

from __future__ import annotations

import torch

from kvcompile.kv.rope import RopeTable, stores_pre_rope
from kvcompile.kv.segments import OnnxInts, SegmentRule, storage_order
from kvcompile.kv.store import SegmentStore, reference_quantize
from kvcompile.ops.builder import INT_MAX
from kvcompile.ops.lowering import lowering
from kvcompile.ops.quantize import KV_DEQUANTIZE, KV_QUANTIZE, STATES, part_ports
from kvcompile.ops.spec import Attribute, OpSpec, Port, register_op
from kvcompile.quant import QuantizedTensor, get_scheme
from kvcompile.quant.base import native_readable, part_layout

ATTRIBUTES = (
    Attribute("sink_scheme", "string", "scheme of the first sink_tokens positions (per-token)"),
    Attribute("recent_scheme", "string", "scheme of the recent window (per-token)"),
    Attribute("bulk_scheme", "string", "scheme of the positions between sinks and window"),
    Attribute("sink_tokens", "int", "n, number of sink positions (0 = no sink segment)"),
    Attribute("recent_window", "int", "w, positions kept in the recent scheme"),
    Attribute("head_dim", "int", "D, the head dimension"),
    Attribute("age_tiers", "string", "age tiers between recent and bulk, newest first, as 'scheme:window,...' "
                                     "('' = none)"),
)


def format_age_tiers(tiers) -> str:
    """``[(scheme name, window), ...]`` -> the ``age_tiers`` attribute."""
    return ",".join(f"{name}:{window}" for name, window in tiers)


def parse_age_tiers(text: str) -> tuple[tuple[str, int], ...]:
    """The ``age_tiers`` attribute -> ``((scheme name, window), ...)``."""
    if not text:
        return ()
    out = []
    for item in text.split(","):
        name, _, window = item.rpartition(":")
        if not name or not window.isdigit() or int(window) < 1:
            raise ValueError(f"KVCacheUpdate: age_tiers must be 'scheme:window,...' with windows >= 1, got {text!r}")
        out.append((name, int(window)))
    return tuple(out)


def class_scheme(attrs, cls: str):
    """The scheme of class ``cls`` (sink, recent, age1.., bulk) of this op."""
    if cls.startswith("age"):
        return get_scheme(parse_age_tiers(attrs["age_tiers"])[int(cls[3:]) - 1][0])
    return get_scheme(attrs[f"{cls}_scheme"])


def segments(attrs) -> tuple[str, ...]:
    """The segments this op carries, in storage order."""
    order = storage_order(len(parse_age_tiers(attrs["age_tiers"])))
    return order if attrs["sink_tokens"] > 0 else tuple(c for c in order if c != "sink")


def segment_rule(attrs) -> SegmentRule:
    """The op's :class:`~kvcompile.kv.segments.SegmentRule`."""
    ages = tuple((w, get_scheme(name).token_group) for name, w in parse_age_tiers(attrs["age_tiers"]))
    return SegmentRule(attrs["sink_tokens"], attrs["recent_window"], get_scheme(attrs["bulk_scheme"]).token_group, ages)


#: the RoPE tables an op with a pre-RoPE class scheme takes after its states
ROPE_PORTS = (Port("rope_cos", "float32", ("N", "D"), "cos of RoPE per position (rotate-half layout)"),
              Port("rope_sin", "float32", ("N", "D"), "sin of RoPE per position"))


def pre_rope(attrs) -> bool:
    """Whether a class scheme of this op stores keys before RoPE (then it takes :data:`ROPE_PORTS`)."""
    return any(stores_pre_rope(class_scheme(attrs, c)) for c in segments(attrs))


def rope_ports(attrs) -> tuple[Port, ...]:
    return ROPE_PORTS if pre_rope(attrs) else ()


def segment_ports(attrs, prefix: str) -> tuple[Port, ...]:
    return tuple(p for seg in segments(attrs)
                 for p in part_ports(class_scheme(attrs, seg).name, attrs["head_dim"], prefix=f"{prefix}_{seg}."))


def _inputs(attrs):
    return (*segment_ports(attrs, "past"), STATES, *rope_ports(attrs))


def _outputs(attrs):
    return (*segment_ports(attrs, "present"), Port("all_states", "float32", ("B", "H", "P+S", "D")))


def _reference(attrs, *tensors):
    return run_cache_update(attrs, list(tensors))


def run_cache_update(attrs, tensors: list, quantize=None) -> tuple:
    """The op on torch tensors (any device): the shared :class:`SegmentStore` appends ``states``.

    ``quantize(scheme, x)`` replaces the schemes' own ``quantize`` (the TensorRT plugin passes the
    Triton append kernel, which is bit-identical).  ``tensors``: past parts, states, and the RoPE
    tables if :func:`pre_rope`."""
    rule = segment_rule(attrs)
    schemes = {c: class_scheme(attrs, c) for c in ("sink", *rule.tiers)}
    rope = None
    if pre_rope(attrs):
        rope, tensors = RopeTable(tensors[-2].float(), tensors[-1].float()), tensors[:-2]
    store = SegmentStore([], schemes, rule, quantize or reference_quantize, rope)
    states = tensors[-1]
    d = attrs["head_dim"]
    it = iter(tensors[:-1])
    past = 0
    for seg in segments(attrs):
        layout = part_layout(schemes[seg], d)
        parts = {p.name: next(it) for p in layout}
        t = parts[layout[0].name].shape[-2]
        past += t
        store.segments[seg] = QuantizedTensor(schemes[seg].name, (*states.shape[:2], t, d), parts) if t else None
    store.append(states, past)
    out = []
    for seg in segments(attrs):
        q = store.segments[seg]
        for p in part_layout(schemes[seg], d):
            out.append(q.parts[p.name] if q is not None else
                       torch.empty(*states.shape[:2], 0, p.width, dtype=p.dtype, device=states.device))
    return (*out, store.read())


def _body(b, attrs, inputs):
    n = len(segment_ports(attrs, "past"))
    present, all_states = update_body(b, attrs, inputs[:n], inputs[n], tuple(inputs[n + 1:]) or None)
    return present + [all_states]


def rope_body(b, x: str, rope: tuple[str, str], start: str, head_dim: int, forward: bool) -> str:
    """:meth:`RopeTable.rotate` (``forward``) or ``unrotate`` of ``x`` [B, H, T, D] at positions
    ``start ..`` (1-D int64), in the torch reference's float32 operation order."""
    stop = b.op("Add", start, b.dim(x, 2))
    # Gather, not Slice: [T, D] whatever the table length, so TensorRT's shape checks over its
    # optimization profile (segment lengths set independently) never see a short slice
    positions = b.op("Range", b.op("Squeeze", start), b.op("Squeeze", stop), b.scalar_i64(1))
    cos, sin = (b.op("Gather", table, positions, axis=0) for table in rope)  # [T, D], broadcast over B, H
    half = head_dim // 2
    rotated_half = b.op("Concat", b.op("Neg", b.slice_axis(x, b.i64(half), b.i64(head_dim), 3)),
                        b.slice_axis(x, b.i64(0), b.i64(half), 3), axis=3)
    return b.op("Add" if forward else "Sub", b.op("Mul", x, cos), b.op("Mul", rotated_half, sin))


def update_body(b, attrs, past_parts: list[str], states: str, rope: tuple[str, str] | None = None,
                on_move=None, trace: dict | None = None, codec_nodes: bool = False) -> tuple[list[str], str]:
    """The op's computation in standard ONNX ops, inlined into builder ``b``: the past segments'
    part names and the new ``states`` -> (present part names, all positions de-quantized).
    ``rope``: the ``(cos, sin)`` table names, when :func:`pre_rope`.

    Hooks for a cache of cross-layer prediction residuals (:mod:`kvcompile.export.predicted`), as
    :meth:`kvcompile.kv.store.SegmentStore.append` has them: ``on_move(tier, first, states)`` gets
    the de-quantized rows moving into ``rule.tiers[tier]`` (positions from the 1-D int64 ``first``)
    and returns the rows to quantize instead; ``trace``, a dict, receives ``"entry"`` (the new
    positions as stored, de-quantized, ``[B, H, S, D]``) and ``"moves"`` ``{tier: rows as stored}``.

    ``codec_nodes``: quantize and de-quantize through ``KVQuantize`` / ``KVDequantize`` nodes (the
    native library runs them, else their function bodies) where the library reads the scheme, instead
    of inlining the lowerings; only in a graph's top level (ONNX Runtime does not resolve an overloaded
    function called from inside a function)."""
    d = attrs["head_dim"]
    segs = segments(attrs)
    it = iter(past_parts)
    rule = segment_rule(attrs)
    schemes = {c: class_scheme(attrs, c) for c in ("sink", *rule.tiers)}
    past = {seg: [next(it) for _ in part_layout(schemes[seg], d)] for seg in segs}

    # The scheme lowerings are inlined rather than called as nested KVQuantize functions:
    # ONNX Runtime does not resolve overloaded functions called from inside a function.
    if pre_rope(attrs) and rope is None:
        raise ValueError("KVCacheUpdate: a pre-RoPE scheme needs the RoPE tables (rope_cos, rope_sin)")

    def as_node(seg):
        return codec_nodes and native_readable(schemes[seg])

    def quantize(seg, x, start):  # rows of positions start ..
        if stores_pre_rope(schemes[seg]):
            x = rope_body(b, x, rope, start, d, forward=False)
        if as_node(seg):
            return KV_QUANTIZE.emit(b, {"scheme": schemes[seg].name, "head_dim": d}, [x])
        return lowering(schemes[seg])[0](b, schemes[seg], x, d)

    def dequantize(seg, parts, start):
        if as_node(seg):
            x = KV_DEQUANTIZE.emit(b, {"scheme": schemes[seg].name, "head_dim": d}, list(parts))[0]
        else:
            x = lowering(schemes[seg])[1](b, schemes[seg], parts, d)
        return rope_body(b, x, rope, start, d, forward=True) if stores_pre_rope(schemes[seg]) else x

    def length(parts):  # positions in a segment: rows of its first part
        return b.op("Shape", parts[0], start=2, end=3)

    def first_position(seg):  # segments hold consecutive positions in storage order
        total = b.i64(0)
        for before in segs[: segs.index(seg)]:
            total = b.op("Add", total, length(present[before]))
        return total

    p_len = length(past["bulk"])
    for seg in segs:
        if seg != "bulk":
            p_len = b.op("Add", p_len, length(past[seg]))
    s_len = b.dim(states, 2)
    zero, end = b.i64(0), b.i64(INT_MAX)
    ints = OnnxInts(b)

    def cat(a, c):
        return [b.op("Concat", x, y, axis=2) for x, y in zip(a, c)]

    present = {}
    rest, rest_start = states, p_len
    entry = []  # (class, parts, first position) of the new positions as stored
    if "sink" in segs:
        k = rule.new_sinks(p_len, s_len, ints)
        new_sink = quantize("sink", b.slice_axis(states, zero, k, 2), p_len)
        present["sink"] = cat(past["sink"], new_sink)
        entry.append(("sink", new_sink, p_len))
        rest, rest_start = b.slice_axis(states, k, end, 2), b.op("Add", p_len, k)
    new_recent = quantize("recent", rest, rest_start)
    present["recent"] = cat(past["recent"], new_recent)
    entry.append(("recent", new_recent, rest_start))
    if trace is not None:
        rows = [dequantize(c, parts, first if rope is not None else None) for c, parts, first in entry]
        trace["entry"] = b.op("Concat", *rows, axis=2) if len(rows) > 1 else rows[0]
        trace["moves"] = {}
    for seg in rule.tiers[1:]:
        present[seg] = past[seg]
    tiers = rule.tiers
    for tier, (younger, older, moved) in enumerate(zip(tiers[:-1], tiers[1:], rule.moves(p_len, s_len, ints)), 1):
        # a part with one row per r positions (per-channel parameters) is cut at moved / r rows
        rows = [moved if p.rows_per == 1 else b.op("Div", moved, b.i64(p.rows_per))
                for p in part_layout(schemes[younger], d)]
        first = first_position(younger) if rope is not None or on_move is not None else None
        leaving = [b.slice_axis(x, zero, m, 2) for x, m in zip(present[younger], rows)]
        present[younger] = [b.slice_axis(x, m, end, 2) for x, m in zip(present[younger], rows)]
        rows_in = dequantize(younger, leaving, first)
        if on_move is not None:
            rows_in = on_move(tier, first, rows_in)
        moving = quantize(older, rows_in, first)
        present[older] = cat(present[older], moving)
        if trace is not None:
            trace["moves"][tier] = dequantize(older, moving, first)
    full = [dequantize(seg, present[seg], first_position(seg) if rope is not None else None) for seg in segs]
    all_states = b.op("Concat", *full, axis=2) if len(full) > 1 else full[0]
    return [x for seg in segs for x in present[seg]], all_states


KV_CACHE_UPDATE = register_op(OpSpec(
    name="KVCacheUpdate", version=1,
    doc="Append positions to a head group's packed sink/bulk/recent K or V cache; return the new "
        "segments and all positions de-quantized.",
    attributes=ATTRIBUTES,
    inputs=_inputs,
    outputs=_outputs,
    reference=_reference,
    body=_body,
))

__all__ = ["KV_CACHE_UPDATE", "ROPE_PORTS", "class_scheme", "pre_rope", "rope_body", "rope_ports", "format_age_tiers", "parse_age_tiers", "run_cache_update", "segment_ports",
           "segment_rule", "segments", "update_body"]
