"""TensorRT target: engines built on CPU with TensorRT-RTX, plugins inspected; plugin logic on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export path needs onnx (installed by install.sh)")

from kvcompile.errors import ExportError, RuntimeBackendError  # noqa: E402
from kvcompile.export import export_onnx  # noqa: E402
from kvcompile.ops import KV_ATTENTION, KV_CACHE_UPDATE  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.targets.trt.build import build_engine, export_trt, tensorrt_flavour  # noqa: E402
from kvcompile.targets.trt.library import require_library  # noqa: E402
from kvcompile.targets.trt.plugin import output_shape_exprs, run_op  # noqa: E402

from .test_export import mixed_map  # noqa: E402

needs_trt = pytest.mark.skipif(tensorrt_flavour() is None, reason="TensorRT (tensorrt-rtx) is not installed; "
                               "install.sh installs it")


@pytest.fixture(scope="module")
def engine_export(tiny_lm, tiny_geometry, tmp_path_factory):
    if tensorrt_flavour() is None:
        pytest.skip("TensorRT (tensorrt-rtx) is not installed; install.sh installs it")
    return export_trt(tiny_lm, mixed_map(tiny_geometry), tmp_path_factory.mktemp("trt") / "engine", max_context=128)


@needs_trt
def test_engine_is_built_with_the_compiled_library_one_layer_per_joint_group(engine_export):
    """The default build: KVAttention layers from libkvcompile_trt.so (no Python plugin in the
    build process), for the GPUs the library has cubins for, with the library inside the plan."""
    import json

    from kvcompile.kv.grouping import joint_groups
    from kvcompile.ops.attention import attention_attrs

    ex = engine_export
    report = json.loads((ex.path / "engine_report.json").read_text())
    assert report["plugins"] == "compiled" and report["creators"] == ["KVAttention:CPP", "KVWindowAttention:CPP"]
    assert report["compute_capabilities"] == [80, 86, 89, 120]
    assert report["engine_contains_plugin_library"] and report["engine_contains_plugin_fields"]
    library = (ex.path / "libkvcompile_trt.so").read_bytes()
    assert library == require_library().read_bytes() and library in (ex.path / "model.engine").read_bytes()
    joint = [heads for layer in range(ex.pmap.num_layers) for heads in joint_groups(ex.pmap, layer)]
    assert len(report["plugin_layers"]) == len(joint) == 4  # 2 layers x 2 joint head groups
    by_output = {p["outputs"][1]: p for p in report["plugin_layers"]}
    for key in (g for g in ex.groups if g.stream == "key"):
        layer = by_output[key.ports[0].present]
        value = next(g for g in ex.groups if g.stream == "value" and (g.layer, g.heads) == (key.layer, key.heads))
        assert (layer["plugin"], layer["namespace"], layer["version"]) == ("KVAttention", "kvcompile",
                                                                           str(KV_ATTENTION.version))
        want = attention_attrs(key.op_attrs(ex.pmap), value.op_attrs(ex.pmap), layer["fields"]["q_per_kv"],
                               layer["fields"]["scale"])
        assert layer["fields"] == want
    graph = onnx.load(str(ex.onnx_path), load_external_data=False).graph
    io = {t["name"]: t["io"] for t in report["io"]}
    assert io == {**{i.name: "input" for i in graph.input}, **{o.name: "output" for o in graph.output}}
    assert (ex.path / "model.engine").stat().st_size == report["engine_bytes"] > 0
    assert ex.trt["plugin_layers"] == 4 and ex.trt["plugins"] == "compiled"


@needs_trt
def test_the_export_writes_a_triton_repository_and_a_trtexec_command(engine_export):
    ex = engine_export
    repo = ex.path / ex.trt["triton_repository"] / "tiny-llama"
    plan = repo / "1" / "model.plan"
    assert plan.samefile(ex.path / "model.engine")  # a hard link, not a copy
    config = (repo / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config
    graph = onnx.load(str(ex.onnx_path), load_external_data=False).graph
    for tensor in [*graph.input, *graph.output]:
        assert f'name: "{tensor.name}"' in config
    script = (ex.path / ex.trt["trtexec"]).read_text()
    assert "--loadEngine=model.engine --dynamicPlugins=./libkvcompile_trt.so" in script
    shapes = dict(item.split(":") for item in script.split("--shapes=")[1].split()[0].split(","))
    assert set(shapes) == {i.name for i in graph.input} and shapes["input_ids"] == "1x128"
    assert (ex.path / "trtexec_input_ids.bin").stat().st_size == 128 * 8
    for name in ["libkvcompile_trt.so", "trtexec.sh", "triton/tiny-llama/1/model.plan"]:
        assert ex.trt["files"][name] == (ex.path / name).stat().st_size


@needs_trt
def test_the_python_plugins_remain_a_fallback_for_the_unfused_graph(tiny_lm, tiny_geometry, tmp_path):
    import json

    ex = export_trt(tiny_lm, mixed_map(tiny_geometry), tmp_path / "py", max_context=64, plugins="python")
    report = json.loads((ex.path / "engine_report.json").read_text())
    packed = [g for g in ex.groups if not g.plain]
    assert report["plugins"] == "python" and not report["engine_contains_plugin_library"]
    assert "KVCacheUpdate:PYTHON" in report["creators"] and all(c.endswith(":PYTHON") for c in report["creators"])
    assert len(report["plugin_layers"]) == len(packed) == 8  # 2 layers x 2 streams x 2 head groups
    by_output = {p["outputs"][0]: p for p in report["plugin_layers"]}
    for g in packed:
        layer = by_output[g.ports[0].present]
        assert (layer["plugin"], layer["namespace"], layer["version"]) == ("KVCacheUpdate", "kvcompile", "1")
        assert layer["fields"] == g.op_attrs(ex.pmap)
    assert "triton_repository" not in ex.trt and not (ex.path / "libkvcompile_trt.so").exists()


@needs_trt
def test_each_plugin_kind_refuses_the_graph_it_cannot_build(tiny_lm, tiny_geometry, tmp_path):
    fused = export_onnx(tiny_lm, resolve_map("int4", tiny_geometry), tmp_path / "f", max_context=64)
    with pytest.raises(ExportError, match="KVAttention nodes, which the Python plugins do not implement"):
        build_engine(fused.path, plugins="python")
    with pytest.raises(ExportError, match="unknown plugin kind 'nonsense'"):
        build_engine(fused.path, plugins="nonsense")
    unfused = export_onnx(tiny_lm, resolve_map("int4", tiny_geometry), tmp_path / "u", max_context=64,
                          fused_attention=False)
    with pytest.raises(ExportError, match="KVCacheUpdate nodes, which the compiled plugin library does not"):
        build_engine(unfused.path)
    assert not (fused.path / "model.engine").exists() and not (unfused.path / "model.engine").exists()


@needs_trt
def test_a_mismatched_plugin_is_a_clear_error(tiny_lm, tiny_geometry, tmp_path):
    ex = export_onnx(tiny_lm, resolve_map("int4", tiny_geometry), tmp_path / "e", max_context=64)
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    node = next(n for n in model.graph.node if n.domain == "kvcompile")
    for a in node.attribute:
        if a.name == "plugin_version":
            a.s = b"9"
    onnx.save(model, str(ex.onnx_path))  # external data stays where it is
    with pytest.raises(ExportError, match="mapped 1 of the graph's 2 kvcompile nodes"):
        build_engine(ex.path)
    assert not (ex.path / "model.engine").exists()


@needs_trt
def test_a_missing_plugin_library_is_one_line_and_writes_nothing(tiny_lm, tiny_geometry, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_TRT_PLUGIN_LIBRARY", str(tmp_path / "gone.so"))
    with pytest.raises(ExportError, match="gone.so .*does not exist"):
        export_trt(tiny_lm, resolve_map("int4", tiny_geometry), tmp_path / "x", max_context=64)
    assert not (tmp_path / "x").exists()


@needs_trt
def test_trt_backend_says_why_it_cannot_run(engine_export, tiny_lm):
    from kvcompile.runtime import open_decoder

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this test covers machines without one")
    with pytest.raises(RuntimeBackendError, match="needs an NVIDIA GPU"):
        open_decoder(engine_export, "trt")


class _Expr:
    """A stand-in for TensorRT's IExprBuilder that evaluates dimension expressions to integers."""

    ops = {"SUM": lambda a, b: a + b, "SUB": lambda a, b: a - b, "PROD": lambda a, b: a * b, "MIN": min, "MAX": max,
           "FLOOR_DIV": lambda a, b: a // b, "CEIL_DIV": lambda a, b: -(-a // b)}

    def constant(self, v):
        return v

    def operation(self, kind, a, b):
        return self.ops[kind](a, b)


FAKE_TRT = SimpleNamespace(DimensionOperation=SimpleNamespace(**{k: k for k in _Expr.ops}),
                           DimsExprs=lambda n: [None] * n)


@pytest.mark.parametrize("case", [dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2-ch", sink_tokens=4,
                                       recent_window=8, age_tiers=""),
                                  dict(sink_scheme="int8", recent_scheme="int4", bulk_scheme="int4-ch-g64",
                                       sink_tokens=0, recent_window=0, age_tiers=""),
                                  dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int2", sink_tokens=2,
                                       recent_window=4, age_tiers="int8:5,int4-ch-g32:7")],
                         ids=["kivi", "no-window", "tiers"])
