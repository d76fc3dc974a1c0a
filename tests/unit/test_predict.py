"""Cross-layer prediction: the fit, the artifact, maps that name it, the simulation against the real
cache, calibration on residuals, and the refusals (exports: tests/unit/test_export_predicted.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kvcompile.cache import MixedPrecisionCache, model_ropes
from kvcompile.errors import ArtifactError, CacheError, KvcompileError
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.kv.predict import FILE_NAME, CrossLayerPredictors, register, resolve
from kvcompile.measure.simulate import simulate_cache

from tests.unit.test_simulation import _decode as decode  # token by token through MixedPrecisionCache
from tests.unit.test_simulation import model64  # noqa: F401  (the float64 tiny Llama fixture)

L, H, D = 2, 2, 32  # the tiny Llama's layers, kv heads, head dim


def random_predictors(scale: float = 0.05, seed: int = 0, layers: int = L) -> CrossLayerPredictors:
    g = torch.Generator().manual_seed(seed)
    maps = {s: {l: (torch.randn(2 * H * D, H * D, generator=g) * scale, torch.randn(H * D, generator=g) * 0.1)
                for l in range(1, layers)} for s in ("key", "value")}
    return CrossLayerPredictors("tiny-llama", layers, H, D, maps)


def zero_predictors(layers: int = L) -> CrossLayerPredictors:
    maps = {s: {l: (torch.zeros(2 * H * D, H * D), torch.zeros(H * D)) for l in range(1, layers)}
            for s in ("key", "value")}
    return CrossLayerPredictors("tiny-llama", layers, H, D, maps)


def reference(predictors: CrossLayerPredictors) -> dict:
    return {"path": "", "sha256": register(predictors)}


def tiered_map(predictors=None) -> PrecisionMap:
    """Sinks, an int8/nf4 age tier and mixed per-token bulks, K and V differing by head."""
    base = PrecisionMap.uniform(L, H, D, "int2", sink_tokens=2, recent_window=3, ages=((4, "int8"), (5, "int4")))
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["age1"] = (("int8", "nf4"), ("int4", "int8"))
    schemes["value"]["bulk"] = (("int3", "int3"), ("int2", "lm2-rot"))
    return PrecisionMap(L, H, D, 2, 3, schemes, age_windows=(4, 5),
                        predictors=None if predictors is None else reference(predictors))


def simulate(model, ids, pmap, prefill):
    with torch.no_grad(), simulate_cache(model, pmap, prefill_length=prefill):
        return model(ids, use_cache=False).logits


# ---------------------------------------------------------------- the simulation and the real cache
@pytest.mark.parametrize("prefill", [1, 9])
@pytest.mark.parametrize("chunk", [512, 8])
def test_simulation_equals_token_by_token_decoding_through_the_predicting_cache(model64, prefill, chunk, monkeypatch):
    """The cache re-encodes each tier move against the prediction from the layer before's new form;
    the simulation builds every tier's form at once.  They agree to float64 rounding."""
    from kvcompile.measure import simulate as sim

    monkeypatch.setattr(sim, "QUERY_CHUNK", chunk)
    pmap = tiered_map(random_predictors())
    ids = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(7))
    simulated, decoded = simulate(model64, ids, pmap, prefill), decode(model64, ids, pmap, prefill)
    assert (simulated - decoded).abs().max().item() < 1e-9
    plain = simulate(model64, ids, replace(pmap, predictors=None), prefill)
    assert (simulated - plain).abs().max().item() > 1e-3  # the residuals are what is stored


def test_zero_predictors_store_the_states_themselves(model64):
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    pmap = tiered_map(zero_predictors())
    plain = replace(pmap, predictors=None)
    assert (simulate(model64, ids, pmap, 5) - simulate(model64, ids, plain, 5)).abs().max().item() < 1e-12
    assert (decode(model64, ids, pmap, 5) - decode(model64, ids, plain, 5)).abs().max().item() < 1e-12


def test_the_cache_needs_rope_tables_its_layers_in_order_and_no_kernels(model64):
    pmap = tiered_map(random_predictors())
    with pytest.raises(CacheError, match="pass the model's RoPE tables"):
        MixedPrecisionCache(pmap, max_context=16)
    cache = MixedPrecisionCache(pmap, max_context=16, rope=model_ropes(model64, pmap, 16))
    k = torch.randn(1, H, 3, D)
    with pytest.raises(CacheError, match="layer before updated first"):
        cache.layers[1].update(k, k)
    with pytest.raises(CacheError, match="kernels do not read"):
        MixedPrecisionCache(pmap, max_context=16, kernels=True)


