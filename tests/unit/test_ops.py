"""kvcompile ops: the ONNX function bodies (run by ONNX Runtime) against their torch references.

Quantize / cache-update outputs must be *bit-identical* to the references; that is what lets
an exported graph and MixedPrecisionCache hold the same cache.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX path needs onnx (installed by install.sh)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.errors import ExportError  # noqa: E402
from kvcompile.ops import KV_CACHE_UPDATE, KV_DEQUANTIZE, KV_QUANTIZE, get_op, op_names  # noqa: E402
from kvcompile.ops.builder import OPSET, Builder  # noqa: E402
from kvcompile.ops.lowering import check_lowerable, round_fp16  # noqa: E402
from kvcompile.quant import get_scheme  # noqa: E402
from kvcompile.quant.base import round_to_dtype  # noqa: E402
from tests.conftest import adversarial  # noqa: E402

NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
SCHEMES = ["fp16", "int8", "int4", "int3", "int2", "int4-sym", "int2-sym", "int2-ch", "int4-ch-g64", "int3-s32",
           "int8-ch-s32", "nf4", "nf4-g32", "nf4-nodq", "int4-rot", "int2-rot", "lm2", "lm3-rot", "lm4-g64-rot",
           "int2-ch-o1", "int4-o1", "lm2-o2", "int3-ch-g16-o3", "fp8", "lm2-ch", "lm3-ch-g16",
           "lm4-ch-g64", "lm2-ch-o1", "lm3-ch-pr"]


def session(model):
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_float16_directed_rounding_matches_torch_on_every_float16_neighbourhood():
    b = Builder("r")
    for direction in ("up", "down"):
        b.op("Cast", round_fp16(b, "t", direction), to=10, outputs=[direction])
    from onnx import helper

    graph = helper.make_graph(b.nodes, "round", [helper.make_tensor_value_info("t", 1, ["n"])],
                              [helper.make_tensor_value_info(n, 10, ["n"]) for n in ("up", "down")])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10))
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    every = every[torch.isfinite(every) & (every.abs() < 60000)]
    # each float16 value, and the float32 values just above and below it
    t = torch.cat([every, torch.nextafter(every, torch.tensor(np.inf)), torch.nextafter(every, torch.tensor(-np.inf))])
    up, down = sess.run(None, {"t": t.numpy()})
    assert np.array_equal(up.view(np.int16), round_to_dtype(t, torch.float16, "up").numpy().view(np.int16))
    assert np.array_equal(down.view(np.int16), round_to_dtype(t, torch.float16, "down").numpy().view(np.int16))


def e4m3_neighbourhoods() -> torch.Tensor:
    """Every finite E4M3 value, the midpoints between neighbours (the ties), and the float32 values
    just above and below each of those, within [-448, 448]: where a rounding rule can go wrong."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    every = every[torch.isfinite(every)].unique()
    mids = (every[1:] + every[:-1]) / 2
    t = torch.cat([every, mids, -0.0 * torch.ones(1)])
    t = torch.cat([t, torch.nextafter(t, torch.tensor(np.inf)), torch.nextafter(t, torch.tensor(-np.inf))])
    return t[t.abs() <= 448]


def test_e4m3_rounding_matches_torch_on_every_tie_and_neighbourhood():
    from onnx import helper

    from kvcompile.quant.floating import _e4m3_bytes

    b = Builder("e")
    b.op("Identity", _e4m3_bytes(b, "y"), outputs=["bytes"])
    graph = helper.make_graph(b.nodes, "e4m3", [helper.make_tensor_value_info("y", 1, ["n"])],
                              [helper.make_tensor_value_info("bytes", 7, ["n"])])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10))
    y = e4m3_neighbourhoods()
    (got,) = sess.run(None, {"y": y.numpy()})
    want = y.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(got, want.astype(np.int64)), y[torch.from_numpy(got != want)][:8]


