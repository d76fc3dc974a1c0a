"""ONNX export of the tiny Llama: logits through ONNX Runtime vs the torch reference (MixedPrecisionCache)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX path needs onnx (installed by install.sh)")
pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.errors import ArtifactError, ExportError, KvcompileError, RuntimeBackendError  # noqa: E402
from kvcompile.export import ExportedModel, export_onnx  # noqa: E402
from kvcompile.kv.precision_map import PrecisionMap  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.runtime import generate, open_decoder  # noqa: E402

# Logits of ORT and torch differ only by float32 summation order (the cache ops are bit-exact). The
# native library is built with -march=native, so how its vector sums round depends on the machine:
# the largest difference seen is 1.03e-4 (tiny Gemma, KIVI-2, on an AVX-512 machine).
LOGIT_ATOL = 2e-4


def mixed_map(geometry) -> PrecisionMap:
    """Per-head and per-layer mixed: fp16 sinks, an int8/fp16 window, per-channel and NF4 bulks."""
    base = PrecisionMap.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, "fp16",
                                sink_tokens=2, recent_window=4, model="tiny")
    bulk = {"key": (("int2-ch", "int4"), ("int3", "int2-ch")), "value": (("nf4", "int2"), ("int4-sym", "int8"))}
    pmap = base.with_bulk(bulk)
    schemes = {s: dict(v) for s, v in pmap.schemes.items()}
    schemes["value"]["recent"] = (("int8", "int8"), ("fp16", "fp16"))
    return replace(pmap, schemes=schemes, _resolved={})


def tiered_map(geometry) -> PrecisionMap:
    """Recency tiers: fp16 window -> int8 -> per-channel int4 -> int2 bulk, one head's tiers differing."""
    base = PrecisionMap.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, "int2",
                                sink_tokens=2, recent_window=4, ages=((6, "int8"), (8, "int4-ch-g8")), model="tiny")
    schemes = {s: dict(v) for s, v in base.schemes.items()}
    schemes["key"]["age1"] = (("int8", "nf4"), ("int4", "int8"))
    return replace(base, schemes=schemes, _resolved={})


@pytest.fixture(scope="module")
def maps(tiny_geometry):
    return {"fp16": resolve_map("fp16", tiny_geometry), "int8": resolve_map("int8", tiny_geometry),
            "mixed": mixed_map(tiny_geometry), "tiers": tiered_map(tiny_geometry)}


@pytest.fixture(scope="module")
def exports(tiny_lm, maps, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: export_onnx(tiny_lm, pmap, root / name, max_context=128) for name, pmap in maps.items()}


def teacher_forced(decoder, ids, prefill):
    state = decoder.start(ids.shape[0])
    logits, state = decoder.step(ids[:, :prefill], state)
    rows = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, state = decoder.step(ids[:, t:t + 1], state)
        rows.append(logits)
    return np.concatenate(rows, axis=1), state


@pytest.mark.parametrize("name", ["fp16", "int8", "mixed", "tiers"])
def test_exported_logits_match_torch_reference_on_prefill_and_40_decode_steps(name, exports, tiny_lm):
    ex = exports[name]
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(3)).numpy()
    ours, state = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=20)
    ref, ref_state = teacher_forced(open_decoder(ex, "torch", lm=tiny_lm), ids, prefill=20)
    assert ours.shape == (1, 60, 97)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_ATOL)
    # the packed cache holds exactly the bytes the torch cache holds
    assert open_decoder(ex, "ort").cache_bytes(state) == ref_state["cache"].nbytes()