def test_plugin_output_shapes_equal_the_reference_shapes(case):
    attrs = {**case, "head_dim": 64}
    ins = KV_CACHE_UPDATE.inputs(attrs)
    past = [torch.zeros(1, 2, 0, int(p.shape[-1]), dtype=getattr(torch, p.dtype)) for p in ins[:-1]]
    gen = torch.Generator().manual_seed(0)
    for n in [5, 1, 70, 1, 1, 130, 1]:
        x = torch.randn(1, 2, n, 64, generator=gen)
        want = KV_CACHE_UPDATE.reference(attrs, *past, x)
        shapes = output_shape_exprs(FAKE_TRT, KV_CACHE_UPDATE, attrs, [list(t.shape) for t in (*past, x)], _Expr())
        assert [list(s) for s in shapes] == [list(w.shape) for w in want]
        past = list(want[:-1])


def test_plugin_enqueue_logic_with_the_append_kernel_matches_the_reference():
    pytest.importorskip("triton", reason="kernels need triton (installed by install.sh)")
    from kvcompile.kernels import available

    if not available("cpu")[0]:
        pytest.skip(available("cpu")[1])
    attrs = dict(sink_scheme="fp16", recent_scheme="int8", bulk_scheme="int2-ch", sink_tokens=2, recent_window=5,
                 head_dim=64, age_tiers="")
    ins = KV_CACHE_UPDATE.inputs(attrs)
    past = [torch.zeros(1, 2, 0, int(p.shape[-1]), dtype=getattr(torch, p.dtype)) for p in ins[:-1]]
    gen = torch.Generator().manual_seed(1)
    for n in [9, 1, 40, 1]:
        x = torch.randn(1, 2, n, 64, generator=gen)
        want = KV_CACHE_UPDATE.reference(attrs, *past, x)
        got = run_op(KV_CACHE_UPDATE, attrs, [*past, x])  # the append kernel, under the interpreter
        for a, w in zip(got, want):
            assert torch.equal(a, w)
        past = list(want[:-1])
    assert tuple(want[-1].shape) == (1, 2, 9 + 1 + 40 + 1, 64)


