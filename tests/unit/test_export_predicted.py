"""Exports of maps with cross-layer predictors: the graph's residual cache against the predicting
torch cache (:meth:`MixedPrecisionLayer._update_predicted`, the oracle), bit for bit, and the whole
export decoded by ONNX Runtime against the torch reference."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX path needs onnx (installed by install.sh)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.cache import MixedPrecisionCache  # noqa: E402
from kvcompile.errors import ArtifactError, ExportError  # noqa: E402
from kvcompile.export import ExportedModel, export_onnx  # noqa: E402
from kvcompile.export.decoder import Weights, past_length  # noqa: E402
from kvcompile.export.layout import cache_layout  # noqa: E402
from kvcompile.export.predicted import add_predictor_weights, predicted_states  # noqa: E402
from kvcompile.kv.precision_map import PrecisionMap  # noqa: E402
from kvcompile.kv.predict import FILE_NAME, CrossLayerPredictors, register  # noqa: E402
from kvcompile.kv.rope import RopeTable  # noqa: E402
from kvcompile.ops.builder import OPSET, Builder  # noqa: E402
from kvcompile.ops.spec import DOMAIN, collect_functions  # noqa: E402
from kvcompile.runtime import generate, open_decoder  # noqa: E402
from kvcompile.validate.compare import cache_ports, lockstep  # noqa: E402
from tests.unit.test_export import LOGIT_ATOL  # noqa: E402
from tests.unit import test_predict as predict_tests  # noqa: E402
from tests.unit.test_ops import NP, rope_feeds  # noqa: E402

L, H, D = 3, 2, 32


def random_predictors(layers: int = L, seed: int = 0) -> CrossLayerPredictors:
    """test_predict's random predictors, for this file's 3 layers by default."""
    return predict_tests.random_predictors(seed=seed, layers=layers)


def predicted_map(predictors: CrossLayerPredictors, layers: int = L) -> PrecisionMap:
    """Sinks, two age tiers, per-head mixed schemes, and one all-fp16 head (a packed group here)."""
    base = PrecisionMap.uniform(layers, H, D, "int2", sink_tokens=2, recent_window=3, ages=((4, "int8"), (5, "int4")))
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["age1"] = tuple(("int8", "nf4") if l % 2 else ("int4", "int8") for l in range(layers))
    schemes["value"]["bulk"] = tuple(("int3", "lm2-rot") if l % 2 else ("int2", "int3") for l in range(layers))
    for stream in ("key", "value"):  # the last layer's head 1 keeps everything in fp16
        for cls in schemes[stream]:
            rows = list(schemes[stream][cls])
            rows[-1] = (rows[-1][0], "fp16")
            schemes[stream][cls] = tuple(rows)
    return PrecisionMap(layers, H, D, 2, 3, schemes, age_windows=(4, 5),
                        predictors={"path": "", "sha256": register(predictors)})


def cache_graph(pmap: PrecisionMap, predictors: CrossLayerPredictors):
    """A graph of the cache alone: per layer the new K/V ``new.{l}.{stream}`` [B, H, S, D] (keys after
    RoPE) and the past parts in; the present parts and every layer's forms ``full.{l}.{stream}`` out."""
    from onnx import helper, numpy_helper

    groups = cache_layout(pmap)
    b, w = Builder("t"), Weights()
    weights = add_predictor_weights(w, predictors)
    p_len = past_length(b, groups)
    previous, outputs = None, []
    for layer in range(pmap.num_layers):
        by_stream = {s: [g for g in groups if g.layer == layer and g.stream == s] for s in ("key", "value")}
        previous = predicted_states(b, pmap, layer, by_stream, {s: f"new.{layer}.{s}" for s in by_stream}, p_len,
                                    ("rope_cos", "rope_sin"), weights, previous)
        for s in ("key", "value"):
            b.op("Identity", previous["full"][s], outputs=[f"full.{layer}.{s}"])
            outputs.append(helper.make_tensor_value_info(f"full.{layer}.{s}", 1, ["B", H, "T", D]))
    types = {"float32": 1, "float16": 10, "int8": 3}
    inputs = [helper.make_tensor_value_info(f"new.{l}.{s}", 1, ["B", H, "S", D]) for l in range(pmap.num_layers)
              for s in ("key", "value")]
    inputs += [helper.make_tensor_value_info(t, 1, ["N", D]) for t in ("rope_cos", "rope_sin")]
    for g in groups:
        for p in g.ports:
            inputs.append(helper.make_tensor_value_info(p.past, types[p.dtype], ["B", len(g.heads), None, p.width]))
            outputs.append(helper.make_tensor_value_info(p.present, types[p.dtype], ["B", len(g.heads), None, p.width]))
    graph = helper.make_graph(b.nodes, "cache", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in w.arrays.items()],
                              value_info=b.value_infos(exclude=[o.name for o in outputs]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                             functions=collect_functions(b.calls), ir_version=10), groups


