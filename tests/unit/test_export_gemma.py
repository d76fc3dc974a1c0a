"""ONNX export of a second architecture (a tiny random Gemma 3): q/k norms, post norms, GELU-tanh,
scaled embeddings, two RoPE tables, and sliding-window layers whose exported cache evicts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX path needs onnx (installed by install.sh)")
pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.errors import ArtifactError  # noqa: E402
from kvcompile.export import ExportedModel, export_onnx  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.runtime import open_decoder  # noqa: E402

from tests.unit.test_export import LOGIT_ATOL, teacher_forced  # noqa: E402


def _maps(geometry):
    """fp16 everywhere; int4 (window layers int4 throughout); KIVI-2 with sinks (window layers: fp16 keys, int2 values)."""
    return {"fp16": resolve_map("fp16", geometry), "int4": resolve_map("int4", geometry),
            "kivi-2": resolve_map("kivi-2", geometry, sink_tokens=2)}


@pytest.fixture(scope="module")
def gemma_exports(tiny_gemma_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma_exports")
    return {name: export_onnx(tiny_gemma_lm, pmap, root / name, max_context=64)
            for name, pmap in _maps(tiny_gemma_lm.geometry).items()}


@pytest.mark.parametrize("native", [True, False], ids=["native", "function bodies"])
@pytest.mark.parametrize("name", ["fp16", "int4", "kivi-2"])
def test_gemma_export_matches_the_torch_cache_past_the_window(name, native, gemma_exports, tiny_gemma_lm):
    """Prefill 11 then 19 decode steps: the window layers (W = 8) evict, and ORT (the native
    KVAttention / KVWindowAttention kernels, or the ops' function bodies) agrees with the torch cache
    on every logit; the exported window caches hold the last W - 1 positions."""
    ex = gemma_exports[name]
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4)).numpy()
    ours, state = teacher_forced(open_decoder(ex, "ort", threads=1, native=native), ids, prefill=11)
    ref, ref_state = teacher_forced(open_decoder(ex, "torch", lm=tiny_gemma_lm), ids, prefill=11)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_ATOL)
    for g in ex.groups:
        rows = {state["past"][p.past].shape[2] for p in g.ports}
        if g.window:
            assert rows == {7}, (g.layer, rows)
        elif g.plain:
            assert rows == {30}, (g.layer, rows)
    assert open_decoder(ex, "ort").cache_bytes(state) == ref_state["cache"].nbytes()


def test_gemma_fp16_export_agrees_with_transformers(gemma_exports, tiny_gemma_lm):
    """With an fp16 cache the graph is transformers' model: one prefill of 30 tokens (past the window)."""
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tiny_gemma_lm.model(ids, use_cache=False).logits.numpy()
    ours, _ = teacher_forced(open_decoder(gemma_exports["fp16"], "ort", threads=1), ids.numpy(), prefill=30)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-3)  # fp16 storage of K/V


def test_gemma_window_layers_attend_through_their_op_and_own_ports(gemma_exports, tiny_gemma_lm, tmp_path):
    ex = gemma_exports["int4"]
    window = [g for g in ex.groups if g.window]
    assert {g.layer for g in window} == {0, 2} and all(g.window == 8 for g in window)
    assert [p.past for p in window[0].ports] == ["past_key_values.0.key.window.codes", "past_key_values.0.key.window.scale",
                                                 "past_key_values.0.key.window.zero"][:len(window[0].ports)]
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "Gelu" in ops and not {"KVQuantize", "KVDequantize", "KVCacheUpdate"} & set(ops)
    assert ops.count("KVWindowAttention") == 2 and ops.count("KVAttention") == 1
    writers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert {writers[p.present] for g in window for p in g.ports} == {"KVWindowAttention"}
    assert ex.targets["onnx"]["window_attention"] == "fused"
    # without the op (TensorRT's form): the window caches append and read through the KVQuantize /
    # KVDequantize bodies, inlined, and the present windows are Slices
    inlined = export_onnx(tiny_gemma_lm, _maps(tiny_gemma_lm.geometry)["int4"], tmp_path / "inlined", max_context=64,
                          window_attention=False)
    model = onnx.load(str(inlined.onnx_path), load_external_data=False)
    assert "KVWindowAttention" not in {n.op_type for n in model.graph.node}
    writers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert {writers[p.present] for g in inlined.groups if g.window for p in g.ports} == {"Slice"}
    assert inlined.targets["onnx"]["window_attention"] == "standard ops"
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(6)).numpy()
    a, _ = teacher_forced(open_decoder(inlined, "ort", threads=1), ids, prefill=9)
    b, _ = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=9)
    np.testing.assert_allclose(a, b, rtol=0, atol=LOGIT_ATOL)
    assert ex.geometry["layer_windows"] == [8, 0, 8]
    dims = {i.name: i.type.tensor_type.shape.dim[2].dim_param for i in model.graph.input[1:]}
    assert {dims[p.past] for g in ex.groups for p in g.ports} == {"past_window_sequence", "past_sequence"}
    assert all(dims[p.past] == ("past_window_sequence" if g.window else "past_sequence") for g in ex.groups for p in g.ports)