@pytest.mark.parametrize("name", ["mixed", "tiers"])
def test_the_same_graph_runs_natively_and_on_stock_onnx_runtime(name, exports, tiny_lm):
    """Registered, the native library runs KVAttention; unregistered, the function bodies do."""
    ex = exports[name]
    native_decoder = open_decoder(ex, "ort", threads=1)
    portable_decoder = open_decoder(ex, "ort", threads=1, native=False)
    assert native_decoder.native_library is not None and portable_decoder.native_library is None
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(5)).numpy()  # batch 2
    ours, state = teacher_forced(native_decoder, ids, prefill=14)
    body, body_state = teacher_forced(portable_decoder, ids, prefill=14)
    np.testing.assert_allclose(ours, body, rtol=0, atol=LOGIT_ATOL)
    # layer 0's packed cache is the same bits (its inputs are); deeper layers' inputs differ by the
    # attention sums' float rounding, which can flip a code or a float16 last bit
    differing = compared = 0
    for name_, value in state["past"].items():
        if name_.startswith("past_key_values.0."):
            assert np.array_equal(value, body_state["past"][name_]), name_
        differing += int((value.view(np.uint8) != body_state["past"][name_].view(np.uint8)).sum())
        compared += value.nbytes
    assert differing / compared < 0.01


def test_greedy_generation_agrees_between_backends(exports, tiny_lm):
    ex = exports["mixed"]
    prompt = list(range(5, 17))
    ort_tokens = generate(open_decoder(ex, "ort"), prompt, 24).tokens
    torch_tokens = generate(open_decoder(ex, "torch", lm=tiny_lm), prompt, 24).tokens
    assert ort_tokens == torch_tokens and len(ort_tokens) == 24


def test_graph_carries_the_map(exports, maps):
    ex = exports["mixed"]
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["kvcompile.precision_map"]) == json.loads(json.dumps(maps["mixed"].to_json_body()))
    assert meta["kvcompile.precision_map_hash"] == maps["mixed"].content_hash()
    nodes = [n for n in model.graph.node if n.domain == "kvcompile"]
    # attention reads the packed cache: no node of the graph de-quantizes it
    assert {n.op_type for n in nodes} == {"KVAttention"}
    # one node per (layer, joint head group); its attributes are the map's schemes for those heads
    pmap = maps["mixed"]
    for g in ex.groups:
        node = next(n for n in nodes if g.ports[0].present in n.output)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for head in g.heads:
            sink, recent, bulk = pmap.triple(g.layer, head, g.stream)
            assert tuple(attrs[f"{g.stream}_{c}_scheme"].decode() for c in ("sink", "recent", "bulk")) == \
                (sink.name, recent.name, bulk.name)
        assert attrs["sink_tokens"] == 2 and attrs["recent_window"] == 4 and attrs["q_per_kv"] == 2
    assert len(nodes) == len(ex.groups) // 2
    names = [i.name for i in model.graph.input]
    assert names[0] == "input_ids" and "past_key_values.0.key.h0.bulk.codes" in names
    assert model.graph.output[0].name == "logits"
    assert {f.name for f in model.functions} == {"KVAttention"}
    assert all(f.domain == "kvcompile" for f in model.functions)
    onnx.checker.check_model(str(ex.onnx_path), full_check=True)


def test_unfused_export_updates_the_cache_per_stream_and_gives_the_same_logits(tiny_lm, maps, exports, tmp_path):
    """The TensorRT target's graph form: KVCacheUpdate per stream + standard attention, same maths."""
    ex = export_onnx(tiny_lm, maps["mixed"], tmp_path / "unfused", max_context=128, fused_attention=False)
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    assert {n.op_type for n in model.graph.node if n.domain == "kvcompile"} == {"KVCacheUpdate"}
    assert ex.targets["onnx"]["attention"] == "unfused" and exports["mixed"].targets["onnx"]["attention"] == "fused"
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4)).numpy()
    unfused, _ = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=10)
    fused, _ = teacher_forced(open_decoder(exports["mixed"], "ort", threads=1), ids, prefill=10)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=LOGIT_ATOL)