@pytest.mark.parametrize("name", SCHEMES)
def test_quantize_is_bit_exact_and_dequantize_matches(name):
    scheme = get_scheme(name)
    attrs = {"scheme": name, "head_dim": 64}
    quantize, dequantize = session(KV_QUANTIZE.single_node_model(attrs)), session(KV_DEQUANTIZE.single_node_model(attrs))
    for t in (0, scheme.token_group, 3 * scheme.token_group):
        x = adversarial(t)
        parts = quantize.run(None, {"states": x.numpy()})
        assert [p.shape[2] * layout.rows_per for p, layout in
                zip(parts, __import__("kvcompile.quant.base", fromlist=["part_layout"]).part_layout(scheme, 64))] == \
            [t] * len(parts)
        if t == 0:
            continue
        expected = KV_QUANTIZE.reference(attrs, x)
        for got, want in zip(parts, expected):
            assert got.dtype == want.numpy().dtype and np.array_equal(got, want.numpy()), name
        (states,) = dequantize.run(None, {p.name: v for p, v in zip(KV_DEQUANTIZE.inputs(attrs), parts)})
        (want,) = KV_DEQUANTIZE.reference(attrs, *[torch.from_numpy(p) for p in parts])
        assert np.array_equal(states, want.numpy()), name  # -rot too: both sides run the same butterflies


CACHE_CASES = [
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2-ch", sink_tokens=4, recent_window=8, age_tiers=""),
    dict(sink_scheme="int8", recent_scheme="int4", bulk_scheme="nf4", sink_tokens=0, recent_window=0, age_tiers=""),
    dict(sink_scheme="fp16", recent_scheme="int8", bulk_scheme="int3", sink_tokens=2, recent_window=5, age_tiers=""),
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int4-ch-g64", sink_tokens=1, recent_window=3, age_tiers=""),
    # recency tiers: fp16 -> int8 -> per-channel int4 (blocks of 32) -> int2, and a tier chain without sinks
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2", sink_tokens=2, recent_window=4,
         age_tiers="int8:5,int4-ch-g32:7"),
    dict(sink_scheme="int8", recent_scheme="fp16", bulk_scheme="int2-ch-g32", sink_tokens=0, recent_window=1,
         age_tiers="int8:1,nf4:3"),
    # keys stored before RoPE: rotated back on the way in, forward on the way out, by position
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2-ch-pr", sink_tokens=4, recent_window=8, age_tiers=""),
    dict(sink_scheme="int8", recent_scheme="fp16", bulk_scheme="int2-ch-g32-pr", sink_tokens=3, recent_window=1,
         age_tiers="int8:1,int4-ch-g32-pr:3"),
]


def rope_feeds(positions: int = 256, d: int = 64) -> dict:
    """RoPE tables (base 10^4) for an op whose keys are stored before RoPE."""
    angles = np.arange(positions)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)[None]
    angles = np.concatenate([angles, angles], -1).astype(np.float32)
    return {"rope_cos": np.cos(angles), "rope_sin": np.sin(angles)}


@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: c["bulk_scheme"] + ("-tiers" if c["age_tiers"] else ""))
def test_cache_update_is_bit_exact_over_prefill_and_decode(case):
    attrs = {**case, "head_dim": 64}
    sess = session(KV_CACHE_UPDATE.single_node_model(attrs))
    inputs = [p for p in KV_CACHE_UPDATE.inputs(attrs) if p.name.startswith("past_")]
    rope = rope_feeds() if case["bulk_scheme"].endswith("-pr") else {}
    assert [p.name for p in KV_CACHE_UPDATE.inputs(attrs)][len(inputs):] == ["states", *rope]
    past = [np.zeros((2, 3, 0, int(p.shape[-1])), NP[p.dtype]) for p in inputs]
    g = torch.Generator().manual_seed(1)
    # a ragged prefill, one and several positions at a time, across window and block boundaries
    for step, n in enumerate([7, 1, 1, 5, 1, 64, 1, 3] + [1] * 40):
        x = torch.randn(2, 3, n, 64, generator=g) * 2
        want = KV_CACHE_UPDATE.reference(attrs, *[torch.from_numpy(p) for p in past], x,
                                         *[torch.from_numpy(t) for t in rope.values()])
        got = sess.run(None, {**{p.name: v for p, v in zip(inputs, past)}, "states": x.numpy(), **rope})
        for a, w in zip(got, want):
            assert a.shape == tuple(w.shape) and np.array_equal(a, w.numpy()), f"step {step}"
        past = got[:-1]
    total = 7 + 1 + 1 + 5 + 1 + 64 + 1 + 3 + 40
    assert got[-1].shape == (2, 3, total, 64)