def test_a_map_without_the_models_windows_is_refused(tiny_gemma_lm, tmp_path):
    pmap = replace(resolve_map("int4", tiny_gemma_lm.geometry), layer_windows=(), _resolved={})
    with pytest.raises(ArtifactError, match="sliding windows none, the model \\[8, 0, 8\\]"):
        export_onnx(tiny_gemma_lm, pmap, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gemma_export_reloads_and_checks_its_windows(gemma_exports, tmp_path):
    import json
    import shutil

    ex = gemma_exports["int4"]
    assert ExportedModel.load(ex.path).pmap.layer_windows == (8, 0, 8)
    copy = tmp_path / "copy"
    shutil.copytree(ex.path, copy)
    doc = json.loads((copy / "kvcompile_export.json").read_text())
    doc["geometry"]["layer_windows"] = [8, 0, 0]
    (copy / "kvcompile_export.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="sliding windows"):
        ExportedModel.load(copy)


def window_mixed_map(geometry):
    """Window layers with different per-token schemes per layer and stream (several quantizer bodies in one graph)."""
    base = resolve_map("int4", geometry, sink_tokens=2)
    schemes = {st: {c: [list(r) for r in grid] for c, grid in v.items()} for st, v in base.schemes.items()}
    for c in base.classes:
        schemes["key"][c][0] = ["int8", "int8"]
        schemes["value"][c][2] = ["fp16", "int2"]
    schemes["key"]["bulk"][1] = ["int2-ch", "int4"]
    return replace(base, schemes={st: {c: tuple(map(tuple, g)) for c, g in v.items()} for st, v in schemes.items()},
                   _resolved={})


def test_gemma_export_with_mixed_window_schemes_matches_torch(tiny_gemma_lm, tmp_path):
    ex = export_onnx(tiny_gemma_lm, window_mixed_map(tiny_gemma_lm.geometry), tmp_path / "mixed", max_context=64)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(8)).numpy()
    ours, _ = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=5)
    ref, _ = teacher_forced(open_decoder(ex, "torch", lm=tiny_gemma_lm), ids, prefill=5)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_ATOL)


def test_gemma_engine_builds_with_window_caches(tiny_gemma_lm, tmp_path):
    """TensorRT-RTX on CPU: the full-attention layer's KVAttention and the window layers' packed
    groups' KVWindowAttention (several schemes) from the compiled library, fp16 window groups in
    standard layers; every window port is engine I/O."""
    import json

    from kvcompile.targets.trt.build import export_trt, tensorrt_flavour

    if tensorrt_flavour() is None:
        pytest.skip("TensorRT (tensorrt-rtx) is not installed; install.sh installs it")
    ex = export_trt(tiny_gemma_lm, window_mixed_map(tiny_gemma_lm.geometry), tmp_path / "engine", max_context=64)
    report = json.loads((ex.path / "engine_report.json").read_text())
    layers = report["plugin_layers"]
    assert report["plugins"] == "compiled" and report["creators"] == ["KVAttention:CPP", "KVWindowAttention:CPP"]
    graph = onnx.load(str(ex.onnx_path), load_external_data=False).graph
    nodes = sorted(n.op_type for n in graph.node if n.domain == "kvcompile")
    assert sorted(p["plugin"] for p in layers) == nodes
    # layer 1: two joint head groups; layers 0 and 2: their packed (not all-fp16) joint groups
    packed_window = [g for g in ex.groups if g.window and not g.plain and g.stream == "key"]
    assert nodes.count("KVAttention") == 2 and nodes.count("KVWindowAttention") == len(packed_window) >= 2
    windows = [p for p in layers if p["plugin"] == "KVWindowAttention"]
    assert {p["fields"]["window"] for p in windows} == {8}
    assert {(p["fields"]["key_scheme"], p["fields"]["value_scheme"]) for p in windows} == \
        {(g.bulk_scheme, next(v for v in ex.groups if v.stream == "value" and (v.layer, v.heads) == (g.layer, g.heads))
          .bulk_scheme) for g in packed_window}
    io = {t["name"] for t in report["io"]}
    assert {p.present for g in ex.groups if g.window for p in g.ports} <= io
    assert any(".window." in name for name in io)


@pytest.mark.parametrize("name", ["int4", "kivi-2"])
def test_validate_compares_the_window_caches_step_by_step(gemma_exports, tiny_gemma_lm, name):
    """validate runs export and torch cache in lockstep and compares every stored tensor, window
    layers included (their last W - 1 rows); a reference decoding with another map fails."""
    from dataclasses import replace as dc_replace

    from kvcompile.validate.compare import validate_export

    ex = gemma_exports[name]
    kwargs = dict(lm=tiny_gemma_lm, window=40, prefill=6, max_windows=1, progress=False, write_polygraphy=False)
    good = validate_export(ex, **kwargs)
    assert good.passed and good.max_abs_error < LOGIT_ATOL and good.tokens_scored == 39
    wrong = validate_export(dc_replace(ex, pmap=resolve_map("int2", tiny_gemma_lm.geometry)), **kwargs)
    assert not wrong.passed
