"""The parallel simulation equals token-by-token decoding through the real cache (tiny model, float64)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.cache import MixedPrecisionCache
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.plan.presets import resolve_map
from kvcompile.measure.simulate import late_mask, simulate_cache

from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(dtype=torch.float64, seed=4)


def _decode(model, ids, pmap, prefill):
    cache = MixedPrecisionCache(pmap)
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


@pytest.mark.parametrize("spec,sinks,window", [("int4", 0, 0), ("int2", 0, 0), ("kivi-2", 3, 5), ("int2-ch-g8", 2, 3),
                                               ("int4-rot", 1, 2), ("mixed", None, None)])
@pytest.mark.parametrize("prefill", [1, 9])
def test_simulation_equals_token_by_token_decoding(model64, spec, sinks, window, prefill):
    pmap = _mixed_map() if spec == "mixed" else resolve_map(spec, _geom(), sink_tokens=sinks, recent_window=window)
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


def test_late_mask_matches_the_segment_rule():
    m = late_mask(12, 2, 3, 4, 1)
    # query 11 (12 cached): bulk = [2, 2 + 4 * floor((12 - 3 - 2) / 4)) = [2, 6)
    assert m[11].nonzero().flatten().tolist() == [2, 3, 4, 5]
    # query 5 (6 cached): no complete block yet
    assert not m[5].any()