def test_full_precision_export_uses_plain_fp16_cache_names(exports):
    model = onnx.load(str(exports["fp16"].onnx_path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    assert names[1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert not [n for n in model.graph.node if n.domain == "kvcompile"]


def test_export_rejects_what_it_cannot_emit_and_leaves_nothing(tiny_lm, tiny_geometry, tmp_path):
    from kvcompile.quant.base import family_traits, update_traits
    from kvcompile.quant.floating import FP8Scheme

    target = tmp_path / "out"
    saved = family_traits(FP8Scheme()).onnx
    update_traits(FP8Scheme, onnx=None)  # as if FP8 had no ONNX lowering (every family has one now)
    try:
        with pytest.raises(ExportError, match="fp8"):
            export_onnx(tiny_lm, resolve_map("fp8", tiny_geometry), target)
    finally:
        update_traits(FP8Scheme, onnx=saved)
    assert not target.exists() and not list(tmp_path.iterdir())
    wrong = PrecisionMap.uniform(3, 2, 32, "int8")
    with pytest.raises(KvcompileError, match="layers"):
        export_onnx(tiny_lm, wrong, target)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a kvcompile export directory"):
        export_onnx(tiny_lm, resolve_map("int8", tiny_geometry), tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_reexport_replaces_an_export_atomically(tiny_lm, tiny_geometry, tmp_path):
    first = export_onnx(tiny_lm, resolve_map("int8", tiny_geometry), tmp_path / "e", max_context=64)
    second = export_onnx(tiny_lm, resolve_map("int4", tiny_geometry), tmp_path / "e", max_context=64)
    assert first.path == second.path and second.pmap.scheme(0, 0, "key", "bulk").name == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_decoders_follow_the_runner_lifecycle(exports, tiny_lm, backend):
    """activate / deactivate (also as a with block); stepping an inactive decoder is one line, and
    both backends give the same logits through the shared interface."""
    ex = exports["mixed"]
    options = {"lm": tiny_lm} if backend == "torch" else {"threads": 1}
    ids = np.arange(1, 9, dtype=np.int64)[None]
    with open_decoder(ex, backend, **options) as decoder:
        assert decoder.is_active
        logits, _ = decoder.step(ids, decoder.start(1))
    assert not decoder.is_active
    with pytest.raises(RuntimeBackendError, match=f"the {re.escape(decoder.name)} decoder is not active; call activate"):
        decoder.step(ids, decoder.start(1))
    again, _ = decoder.activate().step(ids, decoder.start(1))
    np.testing.assert_array_equal(logits, again)
    other = open_decoder(ex, "torch" if backend == "ort" else "ort", **({"threads": 1} if backend == "torch" else
                                                                        {"lm": tiny_lm}))
    np.testing.assert_allclose(other.step(ids, other.start(1))[0], logits, atol=2e-3)


def test_runtime_errors_are_one_line(exports, tmp_path):
    ex = exports["int8"]
    decoder = open_decoder(ex, "ort")
    state = decoder.start(1)
    with pytest.raises(RuntimeBackendError, match="exceeds the export's max_context of 128"):
        decoder.step(np.zeros((1, 129), np.int64), state)
    with pytest.raises(RuntimeBackendError, match="tokens >= 1"):
        decoder.step(np.zeros((1, 0), np.int64), state)
    _, state = decoder.step(np.ones((1, 4), np.int64), state)
    for name, value in state["past"].items():  # NaN in the cache
        if value.dtype == np.float16:
            value[...] = np.nan
    with pytest.raises(RuntimeBackendError, match="NaN"):
        decoder.step(np.ones((1, 1), np.int64), state)
    with pytest.raises(RuntimeBackendError, match="unknown backend 'tensorflow'"):
        open_decoder(ex, "tensorflow")
    with pytest.raises(RuntimeBackendError, match="prompt is empty"):
        generate(decoder, [], 3)
    with pytest.raises(ExportError, match="not a kvcompile export directory"):
        ExportedModel.load(tmp_path)
    (tmp_path / "kvcompile_export.json").write_text('{"artifact": "onnx_export", "format_version": 99}')
    with pytest.raises(ArtifactError, match="format_version 99"):
        ExportedModel.load(tmp_path)


@pytest.mark.parametrize("name", ["mixed", "tiers"])
def test_validate_passes_on_a_faithful_export_and_fails_against_another_map(exports, tiny_lm, tiny_geometry, name):
    from dataclasses import replace as dc_replace

    from kvcompile.validate.compare import validate_export

    ex = exports[name]
    kwargs = dict(lm=tiny_lm, window=48, prefill=8, max_windows=1, progress=False, write_polygraphy=False)
    good = validate_export(ex, **kwargs)
    assert good.passed and good.max_abs_error < LOGIT_ATOL and good.top1_vs_reference == 1.0
    assert good.tokens_scored == 47 and good.ppl > 0 and good.ppl_reference > 0
    assert good.runner == "onnxruntime+native"  # the native library, registered by default
    portable = validate_export(ex, native=False, **kwargs)
    assert portable.passed and portable.runner == "onnxruntime"
    # the graph still holds the mixed map, but the reference now decodes with int2 everywhere
    wrong = validate_export(dc_replace(ex, pmap=resolve_map("int2", tiny_geometry)), **kwargs)
    assert not wrong.passed and wrong.max_abs_error > 100 * LOGIT_ATOL


def _pbtxt_tensors(text: str, section: str) -> list[dict]:
    """The ``{ name: ... data_type: ... dims: [...] }`` entries of one section of a config.pbtxt."""
    import re

    body = re.search(rf"^{section} \[\n(.*?)\n\]$", text, re.M | re.S)
    assert body, f"no {section} section"
    entries = re.findall(r'\{ name: "([^"]+)" data_type: (TYPE_[A-Z0-9]+) dims: \[ ([^\]]*) \] \}', body[1])
    assert len(entries) == body[1].count("{"), "an entry does not parse"
    return [{"name": n, "data_type": t, "dims": [int(d) for d in dims.split(", ")]} for n, t, dims in entries]


@pytest.mark.parametrize("name", ["fp16", "mixed", "tiers"])
def test_triton_config_matches_the_graph_field_by_field(exports, name):
    """Every graph input and output appears in config.pbtxt with its name, type and dims, in order."""
    triton_types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT64: "TYPE_INT64"}
    ex = exports[name]
    graph = onnx.load(str(ex.onnx_path), load_external_data=False).graph
    text = (ex.path / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 0" in text

    def expected(values):
        return [{"name": v.name, "data_type": triton_types[v.type.tensor_type.elem_type],
                 "dims": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]}
                for v in values]

    assert _pbtxt_tensors(text, "input") == expected(graph.input)
    assert _pbtxt_tensors(text, "output") == expected(graph.output)


def _copy_export(ex, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(ex.path, target)
    return target


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(max_context=True), "field 'max_context' must be a int"),
    (lambda d: d.update(max_context=10**12), "max_context and vocab_size must be positive"),
    (lambda d: d.pop("cache_layout"), "field 'cache_layout' must be a list"),
    (lambda d: d["cache_layout"][0]["ports"][0].update(width=7), "cache_layout is not the layout of its precision map"),
    (lambda d: d["cache_layout"].reverse(), "cache_layout is not the layout of its precision map"),
    (lambda d: d["precision_map"].update(recent_window=5), "does not match its precision_map_hash"),
    (lambda d: d["precision_map"].update(num_layers=3), "layers"),
    (lambda d: d["geometry"].pop("head_dim"), "geometry must hold exactly"),
    (lambda d: d["geometry"].update(max_positions=64), "max_context 128 exceeds the model's 64 positions"),
    (lambda d: d.update(vocab_size=98), "another map, context or vocabulary"),
    (lambda d: d["files"]["sizes"].update({"model.onnx.data": 1}), "model.onnx.data has .* bytes, the export recorded 1"),
    (lambda d: d["files"].update(model_sha256="0" * 64), "not the graph the export wrote"),
    (lambda d: d.pop("files"), "'files' must record"),
    (lambda d: d.pop("targets"), "'targets' must be an object with at least the 'onnx' section"),
    (lambda d: d["targets"]["onnx"].pop("files"), "targets.onnx must be an object with a 'files' object"),
    (lambda d: d["targets"]["onnx"]["files"].update({"config.pbtxt": 3}), "config.pbtxt has .* bytes, the onnx target "
                                                                          "recorded 3"),
    (lambda d: d["targets"].update(trt={"files": {"model.engine": 10}}), "model.engine of target 'trt' is missing"),
    (lambda d: d["targets"].update(trt={"files": {"../model.onnx": 10}}), "must map relative file paths"),
])
def test_a_manifest_inconsistent_with_its_map_layout_or_files_is_refused(exports, tmp_path, mutate, message):
    path = _copy_export(exports["mixed"], tmp_path)
    doc = json.loads((path / "kvcompile_export.json").read_text())
    mutate(doc)
    (path / "kvcompile_export.json").write_text(json.dumps(doc))
    with pytest.raises(KvcompileError, match=message) as info:
        ExportedModel.load(path)
    assert "\n" not in str(info.value)


def test_missing_truncated_or_foreign_files_are_refused(exports, tmp_path):
    path = _copy_export(exports["mixed"], tmp_path)
    data = path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ExportError, match="truncated or was replaced"):
        ExportedModel.load(path)
    data.unlink()
    with pytest.raises(ExportError, match="model.onnx.data is missing"):
        ExportedModel.load(path)
    # a graph of another map under this manifest: same file sizes recorded for the other export
    other = _copy_export(exports["int8"], tmp_path / "o")
    path = _copy_export(exports["mixed"], tmp_path / "m")
    for name in ("model.onnx", "model.onnx.data"):
        (path / name).write_bytes((other / name).read_bytes())
    import hashlib

    def rerecord():  # the manifest recording the replaced files, so only the graph check can catch it
        doc = json.loads((path / "kvcompile_export.json").read_text())
        doc["files"]["sizes"] = {n: (path / n).stat().st_size for n in doc["files"]["sizes"]}
        doc["files"]["model_sha256"] = hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
        (path / "kvcompile_export.json").write_text(json.dumps(doc))

    rerecord()
    with pytest.raises(ExportError, match="cache inputs/outputs do not match"):
        ExportedModel.load(path)
    (path / "model.onnx").write_bytes(b"not a protobuf \xff\xff\xff")
    rerecord()
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        ExportedModel.load(path)


