"""The parallel simulation equals token-by-token decoding through the real cache (tiny model, float64)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.cache import MixedPrecisionCache, model_ropes
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.plan.presets import resolve_map
from kvcompile.kv.segments import SegmentRule
from kvcompile.measure.simulate import simulate_cache, tier_index

from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(dtype=torch.float64, seed=4)


def _decode(model, ids, pmap, prefill):
    cache = MixedPrecisionCache(pmap, max_context=64, rope=model_ropes(model, pmap, 64))
    with torch.no_grad():
        outs = [model(ids[:, :prefill], cache=cache).logits]
        outs += [model(ids[:, i : i + 1], cache=cache).logits for i in range(prefill, ids.shape[1])]
    return torch.cat(outs, 1)


def _mixed_map() -> PrecisionMap:
    base = resolve_map("int4", _geom())
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["bulk"] = (("int2-ch-g4", "nf4"), ("int3", "fp8"))
    schemes["value"]["recent"] = (("int8", "fp16"), ("fp16", "int8"))
    return PrecisionMap(2, 2, 32, 2, 3, schemes)


def _geom():
    from kvcompile.models.adapters import KVGeometry

    return KVGeometry(2, 2, 4, 32, 256)


def _tiered_map() -> PrecisionMap:
    """Recency tiers fp16 -> int8 -> per-channel int4 (blocks of 8) -> int2, K and V differing by head."""
    base = PrecisionMap.uniform(2, 2, 32, "int2", sink_tokens=2, recent_window=3, ages=((4, "int8"), (5, "int4-ch-g8")))
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["age1"] = (("int8", "nf4"), ("int4", "int8"))
    schemes["value"]["bulk"] = (("int2-ch-g8", "int3"), ("int2", "int2"))
    return PrecisionMap(2, 2, 32, 2, 3, schemes, age_windows=(4, 5))


def _pre_rope_map() -> PrecisionMap:
    """Keys stored before RoPE in the bulk (blocks of 4 and 8) and in a per-channel age tier, beside
    post-RoPE keys of another head; values as usual."""
    base = PrecisionMap.uniform(2, 2, 32, "int4", sink_tokens=2, recent_window=3, ages=((4, "int8"), (5, "int4-ch-g8")))
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["age2"] = (("int4-ch-g8-pr", "int4-ch-g8"), ("int4-ch-g8-pr", "int4-ch-g8-pr"))
    schemes["key"]["bulk"] = (("int2-ch-g8-pr", "int3"), ("int2-ch-g4-pr", "int2-ch-g8-pr"))
    return PrecisionMap(2, 2, 32, 2, 3, schemes, age_windows=(4, 5))


@pytest.mark.parametrize("spec,sinks,window", [("int4", 0, 0), ("int2", 0, 0), ("kivi-2", 3, 5), ("int2-ch-g8", 2, 3),
                                               ("int4-rot", 1, 2), ("lm2-rot", 1, 2), ("mixed", None, None),
                                               ("tiers", None, None), ("pre-rope", None, None)])
@pytest.mark.parametrize("prefill", [1, 9])
@pytest.mark.parametrize("chunk", [512, 8])
def test_simulation_equals_token_by_token_decoding(model64, spec, sinks, window, prefill, chunk, monkeypatch):
    """``chunk``: queries per chunk of the simulated attention; 8 splits the 37 positions into chunks
    whose keys include a bulk run computed on its own."""
    from kvcompile.measure import simulate

    monkeypatch.setattr(simulate, "QUERY_CHUNK", chunk)
    special = {"mixed": _mixed_map, "tiers": _tiered_map, "pre-rope": _pre_rope_map}
    pmap = special[spec]() if spec in special else resolve_map(spec, _geom(), sink_tokens=sinks, recent_window=window)
    ids = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), simulate_cache(model64, pmap, prefill_length=prefill):
        simulated = model64(ids, use_cache=False).logits
    decoded = _decode(model64, ids, pmap, prefill)
    assert (simulated - decoded).abs().max().item() < 1e-9


def test_simulation_differs_from_a_plain_forward_pass(model64):
    """Sanity: the quantized cache changes the logits (the simulation is not a no-op)."""
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model64(ids, use_cache=False).logits
        with simulate_cache(model64, resolve_map("int2", _geom())):
            quantized = model64(ids, use_cache=False).logits
    assert (plain - quantized).abs().max().item() > 1e-3
    assert model64.config._attn_implementation == "sdpa"  # restored


def test_tier_index_matches_the_segment_rule():
    m = tier_index(12, SegmentRule(2, 3, 4), 1)
    # query 11 (12 cached): bulk = [2, 2 + 4 * floor((12 - 3 - 2) / 4)) = [2, 6)
    assert (m[11] == 1).nonzero().flatten().tolist() == [2, 3, 4, 5]
    # query 5 (6 cached): no complete block yet
    assert not m[5].any()
    # with an age tier of 2 positions (12 cached): c_1 = 10 - 3 = 7 non-sink positions are past the
    # window, c_2 = 4 * floor(min(7, 10 - 5) / 4) = 4 in the bulk: bulk [2, 6), age1 [6, 9), recent [9, 12)
    m = tier_index(12, SegmentRule(2, 3, 4, ((2, 1),)), 1)
    assert m[11].tolist() == [0, 0, 2, 2, 2, 2, 1, 1, 1, 0, 0, 0]


def test_simulation_state_lives_on_each_model_not_in_a_global(model64):
    """Two models simulate at once, each with its own map, and get what each gets alone; a block
    does not nest on one model; the simulated attention outside a block is one clear error."""
    import copy

    other = copy.deepcopy(model64)
    ids = torch.randint(0, model64.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    coarse, fine = resolve_map("int2", _geom()), resolve_map("int8", _geom())
    with torch.no_grad():
        with simulate_cache(model64, coarse):
            alone_coarse = model64(ids, use_cache=False).logits
        with simulate_cache(other, fine):
            alone_fine = other(ids, use_cache=False).logits
        with simulate_cache(model64, coarse), simulate_cache(other, fine):
            both = model64(ids, use_cache=False).logits, other(ids, use_cache=False).logits
            with pytest.raises(RuntimeError, match="does not nest"):
                with simulate_cache(model64, fine):
                    pass
    assert torch.equal(both[0], alone_coarse) and torch.equal(both[1], alone_fine)
    assert not torch.equal(alone_coarse, alone_fine)
    from kvcompile.measure.simulate import _simulated_attention

    layer = model64.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="called outside its pass"):
        _simulated_attention(layer, ids, ids, ids, None, 1.0)


def test_a_version_1_map_file_loads_and_gives_the_same_logits(model64, tmp_path):
    """A map saved as format_version 1 (no age tiers) loads as the same map: equal content and
    bit-identical simulated and decoded logits; saving it again writes version 2."""
    import json

    pmap = resolve_map("kivi-2", _geom(), sink_tokens=2, recent_window=5)
    body = pmap.to_json_body()
    del body["age_windows"]
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({"artifact": "precision_map", "format_version": 1, "kvcompile_version": "0.1.0", **body}))
    loaded = PrecisionMap.load(v1)
    assert loaded == pmap and loaded.age_windows == () and loaded.classes == ("sink", "recent", "bulk")
    ids = torch.randint(0, 97, (1, 29), generator=torch.Generator().manual_seed(3))
    outs = []
    with torch.no_grad():
        for m in (pmap, loaded):
            with simulate_cache(model64, m):
                outs.append(model64(ids, use_cache=False).logits)
            outs.append(_decode(model64, ids, m, 1))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    loaded.save(tmp_path / "v2.json")
    assert json.loads((tmp_path / "v2.json").read_text())["format_version"] == 2


def test_age_tiers_change_the_logits_and_the_bits(model64):
    """An int8 age tier between the fp16 window and an int2 bulk costs bits and changes what is read."""
    plain = PrecisionMap.uniform(2, 2, 32, "int2", sink_tokens=2, recent_window=3)
    tiered = PrecisionMap.uniform(2, 2, 32, "int2", sink_tokens=2, recent_window=3, ages=((8, "int8"),))
    assert tiered.kv_bits(40) > plain.kv_bits(40)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = []
        for m in (plain, tiered):
            with simulate_cache(model64, m):
                logits.append(model64(ids, use_cache=False).logits)
    assert not torch.equal(logits[0], logits[1])


# ---------------------------------------------------------------- sliding-window layers (Gemma 3)


@pytest.fixture(scope="module")
def gemma64():
    from tests.conftest import make_tiny_gemma3

    return make_tiny_gemma3(dtype=torch.float64, seed=3, window=8)


def _gemma_geom():
    from kvcompile.models.adapters import adapter_for

    from tests.conftest import make_tiny_gemma3

    config = make_tiny_gemma3(window=8).config
    return adapter_for(config).geometry(config)


@pytest.mark.parametrize("spec", ["fp16", "int4", "kivi-2", "int2"])
@pytest.mark.parametrize("prefill", [1, 11])
def test_window_layers_simulation_equals_decoding(gemma64, spec, prefill):
    """Window layers (window 8, 30 positions) evict; the simulation reads them through the sliding
    mask; both agree, and a window layer never holds more than W - 1 positions between steps."""
    geom = _gemma_geom()
    assert geom.layer_windows == (8, 0, 8)
    pmap = resolve_map(spec, geom, sink_tokens=2 if spec == "kivi-2" else None)
    assert pmap.layer_windows == (8, 0, 8)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), simulate_cache(gemma64, pmap, prefill_length=prefill):
        simulated = gemma64(ids, use_cache=False).logits
    cache = MixedPrecisionCache(pmap)
    with torch.no_grad():
        outs = [gemma64(ids[:, :prefill], cache=cache).logits]
        for i in range(prefill, ids.shape[1]):
            outs.append(gemma64(ids[:, i:i + 1], cache=cache).logits)
            assert [layer.held() for layer in cache.layers] == [min(i + 1, 7), i + 1, min(i + 1, 7)]
    decoded = torch.cat(outs, 1)
    assert (simulated - decoded).abs().max().item() < 1e-9
    if spec == "fp16":  # and with fp16 storage, both are transformers' own sliding-window model
        with torch.no_grad():
            plain = gemma64(ids, use_cache=False).logits
        assert (plain - decoded).abs().max().item() < 1e-2


def test_window_layers_change_the_logits_only_through_their_window(gemma64):
    """Mutation guard: a map whose window layers keep every position (no eviction) gives other
    logits once the context passes the window, so eviction is what the tests above check."""
    geom = _gemma_geom()
    pmap = resolve_map("int4", geom)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), simulate_cache(gemma64, pmap):
        windowed = gemma64(ids, use_cache=False).logits
    unbounded = resolve_map("int4", _geom_without_windows(geom))
    cache = MixedPrecisionCache(unbounded)
    with torch.no_grad():
        outs = [gemma64(ids[:, i:i + 1], cache=cache).logits for i in range(ids.shape[1])]
    assert (torch.cat(outs, 1) - windowed).abs().max().item() > 1e-3


def _geom_without_windows(geom):
    from dataclasses import replace

    return replace(geom, layer_windows=())


def test_window_map_counts_only_the_window():
    geom = _gemma_geom()
    from kvcompile.quant import get_scheme

    pmap = resolve_map("int4", geom)
    assert pmap.stored_elements(100) == 2 * 2 * 32 * (8 + 100 + 8)
    assert pmap.bits_per_element(100) == pytest.approx(get_scheme("int4").bits_per_element(32))
    mixed = resolve_map("kivi-2", geom)  # window layers (8 positions): K fp16, V int2; a KIVI full layer
    full = resolve_map("kivi-2", _geom_without_windows(geom))
    window_bits = 2 * 8 * 2 * 32 * (16 + get_scheme("int2").bits_per_element(32))
    expected = (window_bits + full.kv_bits(100) / 3) / mixed.stored_elements(100)
    assert mixed.bits_per_element(100) == pytest.approx(expected)
    kivi = resolve_map("kivi-2", geom)  # window layers fall back to the fp16 window scheme (keys per channel)
    assert {kivi.scheme(0, 0, "key", c).name for c in kivi.classes} == {"fp16"}
    assert {kivi.scheme(0, 0, "value", c).name for c in kivi.classes} == {"int2"}
    assert kivi.scheme(1, 0, "key", "bulk").name == "int2-ch"
