"""MixedPrecisionCache on a tiny random Llama: exactness, true bytes, aging, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompile.cache import MixedPrecisionCache
from kvcompile.kv.store import SegmentStore
from kvcompile.errors import CacheError
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.plan.presets import resolve_map
from kvcompile.quant import get_scheme

from tests.conftest import make_tiny_llama


def _decode_logits(model, ids, cache, prefill=4):
    with torch.no_grad():
        outs = [model(ids[:, :prefill], cache=cache).logits]
        outs += [model(ids[:, i : i + 1], cache=cache).logits for i in range(prefill, ids.shape[1])]
    return torch.cat(outs, 1)


def test_all_fp16_map_equals_default_cache_bit_for_bit():
    model = make_tiny_llama(dtype=torch.float16)
    geom = (2, 2, 32)
    pmap = PrecisionMap.uniform(*geom, key="fp16", sink_tokens=2, recent_window=3)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = _decode_logits(model, ids, MixedPrecisionCache(pmap))
    reference = _decode_logits(model, ids, DynamicCache(config=model.config))
    assert torch.equal(ours, reference)


def test_generate_with_the_cache(tiny_llama, tiny_geometry):
    pmap = resolve_map("kivi-4", tiny_geometry)
    cache = MixedPrecisionCache(pmap)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = tiny_llama.generate(ids, max_new_tokens=40, do_sample=False, cache=cache, pad_token_id=0)
    assert out.shape == (1, 44)
    assert cache.get_seq_length() == 43  # the last generated token is never fed back


@pytest.mark.parametrize("spec,sinks,window", [("int4", 0, 0), ("kivi-2", 2, 5), ("int2-ch-g8", 3, 4), ("nf4", 1, 2),
                                               ("tiers", 2, 3)])
def test_bytes_held_equal_the_maps_accounting_at_every_step(tiny_llama, tiny_geometry, spec, sinks, window):
    if spec == "tiers":  # fp16 window -> int8 -> per-channel int4 -> int2
        g = tiny_geometry
        pmap = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, "int2", sink_tokens=sinks,
                                    recent_window=window, ages=((4, "int8"), (6, "int4-ch-g8")))
    else:
        pmap = resolve_map(spec, tiny_geometry, sink_tokens=sinks, recent_window=window)
    cache = MixedPrecisionCache(pmap)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tiny_llama(ids[:, :7], cache=cache)
        assert cache.nbytes() == pmap.kv_bytes(7)
        for i in range(7, 50):
            tiny_llama(ids[:, i : i + 1], cache=cache)
            assert cache.nbytes() == pmap.kv_bytes(i + 1), f"at {i + 1} positions"
    assert cache.bits_per_element() == pytest.approx(pmap.bits_per_element(50))


def test_store_holds_each_position_at_its_class_precision():
    sink, recent, bulk = get_scheme("fp16"), get_scheme("int8"), get_scheme("int2-ch-g4")
    store = SegmentStore.three_class([0], sink, recent, bulk, sink_tokens=2, recent_window=3)
    x = torch.randn(1, 1, 15, 64)
    for i in range(15):  # token by token
        store.append(x[..., i : i + 1, :], i)
    got = store.read()
    # 15 positions: sinks [0, 2), bulk = 4 * floor((15 - 3 - 2) / 4) = 8 -> [2, 10), recent [10, 15)
    assert torch.equal(got[..., :2, :], sink.roundtrip(x[..., :2, :]))
    assert torch.equal(got[..., 2:10, :], bulk.roundtrip(recent.roundtrip(x[..., 2:10, :])))
    assert torch.equal(got[..., 10:, :], recent.roundtrip(x[..., 10:, :]))
    # a single 15-position append stores exactly the same bytes
    once = SegmentStore.three_class([0], sink, recent, bulk, sink_tokens=2, recent_window=3)
    once.append(x, 0)
    assert torch.equal(once.read(), got)


def test_heads_with_different_schemes(tiny_llama, tiny_geometry):
    base = resolve_map("int4", tiny_geometry)
    schemes = {s: dict(c) for s, c in base.schemes.items()}
    schemes["key"]["bulk"] = (("int8", "int2"), ("int2-ch-g4", "fp16"))
    pmap = PrecisionMap(2, 2, 32, 0, 4, schemes)
    cache = MixedPrecisionCache(pmap)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    _decode_logits(tiny_llama, ids, cache)
    assert cache.nbytes() == pmap.kv_bytes(24)


def test_context_longer_than_configured_is_a_clear_error(tiny_llama, tiny_geometry):
    cache = MixedPrecisionCache(resolve_map("int4", tiny_geometry), max_context=16)
    with torch.no_grad():
        tiny_llama(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        with pytest.raises(CacheError, match="context of 17 positions exceeds the cache's maximum of 16"):
            tiny_llama(torch.zeros(1, 7, dtype=torch.long), cache=cache)


def test_nan_states_are_rejected(tiny_geometry):
    cache = MixedPrecisionCache(resolve_map("int4", tiny_geometry))
    k = torch.randn(1, 2, 3, 32)
    k[0, 1, 2, 5] = float("nan")
    with pytest.raises(CacheError, match="key states contain NaN or inf"):
        cache.update(k, torch.randn(1, 2, 3, 32), 0)


def test_wrong_head_count_is_rejected(tiny_geometry):
    cache = MixedPrecisionCache(resolve_map("int4", tiny_geometry))
    with pytest.raises(CacheError, match=r"expected \[batch, 2, tokens, 32\]"):
        cache.update(torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 32), 0)


def test_an_update_with_no_positions_changes_nothing():
    from kvcompile.kv.precision_map import PrecisionMap

    cache = MixedPrecisionCache(PrecisionMap.uniform(2, 2, 32, "int2-ch", "int4", sink_tokens=2, recent_window=4))
    k, v = cache.layers[0].update(torch.randn(1, 2, 0, 32), torch.randn(1, 2, 0, 32))
    assert k.shape == v.shape == (1, 2, 0, 32) and cache.layers[0].length == 0
    states = torch.randn(1, 2, 5, 32)
    k5, _ = cache.layers[0].update(states, states)
    k5b, _ = cache.layers[0].update(torch.randn(1, 2, 0, 32), torch.randn(1, 2, 0, 32))
    assert torch.equal(k5, k5b) and cache.layers[0].length == 5