def test_predictions_hold_at_every_position(model64):
    """Keys enter the linear map before RoPE: a position's prediction, rotated back, does not depend
    on the position (the same key and value states at positions 0 and 40 give the same prediction
    up to the rotation)."""
    from kvcompile.models.rope import layer_ropes

    rope = layer_ropes(model64, 64)[0]
    p = random_predictors()
    g = torch.Generator().manual_seed(2)
    k_pre, v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
    at = {pos: p.predict("key", 1, rope.rotate(k_pre, pos), v, rope, pos) for pos in (0, 40)}
    assert torch.allclose(rope.unrotate(at[0], 0), rope.unrotate(at[40], 40), atol=1e-5)
    values = {pos: p.predict("value", 1, rope.rotate(k_pre, pos), v, rope, pos) for pos in (0, 40)}
    assert torch.allclose(values[0], values[40], atol=1e-5)
    assert not torch.allclose(at[0], at[40], atol=1e-3)  # the keys themselves turn with the position


# ---------------------------------------------------------------- fit
def test_ridge_moments_recover_a_linear_map():
    from kvcompile.calibrate.predictors import _Moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g) * torch.tensor([1.0, 2, 3, 0.5, 1, 4]) + 3
    a, c = torch.randn(6, 3, generator=g), torch.randn(3, generator=g)
    y = x @ a + c + 1e-3 * torch.randn(4000, 3, generator=g)
    m = _Moments(6, 3)
    m.add(x[:1500], y[:1500])
    m.add(x[1500:], y[1500:])  # accumulated over windows
    w, b = m.solve(1e-9)
    assert torch.allclose(w, a, atol=1e-3) and torch.allclose(b, c, atol=5e-3)
    w_strong, _ = m.solve(10.0)  # ridge shrinks the weights
    assert w_strong.norm() < 0.5 * w.norm()


def test_fitted_predictors_are_the_ridge_solution_on_the_models_cache(tiny_lm):
    """The fit accumulates moments over windows; the result equals ridge regression solved on all the
    rows at once (keys before RoPE), and explains part of each layer's K and V."""
    from transformers import DynamicCache

    from kvcompile.calibrate.predictors import DEFAULT_RIDGE, fit_predictors
    from kvcompile.data import load_text
    from kvcompile.measure.quality import token_windows
    from kvcompile.models.rope import layer_ropes

    p = fit_predictors(tiny_lm, text="wikipedia-calibration", windows=3, window=96, progress=False)
    assert p.parameters == 2 * (L - 1) * (2 * H * D + 1) * H * D and p.fit["windows"] == 3
    ids = token_windows(tiny_lm.tokenizer, load_text("wikipedia-calibration"), 96, 3)
    rope = layer_ropes(tiny_lm.model, 96)[0]
    ks, vs = [], []
    with torch.no_grad():
        for w in ids:
            cache = tiny_lm.model(w[None], use_cache=True, past_key_values=DynamicCache()).past_key_values
            ks.append([rope.unrotate(layer.keys.float()) for layer in cache.layers])  # keys before RoPE
            vs.append([layer.values.float() for layer in cache.layers])
    k1, v0, k0, v1 = (torch.cat([c[i] for c in src], 2) for src, i in ((ks, 1), (vs, 0), (ks, 0), (vs, 1)))
    flat = lambda t: t[0].permute(1, 0, 2).reshape(t.shape[2], H * D).double()  # noqa: E731
    for stream, x, y in (("key", torch.cat([flat(k0), flat(v0)], 1), flat(k1)),
                         ("value", torch.cat([flat(k1), flat(v0)], 1), flat(v1))):
        xc, yc = x - x.mean(0), y - y.mean(0)
        a = xc.T @ xc
        w = torch.linalg.solve(a + DEFAULT_RIDGE * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype), xc.T @ yc)
        fitted_w, fitted_b = (t.double() for t in p.maps[stream][1])
        assert torch.allclose(fitted_w, w, rtol=1e-3, atol=1e-4 * w.abs().max()), stream
        assert torch.allclose(fitted_b, y.mean(0) - x.mean(0) @ w, atol=1e-3), stream
        assert (y - x @ fitted_w - fitted_b).pow(2).sum() < 0.9 * yc.pow(2).sum(), stream  # it explains something


def test_fit_refuses_sliding_window_models(tiny_gemma_lm):
    from kvcompile.calibrate.predictors import fit_predictors

    with pytest.raises(KvcompileError, match="sliding-window"):
        fit_predictors(tiny_gemma_lm, progress=False)