# Ports written out by hand from the formats' definitions (head_dim 64), not read off the specs:
# int2 per-channel: 64 x 2 bits = 16 code bytes per position, fp16 scale and zero per channel per
# block of 32 positions; NF4 g16 with double quantization: 32 code bytes, one int8 scale code per
# group of 16 channels, one fp16 super-scale per position.
EXPECTED_PORTS = {
    "KVCacheUpdate": (
        {**CACHE_CASES[0], "head_dim": 64},
        [("past_sink.values", "float16", 64, 1), ("past_bulk.codes", "int8", 16, 1), ("past_bulk.scale", "float16", 64, 32),
         ("past_bulk.zero", "float16", 64, 32), ("past_recent.values", "float16", 64, 1), ("states", "float32", None, 1)],
        [("present_sink.values", "float16", 64, 1), ("present_bulk.codes", "int8", 16, 1),
         ("present_bulk.scale", "float16", 64, 32), ("present_bulk.zero", "float16", 64, 32),
         ("present_recent.values", "float16", 64, 1), ("all_states", "float32", None, 1)]),
    "KVQuantize": (
        {"scheme": "nf4", "head_dim": 64}, [("states", "float32", None, 1)],
        [("codes", "int8", 32, 1), ("scale_codes", "int8", 4, 1), ("super_scale", "float16", 1, 1)]),
    "KVDequantize": (
        {"scheme": "int4-ch-g64", "head_dim": 64},
        [("codes", "int8", 32, 1), ("scale", "float16", 64, 64), ("zero", "float16", 64, 64)],
        [("states", "float32", None, 1)]),
    # per token, groups of 32 channels: int4 32 code bytes, int8 64, each an fp16 scale and zero per group
    "KVWindowAttention": (
        {"key_scheme": "int4", "value_scheme": "int8", "window": 512, "head_dim": 64, "q_per_kv": 4, "scale": 0.125},
        [("query", "float32", None, 1), ("key", "float32", None, 1), ("value", "float32", None, 1),
         ("past_key_window.codes", "int8", 32, 1), ("past_key_window.scale", "float16", 2, 1),
         ("past_key_window.zero", "float16", 2, 1), ("past_value_window.codes", "int8", 64, 1),
         ("past_value_window.scale", "float16", 2, 1), ("past_value_window.zero", "float16", 2, 1)],
        [("output", "float32", None, 1), ("present_key_window.codes", "int8", 32, 1),
         ("present_key_window.scale", "float16", 2, 1), ("present_key_window.zero", "float16", 2, 1),
         ("present_value_window.codes", "int8", 64, 1), ("present_value_window.scale", "float16", 2, 1),
         ("present_value_window.zero", "float16", 2, 1)]),
}


def _ports(ports):
    rows = []
    for p in ports:
        width = None if p.shape[-1] == "D" else int(p.shape[-1])
        rows_per = int(p.shape[2].split("/")[1]) if "/" in p.shape[2] else 1
        rows.append((p.name, p.dtype, width, rows_per))
    return rows


@pytest.mark.parametrize("name", sorted(EXPECTED_PORTS))
def test_op_ports_match_the_formats_and_the_function_and_node_carry_them(name):
    spec = get_op(name)
    attrs, inputs, outputs = EXPECTED_PORTS[name]
    assert (_ports(spec.inputs(attrs)), _ports(spec.outputs(attrs))) == (inputs, outputs)
    proto, _ = spec.function(attrs)
    assert (proto.domain, proto.name) == ("kvcompile", name)
    assert list(proto.input) == [p[0] for p in inputs] and list(proto.output) == [p[0] for p in outputs]
    # The TensorRT parser hands a plugin the node's attributes named in its field list: they must
    # be exactly the op's attributes with the map's values (plus how the parser finds the plugin).
    node = spec.single_node_model(attrs).graph.node[0]
    node_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    found = {"plugin_namespace": b"kvcompile", "plugin_version": str(spec.version).encode()}
    assert {k: v for k, v in node_attrs.items() if k != "overload"} == \
        {**{k: v.encode() if isinstance(v, str) else v for k, v in attrs.items()}, **found}
    assert spec.plugin_fields(attrs) == attrs
    with pytest.raises(ValueError, match="expected attributes"):
        spec.check_attrs({**attrs, "extra": 1})


