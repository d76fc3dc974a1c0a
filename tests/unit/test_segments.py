"""The segment algebra, and its three backends (Python ints, ONNX shape ops, TensorRT dims) agreeing."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from kvcompile.errors import KvcompileError
from kvcompile.kv.segments import OnnxInts, SegmentRule, TensorRTDims

RULES = [SegmentRule(n, w, g) for n, w, g in itertools.product((0, 1, 4), (0, 1, 5, 32), (1, 4, 32))]
TIERED = [SegmentRule(2, 3, 4, ((5, 1), (4, 2))), SegmentRule(0, 1, 8, ((2, 4),)), SegmentRule(4, 0, 1, ((1, 1),) * 3),
          SegmentRule(1, 2, 3, ((3, 5), (1, 1)))]


def brute_force(rule: SegmentRule, length: int) -> dict:
    """Class of every position, by the definition: sinks first; of the rest, the newest
    ``recent_window`` positions are recent, and of the older ones only whole blocks of G (counted
    from the first non-sink position) are bulk; a block still filling stays recent."""
    s = min(rule.sink_tokens, length)
    older = max(length - rule.recent_window - s, 0)
    bulk = sum(1 for j in range(s, s + older) if (j - s) // rule.token_group < older // rule.token_group)
    return {"sink": s, "bulk": bulk, "recent": length - s - bulk}


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_lengths_match_the_definition(rule):
    for length in range(0, 80):
        assert rule.lengths(length) == brute_force(rule, length), length


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_appends_in_any_chunks_age_the_same_positions(rule):
    """Appending S positions to P moves exactly the positions that S single appends would move."""
    for past, new in itertools.product(range(0, 40), range(0, 12)):
        singles = sum(rule.moves(past + i, 1)[0] for i in range(new))
        assert rule.moves(past, new) == [singles]
        assert rule.new_sinks(past, new) == sum(1 for j in range(past, past + new) if j < rule.sink_tokens)


def test_allocated_recent_is_the_longest_recent_segment():
    for rule in RULES:
        for context in range(0, 70):
            longest = max(rule.lengths(length)["recent"] for length in range(context + 1))
            assert rule.counted(context, "allocated")["recent"] == longest


def test_bad_rules_and_accounting_fail_with_one_line():
    with pytest.raises(KvcompileError, match="token_group >= 1"):
        SegmentRule(0, 0, 0)
    with pytest.raises(KvcompileError, match="memory accounting must be one of final, allocated"):
        SegmentRule(1, 2, 1).counted(10, "peak")


def test_onnx_shape_ops_evaluate_to_the_python_values():
    """The same methods emitted as ONNX nodes and run by ONNX Runtime give the Python integers."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from kvcompile.ops.builder import OPSET, Builder

    rules = [SegmentRule(4, 32, 32), SegmentRule(0, 5, 1), SegmentRule(1, 0, 4), SegmentRule(2, 3, 4, ((5, 1), (4, 2)))]
    b = Builder("seg")
    ints = OnnxInts(b)
    outputs = []
    for rule in rules:
        outputs += [*rule.lengths("past", ints).values(), rule.new_sinks("past", "new", ints),
                    *rule.moves("past", "new", ints)]
    names = [f"out{i}" for i in range(len(outputs))]
    b.nodes += [helper.make_node("Identity", [o], [n]) for o, n in zip(outputs, names)]
    graph = helper.make_graph(b.nodes, "segments",
                              [helper.make_tensor_value_info(x, TensorProto.INT64, [1]) for x in ("past", "new")],
                              [helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for past, new in itertools.product((0, 1, 3, 4, 5, 36, 37, 68, 100), (0, 1, 7, 40)):
        got = [int(x[0]) for x in session.run(names, {"past": np.array([past]), "new": np.array([new])})]
        want = []
        for rule in rules:
            want += [*rule.lengths(past).values(), rule.new_sinks(past, new), *rule.moves(past, new)]
        assert got == want, (past, new)


def test_tensorrt_dims_use_the_matching_dimension_operations():
    """TensorRTDims names TensorRT's DimensionOperation members; evaluated by a stand-in expression
    builder that applies each member's documented meaning, it gives the Python integers."""
    meaning = {"SUM": int.__add__, "SUB": int.__sub__, "PROD": int.__mul__, "FLOOR_DIV": int.__floordiv__,
               "MIN": min, "MAX": max}
    trt = SimpleNamespace(DimensionOperation=SimpleNamespace(**{k: k for k in meaning}))
    expr = SimpleNamespace(constant=int, operation=lambda kind, a, b: meaning[kind](a, b))
    dims = TensorRTDims(trt, expr)
    for rule in RULES + TIERED:
        for length in range(0, 70, 3):
            assert rule.lengths(length, dims) == rule.lengths(length)


def tiers_by_events(rule: SegmentRule, length: int) -> dict:
    """Tier of every position, by appending one position at a time: a block of G_i positions
    (counted from the first non-sink) moves from tier i - 1 to tier i once all of it sits in tier
    i - 1 and its youngest position is older than W_i."""
    tier: list[int] = []  # of non-sink positions
    names = rule.tiers
    bounds = rule._boundaries()
    for total in range(1, length + 1):
        s = min(rule.sink_tokens, total)
        if total > s:
            tier.append(0)
        for i, (start, group) in enumerate(bounds, 1):
            for first in range(0, len(tier) - group + 1, group):
                block = range(first, first + group)
                if all(tier[j] == i - 1 for j in block) and (len(tier) - 1 - block[-1]) >= start:
                    for j in block:
                        tier[j] = i
    counts = {"sink": min(rule.sink_tokens, length), **{n: 0 for n in names}}
    for t in tier:
        counts[names[t]] += 1
    return counts


@pytest.mark.parametrize("rule", TIERED, ids=str)
def test_age_tiers_match_appending_one_position_at_a_time(rule):
    for length in range(0, 70):
        assert rule.lengths(length) == tiers_by_events(rule, length), length
    for past, new in itertools.product(range(0, 40), range(0, 9)):
        singles = [sum(x) for x in zip(*[rule.moves(past + i, 1) for i in range(new)])] if new else [0] * len(rule.tiers[1:])
        assert rule.moves(past, new) == singles


def test_a_rule_without_age_tiers_is_the_three_class_rule():
    for n, w, g in itertools.product((0, 3), (0, 4), (1, 8)):
        rule = SegmentRule(n, w, g)
        assert rule.tiers == ("recent", "bulk")
        for length in range(0, 50):
            assert rule.lengths(length) == brute_force(rule, length)


def test_allocated_age_tiers_are_each_at_their_longest():
    for rule in TIERED:
        for context in (0, 7, 33):
            got = rule.counted(context, "allocated")
            assert got == {k: max(rule.lengths(n)[k] for n in range(context + 1)) for k in got}