# ---------------------------------------------------------------- artifact
def test_round_trip_and_a_content_hash_that_survives_rewrites(tmp_path):
    p = random_predictors()
    p.save(tmp_path / "a.safetensors")
    p.save(tmp_path / "b.safetensors")
    a = CrossLayerPredictors.from_bytes((tmp_path / "a.safetensors").read_bytes())
    assert a.sha256 == p.sha256 == CrossLayerPredictors.from_bytes((tmp_path / "b.safetensors").read_bytes()).sha256
    assert all(torch.equal(a.maps[s][1][i], p.maps[s][1][i]) for s in ("key", "value") for i in (0, 1))
    assert random_predictors(seed=1).sha256 != p.sha256


def test_malformed_predictors_are_one_line_errors(tmp_path):
    from safetensors.torch import save

    p = random_predictors()
    cases = {
        "truncated": p.to_bytes()[:100],
        "other artifact": save({"x": torch.zeros(1)}, metadata={"artifact": "calibration", "format_version": "1"}),
        "missing layer": save({"key.1.weight": torch.zeros(128, 64)}, metadata={
            "artifact": "predictors", "format_version": "1", "model": "m", "num_layers": "2", "num_kv_heads": "2",
            "head_dim": "32"}),
    }
    for name, blob in cases.items():
        with pytest.raises(ArtifactError) as e:
            CrossLayerPredictors.from_bytes(blob, name)
        assert "\n" not in str(e.value), name
    bad = {s: {1: (torch.zeros(10, 64), torch.zeros(64))} for s in ("key", "value")}
    with pytest.raises(ArtifactError, match="expected \\(128, 64\\)"):
        CrossLayerPredictors("m", 2, 2, 32, bad)
    nan = {s: {1: (torch.full((128, 64), float("nan")), torch.zeros(64))} for s in ("key", "value")}
    with pytest.raises(ArtifactError, match="NaN"):
        CrossLayerPredictors("m", 2, 2, 32, nan)


def test_a_map_finds_its_predictors_by_path_and_checks_them(tmp_path, monkeypatch):
    import kvcompile.kv.predict as predict

    p = random_predictors(seed=5)
    path = tmp_path / FILE_NAME
    p.save(path)
    monkeypatch.setattr(predict, "_KNOWN", {})  # a fresh process: nothing known by digest
    assert resolve({"path": str(path), "sha256": p.sha256}).sha256 == p.sha256
    monkeypatch.setattr(predict, "_KNOWN", {})
    with pytest.raises(ArtifactError, match="file not found"):
        resolve({"path": str(tmp_path / "gone.safetensors"), "sha256": p.sha256})
    random_predictors(seed=6).save(path)
    monkeypatch.setattr(predict, "_KNOWN", {})
    with pytest.raises(ArtifactError, match="content sha256 differs"):
        resolve({"path": str(path), "sha256": p.sha256})


# ---------------------------------------------------------------- maps
def test_a_map_with_predictors_round_trips_and_old_maps_hash_as_before(tmp_path):
    pmap = tiered_map(random_predictors())
    pmap.save(tmp_path / "m.json")
    loaded = PrecisionMap.load(tmp_path / "m.json")
    assert loaded.predictors == pmap.predictors and loaded == pmap
    assert "cross-layer predicted" in loaded.summary()
    plain = replace(pmap, predictors=None)
    assert "predictors" not in plain.to_json_body() and plain.content_hash() != pmap.content_hash()


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["key"].update(bulk=(("int2-ch-g8", "int2"), ("int2", "int2"))), "per-token schemes stored after RoPE"),
    (lambda s: s["key"].update(bulk=(("int2-ch-g8-pr", "int2"), ("int2", "int2"))), "per-token schemes stored after RoPE"),
    (lambda s: s["value"].update(age1=(("int4", "int4-ch-g4"), ("int8", "int8"))), "per-token schemes stored after RoPE"),
])
def test_maps_with_predictors_need_per_token_post_rope_schemes(edit, message):
    base = tiered_map()
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    edit(schemes)
    PrecisionMap(L, H, D, 2, 3, schemes, age_windows=(4, 5))  # fine without predictors
    with pytest.raises(ArtifactError, match=message):
        PrecisionMap(L, H, D, 2, 3, schemes, age_windows=(4, 5), predictors=reference(random_predictors()))


@pytest.mark.parametrize("ref", [{"path": "x"}, {"path": 3, "sha256": "0" * 64}, {"path": "x", "sha256": "zz"},
                                 "predictors.safetensors"])