@pytest.mark.parametrize("fault", ["window_off_by_one", "dropped_sink", "swapped_head_groups", "wrong_scale"])
def test_validate_fails_each_injected_fault_on_the_test_model(exports, maps, tiny_lm, tmp_path, fault):
    """The packed cache is compared with the reference's after every step: a graph that stores other
    segments than its map says fails on shapes, a wrong scale on the stored values."""
    from kvcompile.validate import faults
    from kvcompile.validate.compare import validate_export

    kwargs = dict(lm=tiny_lm, window=60, prefill=20, max_windows=1, progress=False, write_polygraphy=False, threads=1)
    good = validate_export(exports["mixed"], **kwargs)
    assert good.passed and good.cache_checked and good.cache_mismatched_tensors == 0
    if fault == "wrong_scale":
        with faults.wrong_scale_lowering(1.05):
            broken = export_onnx(tiny_lm, maps["mixed"], tmp_path / "e", max_context=128)
    else:
        broken = replace(exports["mixed"], pmap=faults.claimed_map(maps["mixed"], fault))
    # wrong_scale is a fault of the ONNX lowering: only the function bodies run it
    bad = validate_export(broken, **kwargs, native=False if fault == "wrong_scale" else None)
    assert not bad.passed
    if fault == "wrong_scale":
        assert bad.cache_differing_fraction > 100 * max(good.cache_differing_fraction, 1e-4)
    else:
        assert bad.cache_mismatched_tensors > 0