def test_one_loader_chooses_the_tensorrt_flavour(monkeypatch):
    """Full TensorRT is preferred where installed; KVCOMPILE_TENSORRT (or the option) picks one; a
    choice that is not installed, or not a flavour, is one line."""
    from kvcompile.errors import ExportError
    from kvcompile.targets.trt import loader

    monkeypatch.setattr(loader, "_installed", lambda name: name in installed)
    monkeypatch.delenv(loader.ENV, raising=False)
    installed = {"tensorrt", "tensorrt_rtx"}
    assert loader.find_tensorrt() == "tensorrt"
    assert loader.find_tensorrt("tensorrt_rtx") == "tensorrt_rtx"
    monkeypatch.setenv(loader.ENV, "tensorrt_rtx")
    assert loader.find_tensorrt() == "tensorrt_rtx"
    installed = {"tensorrt_rtx"}
    monkeypatch.setenv(loader.ENV, "tensorrt")
    assert loader.find_tensorrt() is None
    with pytest.raises(ExportError, match="tensorrt was requested and is not installed"):
        loader.require_tensorrt()
    monkeypatch.setenv(loader.ENV, "tensorrt9")
    with pytest.raises(ExportError, match="must be one of tensorrt, tensorrt_rtx, got 'tensorrt9'"):
        loader.find_tensorrt()
    monkeypatch.delenv(loader.ENV)
    assert loader.find_tensorrt() == "tensorrt_rtx"
    installed = set()
    with pytest.raises(ExportError, match="pip install tensorrt-rtx"):
        loader.require_tensorrt()