def test_malformed_predictor_references_are_refused(ref):
    with pytest.raises(ArtifactError, match="predictors must be null or"):
        replace(tiered_map(), predictors=ref)


def test_sliding_window_maps_cannot_predict():
    pmap = PrecisionMap.uniform(L, H, D, "int4").windowed((8, 0))
    with pytest.raises(ArtifactError, match="full-attention layers"):
        replace(pmap, predictors=reference(random_predictors()))


# ---------------------------------------------------------------- calibration and planning
SCHEMES = ["fp16", "int8", "int4", "int2"]


def test_stored_bulk_forms_quantize_the_residual():
    from kvcompile.calibrate.estimate import _stored_bulk_forms

    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(0)) * 3
    plain = _stored_bulk_forms(x, SCHEMES, [0, 2])
    zero = _stored_bulk_forms(x, SCHEMES, [0, 2], pred=torch.zeros_like(x))
    exact = _stored_bulk_forms(x, SCHEMES, [0, 2], pred=x)
    near = _stored_bulk_forms(x, SCHEMES, [0, 2], pred=x + 0.01 * torch.randn(x.shape))
    for a, b, c, d in zip(plain, zero, exact, near):
        assert torch.equal(a, b)
        assert (c - x).abs().max() < 1e-6  # nothing left to quantize
        assert (d - x).pow(2).sum() < 1e-3 * (a - x).pow(2).sum()  # a small residual costs little


def test_calibration_with_zero_predictors_costs_what_plain_calibration_costs(tiny_lm):
    from kvcompile.calibrate import calibrate

    kwargs = dict(text="wikipedia-calibration", windows=1, window=64, schemes=SCHEMES, progress=False)
    plain, zero = calibrate(tiny_lm, **kwargs), calibrate(tiny_lm, predictors=zero_predictors(), **kwargs)
    assert torch.allclose(plain.cost, zero.cost, rtol=1e-6, atol=1e-12)
    assert torch.allclose(plain.correction, zero.correction, rtol=1e-5)
    assert zero.content_hash() != plain.content_hash()  # the predictors are part of what was calibrated
    other = calibrate(tiny_lm, predictors=random_predictors(scale=0.2), **kwargs)
    assert not torch.allclose(plain.cost, other.cost)


def test_calibration_refuses_grouped_schemes_with_predictors_and_drops_them_from_the_default_menu(tiny_lm):
    from kvcompile.calibrate import calibrate

    with pytest.raises(KvcompileError, match="int2-ch group positions"):
        calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=32, schemes=["int4", "int2-ch"],
                  predictors=zero_predictors(), progress=False)
    with pytest.raises(KvcompileError, match="predictors are for tiny-llama \\(3 layers"):
        calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=32, predictors=zero_predictors(layers=3),
                  progress=False)


def test_cli_calibrates_with_predictors_and_plans_a_map_that_names_them(tmp_path, tiny_lm, monkeypatch, capsys):
    import kvcompile.models
    from kvcompile.calibrate import Calibration
    from kvcompile.cli import main

    monkeypatch.setattr(kvcompile.models, "load_model", lambda *a, **k: tiny_lm)
    out = tmp_path / "calib"
    assert main(["calibrate", "--predict", "--predict-windows", "1", "--windows", "1", "--window", "64",
                 "--schemes", ",".join(SCHEMES), "--quiet", "-o", str(out)]) == 0
    assert "fitted cross-layer predictors on 1 x 64 tokens" in capsys.readouterr().out
    calib = Calibration.load(out)
    assert (out / FILE_NAME).is_file() and calib.predictors is not None
    assert main(["plan", str(out), "--budget-bits", "5", "--context", "64", "-o", str(tmp_path / "m.json")]) == 0
    pmap = PrecisionMap.load(tmp_path / "m.json")
    assert pmap.predictors == {"path": str(out / FILE_NAME), "sha256": calib.predictors.sha256}
    # a tampered predictors file is refused when the calibration loads
    doc = json.loads((out / "calibration.json").read_text())
    random_predictors(seed=9).save(out / FILE_NAME)
    import kvcompile.kv.predict as predict

    monkeypatch.setattr(predict, "_KNOWN", {})
    assert doc["predictors_sha256"] == calib.predictors.sha256
    with pytest.raises(ArtifactError, match="content sha256 differs"):
        Calibration.load(out)


def test_predictors_compare_by_content():
    assert random_predictors() == random_predictors() and random_predictors() != random_predictors(seed=1)