def _portable_groups_match_torch(ex, lm, portable: int, native: int) -> None:
    """The export has ``portable`` KVAttentionPortable and ``native`` KVAttention nodes, and ONNX
    Runtime's teacher-forced logits match the torch cache's."""
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node if n.domain == "kvcompile"]
    assert ops.count("KVAttentionPortable") == portable and ops.count("KVAttention") == native
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(6)).numpy()
    ours, _ = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=8)
    ref, _ = teacher_forced(open_decoder(ex, "torch", lm=lm), ids, prefill=8)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_ATOL)


def test_keys_stored_before_rope_export_and_match_the_torch_cache(tiny_lm, tiny_geometry, tmp_path):
    """Pre-RoPE key formats (bulk and a per-channel age tier) run in the KVAttention function body,
    which rotates by position with the graph's RoPE tables; fused and unfused graphs agree with torch."""
    base = tiered_map(tiny_geometry)
    schemes = {s: dict(v) for s, v in base.schemes.items()}
    schemes["key"]["age2"] = (("int4-ch-g8-pr", "int4-ch-g8"), ("int4-ch-g8-pr", "int4-ch-g8-pr"))
    schemes["key"]["bulk"] = (("int2-ch-g8-pr", "int2"), ("int2-ch-g4-pr", "int3-ch-g8-pr"))
    pmap = replace(base, schemes=schemes, _resolved={})
    ex = export_onnx(tiny_lm, pmap, tmp_path / "fused", max_context=64)
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    fed = [n for n in model.graph.node if n.op_type == "KVAttentionPortable"]
    assert len(fed) == 3 and all(n.input[-2:] == ["rope.cos", "rope.sin"] for n in fed)
    _portable_groups_match_torch(ex, tiny_lm, portable=3, native=1)
    unfused = export_onnx(tiny_lm, pmap, tmp_path / "unfused", max_context=64, fused_attention=False)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(6)).numpy()
    a, _ = teacher_forced(open_decoder(unfused, "ort", threads=1), ids, prefill=8)
    b, _ = teacher_forced(open_decoder(ex, "ort", threads=1), ids, prefill=8)
    np.testing.assert_allclose(a, b, rtol=0, atol=LOGIT_ATOL)