def cache_session(model, native: bool):
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if native:
        from kvcompile.kernels import native as library

        library.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("native", [True, False], ids=["native", "bodies"])
@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 1, 3, 1, 9, 1, 1, 2, 1, 1, 1]], ids=["decode", "ragged"])
def test_the_graphs_residual_cache_equals_the_predicting_cache_bit_for_bit(chunks, native):
    """Same K/V into the graph and into MixedPrecisionCache, layer by layer: every present part equal
    bit for bit after every step (new positions, sinks, tier moves re-encoded against the layer
    before's new forms, the fp16 group's moves too), and the forms attention reads equal; with the
    native library's KVQuantize / KVDequantize kernels and with their function bodies."""
    predictors = random_predictors()
    pmap = predicted_map(predictors)
    model, groups = cache_graph(pmap, predictors)
    nodes = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    assert nodes == {"KVQuantize", "KVDequantize"}
    sess = cache_session(model, native)
    rope = rope_feeds(64, D)
    table = RopeTable(torch.from_numpy(rope["rope_cos"]), torch.from_numpy(rope["rope_sin"]))
    cache = MixedPrecisionCache(pmap, max_context=64, rope=[table] * L)
    past = {p.past: np.zeros((2, len(g.heads), 0, p.width), NP[p.dtype]) for g in groups for p in g.ports}
    g = torch.Generator().manual_seed(4)
    moved = 0
    for step, n in enumerate(chunks):
        new = {(l, s): torch.randn(2, H, n, D, generator=g) * 2 for l in range(L) for s in ("key", "value")}
        want = {}
        for l in range(L):
            want[l] = cache.layers[l].update(new[(l, "key")], new[(l, "value")])
        got = sess.run(None, {**{f"new.{l}.{s}": x.numpy() for (l, s), x in new.items()}, **rope, **past})
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, got))
        ref = cache_ports(cache, pmap)
        for name, value in ref.items():
            present = got[name.replace("past_key_values.", "present.")]
            expected = np.zeros_like(present[:, :, :0]) if value is None else value
            assert present.shape == expected.shape and np.array_equal(present.view(np.uint8), expected.view(np.uint8)), \
                f"step {step}: {name}"
        for l in range(L):
            for i, s in enumerate(("key", "value")):
                np.testing.assert_array_equal(got[f"full.{l}.{s}"], want[l][i].numpy(), err_msg=f"step {step} {l} {s}")
        past = {name: got[name.replace("past_key_values.", "present.")] for name in past}
        moved += int(any(name.endswith(".bulk.codes") and v.shape[2] for name, v in past.items()))
    assert moved  # positions reached the bulk through both age tiers


@pytest.fixture(scope="module")
def lm3():
    """The tiny Llama with 3 layers, so that a predicted layer predicts from a predicted layer."""
    from kvcompile.models import LoadedModel
    from kvcompile.models.adapters import adapter_for
    from tests.conftest import CharTokenizer, make_tiny_llama

    model = make_tiny_llama(layers=L)
    adapter = adapter_for(model.config)
    return LoadedModel(model, CharTokenizer(), adapter.geometry(model.config), adapter, "tiny-llama")


@pytest.fixture(scope="module")
def predicted_export(lm3, tmp_path_factory):
    predictors = random_predictors()
    path = tmp_path_factory.mktemp("pexp") / "predictors.safetensors"
    predictors.save(path)
    pmap = replace(predicted_map(predictors), predictors={"path": str(path), "sha256": predictors.sha256})
    return export_onnx(lm3, pmap, tmp_path_factory.mktemp("exports") / "predicted", max_context=96)