@pytest.mark.parametrize("change", [{"engine": 3}, {"engine": "other.engine"}, {"max_batch": 0}, {"max_batch": True},
                                    {"tensorrt": "tensorrt9"}])
def test_a_malformed_trt_section_is_one_line_before_any_engine_is_read(tmp_path, change):
    from types import SimpleNamespace

    from kvcompile.runtime.trt_backend import why_not_runnable

    section = {"engine": "model.engine", "files": {"model.engine": 10}, "max_batch": 1, "tensorrt": "tensorrt_rtx"}
    reason = why_not_runnable(SimpleNamespace(path=tmp_path, trt={**section, **change}))
    assert reason.endswith("the manifest's trt section must name its engine among its files, a max_batch >= 1 and the "
                           "TensorRT flavour; re-run `kvcompile export --target trt`")
    assert "trt section" not in (why_not_runnable(SimpleNamespace(path=tmp_path, trt=section)) or "")


def test_a_compiled_engine_section_must_name_its_plugin_library(tmp_path):
    from types import SimpleNamespace

    from kvcompile.runtime.trt_backend import why_not_runnable

    section = {"engine": "model.engine", "files": {"model.engine": 10, "libkvcompile_trt.so": 5}, "max_batch": 1,
               "tensorrt": "tensorrt_rtx", "plugins": "compiled"}
    for broken in ({}, {"plugin_library": "other.so"}, {"plugin_library": 3}):
        reason = why_not_runnable(SimpleNamespace(path=tmp_path, trt={**section, **broken}))
        assert reason.endswith("the manifest's trt section must name its plugin library among its files; re-run "
                               "`kvcompile export --target trt`")
    fine = why_not_runnable(SimpleNamespace(path=tmp_path, trt={**section, "plugin_library": "libkvcompile_trt.so"}))
    assert "plugin library" not in (fine or "")


@needs_trt
def test_an_engine_with_recency_tiers_builds_with_their_segments(tiny_lm, tiny_geometry, tmp_path):
    """The plugin's fields carry the age tiers and its output shapes (the same SegmentRule on
    TensorRT dimension expressions) let the builder accept every tier segment's I/O."""
    import json

    from kvcompile.kv.precision_map import PrecisionMap

    g = tiny_geometry
    pmap = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, "int2", sink_tokens=2, recent_window=4,
                                ages=((6, "int8"), (8, "int4-ch-g8")))
    ex = export_trt(tiny_lm, pmap, tmp_path / "tiers", max_context=64)
    report = json.loads((ex.path / "engine_report.json").read_text())
    assert len(report["plugin_layers"]) == g.num_layers  # one KVAttention layer per layer (one joint group)
    for stream in ("key", "value"):
        assert {layer["fields"][f"{stream}_age_tiers"] for layer in report["plugin_layers"]} == {"int8:6,int4-ch-g8:8"}
    io = {t["name"] for t in report["io"]}
    assert any(".age2." in name for name in io) and any(".age1." in name for name in io)


@needs_trt
def test_an_engine_with_keys_stored_before_rope_builds_their_groups_from_the_function_body(tiny_lm, tiny_geometry,
                                                                                             tmp_path):
    """Pre-RoPE key groups have no plugin reader: they reach TensorRT as KVAttentionPortable function
    bodies that read the RoPE tables; the other groups stay plugin layers."""
    import json

    from kvcompile.kv.precision_map import PrecisionMap

    g = tiny_geometry
    pmap = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, "int4", sink_tokens=2, recent_window=4)
    schemes = {s: dict(v) for s, v in pmap.schemes.items()}
    schemes["key"]["bulk"] = (("int2-ch-g8-pr", "int4"), ("int4", "int4"))  # layer 0, kv head 0
    from dataclasses import replace

    ex = export_trt(tiny_lm, replace(pmap, schemes=schemes, _resolved={}), tmp_path / "pre-rope", max_context=64)
    report = json.loads((ex.path / "engine_report.json").read_text())
    assert len(report["plugin_layers"]) == 2  # layer 0's other head group, and layer 1
    model = onnx.load(str(ex.onnx_path), load_external_data=False)
    portable = [n for n in model.graph.node if n.op_type == "KVAttentionPortable"]
    assert len(portable) == 1 and list(portable[0].input[-2:]) == ["rope.cos", "rope.sin"]