def test_a_format_the_native_library_lacks_falls_back_to_the_function_body(tiny_lm, tiny_geometry, tmp_path, caplog):
    """A head group whose format has no native descriptor is emitted as KVAttentionPortable (one
    notice line at export); the library runs the other groups, the body runs that one."""
    from kvcompile.quant.base import family_traits, update_traits
    from kvcompile.quant.nf4 import NF4Scheme

    base = resolve_map("int4", tiny_geometry)
    schemes = {s: dict(v) for s, v in base.schemes.items()}
    schemes["value"]["bulk"] = (("nf4", "int4"), ("int4", "int4"))  # layer 0, kv head 0: NF4 values
    pmap = replace(base, schemes=schemes, _resolved={})
    saved = family_traits(NF4Scheme()).native
    assert saved is not None
    update_traits(NF4Scheme, native=None)  # as if the library could not read NF4
    try:
        with caplog.at_level("WARNING", logger="kvcompile"):
            ex = export_onnx(tiny_lm, pmap, tmp_path / "e", max_context=64)
    finally:
        update_traits(NF4Scheme, native=saved)
    notices = [r.getMessage() for r in caplog.records if "native library cannot read" in r.getMessage()]
    assert len(notices) == 1 and "nf4" in notices[0] and "\n" not in notices[0]
    _portable_groups_match_torch(ex, tiny_lm, portable=1, native=2)


def test_a_lloyd_max_map_runs_natively_and_an_unknown_group_through_the_function_body(tiny_lm, tiny_geometry,
                                                                                      tmp_path):
    """Lloyd-Max formats with a codebook in the native library (groups 16-128) run in KVAttention
    nodes; a group size it has no codebook for (8) is a KVAttentionPortable node; ONNX Runtime's
    logits match the torch cache's."""
    base = resolve_map("int4", tiny_geometry)
    schemes = {s: dict(v) for s, v in base.schemes.items()}
    schemes["key"]["bulk"] = (("lm3-rot", "int4"), ("lm4-rot", "lm4-rot"))
    schemes["value"]["bulk"] = (("lm2-g8", "int4"), ("lm2-rot", "lm2-rot"))
    pmap = replace(base, schemes=schemes, _resolved={})
    ex = export_onnx(tiny_lm, pmap, tmp_path / "e", max_context=64)
    _portable_groups_match_torch(ex, tiny_lm, portable=1, native=2)