def test_a_predicted_export_decodes_as_the_torch_reference_does(predicted_export, lm3):
    """In lockstep (the export given the reference's cache each step) the steps that stored the same
    codes give the reference's logits; greedy generation agrees; the cache's formats are written and
    read by KVQuantize / KVDequantize nodes (the native library's kernels)."""
    ex = predicted_export
    assert ex.targets["onnx"]["attention"] == "standard ops, cross-layer predicted"
    assert set(ex.targets["onnx"]["kvcompile_nodes"]) == {"KVQuantize", "KVDequantize"}
    ids = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(3)).numpy()
    ours, ref, state = lockstep(open_decoder(ex, "ort", threads=1), open_decoder(ex, "torch", lm=lm3), ids, 20,
                                ex.pmap)
    assert state["mismatched"] == 0 and state["resynced"] == 51
    same = state["same_cache"]
    assert same.mean() > 0.8 and state["differing"] / state["compared"] < 1e-3
    np.testing.assert_allclose(ours[same], ref[same], rtol=0, atol=LOGIT_ATOL)
    prompt = list(range(5, 17))
    assert generate(open_decoder(ex, "ort"), prompt, 30).tokens == generate(open_decoder(ex, "torch", lm=lm3),
                                                                           prompt, 30).tokens


def test_an_export_carries_its_predictors(predicted_export, tmp_path, monkeypatch):
    """The export holds its copy of the predictors (the map's path may not exist where it is deployed);
    a missing or different copy is one line."""
    import shutil

    import kvcompile.kv.predict as predict

    copy = tmp_path / "copy"
    shutil.copytree(predicted_export.path, copy)
    monkeypatch.setattr(predict, "_KNOWN", {})
    ExportedModel.load(copy)  # registers the export's copy
    assert predicted_export.pmap.predictors["sha256"] in predict._KNOWN
    (copy / FILE_NAME).write_bytes(random_predictors(seed=5).to_bytes())
    manifest = json.loads((copy / "kvcompile_export.json").read_text())
    manifest["targets"]["onnx"]["files"][FILE_NAME] = (copy / FILE_NAME).stat().st_size
    (copy / "kvcompile_export.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="content sha256 differs") as e:
        ExportedModel.load(copy)
    assert "\n" not in str(e.value)
    (copy / FILE_NAME).unlink()
    with pytest.raises(ArtifactError, match=f"{FILE_NAME} of target 'onnx' is missing"):
        ExportedModel.load(copy)


def test_a_predicted_map_for_another_geometry_or_the_trt_target_is_refused_before_writing(lm3, tmp_path):
    from kvcompile.targets.trt.build import export_trt

    predictors = random_predictors(layers=2)
    base = PrecisionMap.uniform(L, H, D, "int4")
    wrong = replace(base, predictors={"path": "", "sha256": register(predictors)})
    with pytest.raises(ExportError, match="predictors are for 2 layers") as e:
        export_onnx(lm3, wrong, tmp_path / "a", max_context=64)
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
    right = predicted_map(random_predictors())
    with pytest.raises(ExportError, match="--target trt cannot read cross-layer prediction residuals") as e:
        export_trt(lm3, right, tmp_path / "b", max_context=64)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


def test_validate_passes_a_predicted_export_and_fails_wrong_predictors(predicted_export, lm3, tmp_path):
    """validate judges a predicted map with its own thresholds (compare.PREDICTED: the KL bound over the
    steps that stored the reference's codes); predictor weights 1 % off in the graph fail it."""
    from kvcompile.validate import faults
    from kvcompile.validate.compare import PREDICTED, validate_export

    kwargs = dict(lm=lm3, window=60, prefill=20, max_windows=1, progress=False, write_polygraphy=False, threads=1)
    good = validate_export(predicted_export, **kwargs)
    assert good.passed and good.cache_checked and good.tolerances["mode"] == "lockstep, cross-layer predicted"
    assert good.tolerances["max_cache_differing"] == PREDICTED["max_cache_differing"]
    with faults.wrong_predictors(1.01):
        broken = export_onnx(lm3, predicted_export.pmap, tmp_path / "broken", max_context=96)
    bad = validate_export(broken, **kwargs)
    assert not bad.passed and bad.cache_mismatched_tensors == 0
    assert bad.cache_differing_fraction > 10 * max(good.cache_differing_fraction, 1e-4)