@pytest.mark.parametrize("scheme", ["int2-ch", "nf4", "int4-ch-g64", "int3", "fp16", "int8-ch-s32"])
def test_stored_bytes_per_position_equal_the_schemes_bit_count(scheme):
    """The ports' bytes per position (codes, scales, zero points) are the scheme's exact bits."""
    from kvcompile.ops.quantize import part_ports

    itemsize = {"float16": 2, "float32": 4, "int8": 1}
    ports = part_ports(scheme, 64)
    bits = sum(8 * itemsize[p.dtype] * int(p.shape[-1]) / r for p, (_, _, _, r) in zip(ports, _ports(ports)))
    assert bits / 64 == get_scheme(scheme).bits_per_element(64)
    assert {"int2-ch": 3.0, "nf4": 4.75, "int4-ch-g64": 4.5, "int3": 4.0, "fp16": 16.0}.get(scheme, bits / 64) == bits / 64


def test_scheme_without_lowering_is_a_clear_export_error():
    from kvcompile.quant.base import family_traits, update_traits
    from kvcompile.quant.floating import FP8Scheme

    saved = family_traits(FP8Scheme()).onnx
    update_traits(FP8Scheme, onnx=None)  # as if FP8 had no ONNX lowering (every family has one now)
    try:
        with pytest.raises(ExportError, match="fp8.*no ONNX lowering"):
            check_lowerable(get_scheme("fp8"), 64)
    finally:
        update_traits(FP8Scheme, onnx=saved)
    check_lowerable(get_scheme("fp8"), 64)
    with pytest.raises(ExportError, match="head dim 60"):
        check_lowerable(get_scheme("int3"), 60)


FAMILY_MODULE = '''
"""A storage family in one module: reference, ONNX lowering, (no) kernel."""
from dataclasses import dataclass

from kvcompile.quant.base import FamilyTraits, QuantizedTensor, StorageScheme, register_family, register_traits


@dataclass(frozen=True)
class NegatedHalfScheme(StorageScheme):
    bits: int = 16
    name: str = "neghalf"

    def bits_per_element(self, head_dim):
        return 16.0

    def quantize(self, x):
        return QuantizedTensor(self.name, tuple(x.shape), {"values": (-x).half()})

    def dequantize(self, q):
        return -q.parts["values"].float()

    def error_bound(self, q):
        return q.parts["values"].float().abs() * 2.0**-11 + 2.0**-25


register_family("neghalf", lambda n: NegatedHalfScheme() if n == "neghalf" else None, ("neghalf",))
register_traits(NegatedHalfScheme, FamilyTraits(
    onnx=(lambda b, s, x, d: [b.op("Cast", b.op("Neg", x), to=10)],
          lambda b, s, parts, d: b.op("Neg", b.op("Cast", parts[0], to=1)))))
'''


def test_a_storage_family_is_one_module(tmp_path, monkeypatch):
    """A module that registers a family and its traits is all the export and kernels need to know."""
    import importlib

    from kvcompile import kernels
    from kvcompile.quant import base

    (tmp_path / "neghalf_family.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    families, traits = dict(base._FAMILIES), dict(base._TRAITS)
    try:
        module = importlib.import_module("neghalf_family")
        attrs = {"scheme": "neghalf", "head_dim": 64}
        x = adversarial(5)
        (codes,) = session(KV_QUANTIZE.single_node_model(attrs)).run(None, {"states": x.numpy()})
        assert np.array_equal(codes, KV_QUANTIZE.reference(attrs, x)[0].numpy())
        (back,) = session(KV_DEQUANTIZE.single_node_model(attrs)).run(None, {"values": codes})
        assert np.array_equal(back, -codes.astype(np.float32))
        assert kernels.unsupported_reason(module.NegatedHalfScheme()).startswith(
            "neghalf: the NegatedHalfScheme family has no kernel yet")
    finally:
        base._FAMILIES.clear(), base._FAMILIES.update(families)
        base._TRAITS.clear(), base._TRAITS.update(traits)
        base._lookup.cache_clear()
        sys.modules.pop("neghalf_family", None)
