"""kvcompile ops: the ONNX function bodies (run by ONNX Runtime) against their torch references.

Quantize / cache-update outputs must be *bit-identical* to the references; that is what lets
an exported graph and MixedPrecisionCache hold the same cache.
"""

from __future__ import annotations

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
           "int8-ch-s32", "nf4", "nf4-g32", "nf4-nodq", "int4-rot", "int2-rot"]


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
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2-ch", sink_tokens=4, recent_window=8),
    dict(sink_scheme="int8", recent_scheme="int4", bulk_scheme="nf4", sink_tokens=0, recent_window=0),
    dict(sink_scheme="fp16", recent_scheme="int8", bulk_scheme="int3", sink_tokens=2, recent_window=5),
    dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int4-ch-g64", sink_tokens=1, recent_window=3),
]


@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: c["bulk_scheme"])
def test_cache_update_is_bit_exact_over_prefill_and_decode(case):
    attrs = {**case, "head_dim": 64}
    sess = session(KV_CACHE_UPDATE.single_node_model(attrs))
    inputs = KV_CACHE_UPDATE.inputs(attrs)
    past = [np.zeros((2, 3, 0, int(p.shape[-1])), NP[p.dtype]) for p in inputs[:-1]]
    g = torch.Generator().manual_seed(1)
    # a ragged prefill, one and several positions at a time, across window and block boundaries
    for step, n in enumerate([7, 1, 1, 5, 1, 64, 1, 3] + [1] * 40):
        x = torch.randn(2, 3, n, 64, generator=g) * 2
        want = KV_CACHE_UPDATE.reference(attrs, *[torch.from_numpy(p) for p in past], x)
        got = sess.run(None, {**{p.name: v for p, v in zip(inputs[:-1], past)}, "states": x.numpy()})
        for a, w in zip(got, want):
            assert a.shape == tuple(w.shape) and np.array_equal(a, w.numpy()), f"step {step}"
        past = got[:-1]
    total = 7 + 1 + 1 + 5 + 1 + 64 + 1 + 3 + 40
    assert got[-1].shape == (2, 3, total, 64)


def test_every_op_spec_is_consistent():
    assert set(op_names()) == {"KVQuantize", "KVDequantize", "KVCacheUpdate"}
    attrs = {"KVQuantize": {"scheme": "int4-ch", "head_dim": 64}, "KVDequantize": {"scheme": "nf4", "head_dim": 64},
             "KVCacheUpdate": {**CACHE_CASES[0], "head_dim": 64}}
    for name in op_names():
        spec = get_op(name)
        a = attrs[name]
        proto, _ = spec.function(a)
        assert proto.domain == "kvcompile" and proto.name == name and proto.overload == spec.overload(a)
        assert list(proto.input) == [p.name for p in spec.inputs(a)]
        assert list(proto.output) == [p.name for p in spec.outputs(a)]
        assert spec.plugin_fields(a) == a
        with pytest.raises(ValueError):
            spec.check_attrs({**a, "extra": 1})


def test_scheme_without_lowering_is_a_clear_export_error():
    with pytest.raises(ExportError, match="fp8.*no ONNX lowering"):
        check_lowerable(get_scheme("fp8"), 64)
    with pytest.raises(ExportError, match="head dim 60"):
        check_lowerable(get_scheme("int3"), 60)
