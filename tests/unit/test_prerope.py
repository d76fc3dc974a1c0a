"""Keys stored before RoPE (``<base>-pr``): the format, RoPE on read in the store, the cache, the
calibration and the planner, and the refusals where it is not supported."""

from __future__ import annotations

import pytest
import torch

from kvcompile.cache import MixedPrecisionCache, model_ropes
from kvcompile.errors import ArtifactError, CacheError, SchemeError
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.kv.rope import RopeTable, roundtrip_at, stores_pre_rope
from kvcompile.kv.segments import SegmentRule
from kvcompile.kv.store import SegmentStore
from kvcompile.models.rope import layer_ropes
from kvcompile.quant import get_scheme

from tests.conftest import make_tiny_gemma3


def _table(positions: int = 64, d: int = 32, base: float = 100.0) -> RopeTable:
    inv = base ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.arange(positions).float()[:, None] * inv[None]
    angles = torch.cat([angles, angles], -1)
    return RopeTable(angles.cos(), angles.sin())


def _pre_rope_keys(t: int, d: int = 32, seed: int = 0, start: int = 0) -> torch.Tensor:
    """[1, 2, t, d] keys as a model makes them: a per-channel offset (large in outlier channels) that
    every position shares, plus noise, then RoPE."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(2, d, generator=g)[:, None] * (1 + 8 * (torch.rand(d, generator=g) > 0.8))
    raw = offset + 0.3 * torch.randn(1, 2, t, d, generator=g)
    return _table(start + t, d).rotate(raw, start)


def test_the_format_is_its_base_with_a_flag():
    s = get_scheme("int2-ch-g8-pr")
    base = get_scheme("int2-ch-g8")
    assert s.name == "int2-ch-g8-pr" and stores_pre_rope(s) and not stores_pre_rope(base)
    assert s.bits_per_element(32) == base.bits_per_element(32) and s.token_group == base.token_group == 8
    x = torch.randn(1, 2, 16, 32)
    q = s.quantize(x)
    assert torch.equal(s.dequantize(q), base.roundtrip(x))
    assert ((x - s.dequantize(q)).abs() <= s.error_bound(q)).all()


@pytest.mark.parametrize("name", ["int4-pr", "lm2-rot-pr", "int2-ch-pr-pr"])
def test_only_per_channel_bases_store_before_rope(name):
    with pytest.raises(SchemeError, match="per-channel"):
        get_scheme(name)


def test_rope_table_inverts_and_matches_the_model():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    rope = layer_ropes(model, 40)[1]
    x = torch.randn(1, 2, 10, 32)
    cos, sin = model.model.rotary_emb(x, torch.arange(30, 40)[None])
    assert torch.equal(apply_rotary_pos_emb(x, x, cos, sin)[1], rope.rotate(x, 30))
    assert torch.allclose(rope.unrotate(rope.rotate(x, 30), 30), x, atol=1e-6)
    with pytest.raises(ValueError, match="covers 40 positions"):
        rope.rotate(x, 35)


def test_gemma_layers_take_their_layer_types_table():
    model = make_tiny_gemma3()
    ropes = layer_ropes(model, 16)
    local, full = ropes[0], ropes[1]  # sliding, full, sliding
    assert ropes[2] is local and not torch.equal(local.cos, full.cos)


def test_pre_rope_quantizes_the_unrotated_key_and_is_more_accurate():
    """The stored codes are the base format's codes of R(-p) k; read back, R(p) is applied."""
    rope = _table()
    x = _pre_rope_keys(32)
    s = get_scheme("int2-ch-g8-pr")
    read = roundtrip_at(s, x, rope, 0)
    assert torch.allclose(read, rope.rotate(s.base.roundtrip(rope.unrotate(x))), atol=0)
    # the outlier channels keep their scale before RoPE: less error than quantizing after it
    assert (read - x).pow(2).sum() < 0.8 * (s.base.roundtrip(x) - x).pow(2).sum()


def _reference_read(store_schemes: dict, rule: SegmentRule, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Each position's read value computed straight from the definition, position by position block."""
    store = SegmentStore([0, 1], store_schemes, rule, rope=rope)
    for i in range(x.shape[-2]):
        store.append(x[..., i : i + 1, :], i)
    return store.read(), store


def test_store_rotates_each_segment_by_its_own_positions():
    rope = _table()
    x = _pre_rope_keys(45)
    rule = SegmentRule(2, 3, 8, ((4, 1),))
    schemes = {"sink": get_scheme("fp16"), "recent": get_scheme("fp16"), "age1": get_scheme("int8"),
               "bulk": get_scheme("int2-ch-g8-pr")}
    read, store = _reference_read(schemes, rule, x, rope)
    lengths = {c: (q.num_tokens if q is not None else 0) for c, q in store.segments.items()}
    assert lengths["bulk"] == 32 and lengths["sink"] == 2
    # the bulk rows are R(p) D(Q(R(-p) D_int8(Q_int8(fp16(x))))), p = 2 .. 33
    aged = get_scheme("int8").roundtrip(x[..., 2:34, :].half().float())
    expected = rope.rotate(get_scheme("int2-ch-g8").roundtrip(rope.unrotate(aged, 2)), 2)
    assert torch.allclose(read[..., 2:34, :], expected, atol=1e-6)
    # without the rotation (the base format in its place) every bulk row would differ
    plain, _ = _reference_read({**schemes, "bulk": get_scheme("int2-ch-g8")}, rule, x, rope)
    assert not torch.allclose(plain[..., 2:34, :], expected, atol=1e-3)


def test_store_and_cache_refuse_a_missing_rope_table():
    schemes = {"sink": get_scheme("fp16"), "recent": get_scheme("fp16"), "bulk": get_scheme("int2-ch-pr")}
    with pytest.raises(ValueError, match="int2-ch-pr stores keys before RoPE"):
        SegmentStore([0], schemes, SegmentRule(0, 0, 32))
    pmap = PrecisionMap.uniform(2, 2, 32, key="int2-ch-pr", value="int2-ch")
    with pytest.raises(CacheError, match="stores keys before RoPE"):
        MixedPrecisionCache(pmap, max_context=64)
    with pytest.raises(CacheError, match="expected 2 layer tables of at least 128 positions, got 2 of 64"):
        MixedPrecisionCache(pmap, max_context=128, rope=[_table(64)] * 2)
    assert model_ropes(None, PrecisionMap.uniform(2, 2, 32, key="int2-ch"), 64) is None  # nothing needed, nothing read


def test_a_map_refuses_pre_rope_values():
    with pytest.raises(ArtifactError, match=r"schemes.value.bulk\[0\]\[0\] = 'int2-ch-pr' stores keys before RoPE; "
                                            "values have no RoPE: use 'int2-ch'"):
        PrecisionMap.uniform(2, 2, 32, key="int2-ch-pr")


def _calibrate(lm):
    from kvcompile.calibrate import calibrate

    return calibrate(lm, text="wikipedia-calibration", windows=1, window=64, schemes=["fp16", "int2-ch-g8", "int2-ch-g8-pr"],
                     sink_options=[0], window_options=[0], progress=False)


def test_calibration_costs_pre_rope_keys_from_the_unrotated_keys(tiny_lm, monkeypatch):
    from kvcompile.calibrate import estimate

    cal = _calibrate(tiny_lm)
    base, pre = cal.cost[..., 1, 0, 0], cal.cost[..., 2, 0, 0]  # [L, H, K|V]
    assert torch.equal(pre[:, :, 1], base[:, :, 1])  # values: costed as the base format
    assert (pre[:, :, 0] - base[:, :, 0]).abs().min() > 0  # keys: quantized un-rotated, a different error
    # the correction pass measured a uniform map with pre-RoPE keys and base-format values
    assert cal.extra["uniform_measured"][2] > 0
    # a calibration that forgot the rotation would cost the two alike
    monkeypatch.setattr(estimate, "roundtrip_at", lambda scheme, x, rope, start: scheme.base.roundtrip(x)
                        if stores_pre_rope(scheme) else scheme.roundtrip(x))
    forgot = _calibrate(tiny_lm)
    assert torch.equal(forgot.cost[..., 2, 0, 0], forgot.cost[..., 1, 0, 0])


@pytest.mark.parametrize("age_tiers", [0, 1])
def test_the_planner_gives_pre_rope_formats_to_keys_only(age_tiers):
    """Even where a pre-RoPE format is the cheapest option for a value site, values never get it."""
    from kvcompile.calibrate import Calibration
    from kvcompile.models.adapters import KVGeometry
    from kvcompile.plan.optimize import plan

    geom = KVGeometry(num_layers=2, num_kv_heads=1, num_q_heads=2, head_dim=64, max_positions=1024)
    schemes = ["fp16", "int8", "int2-ch", "int2-ch-pr"]
    per_scheme = torch.tensor([0.0, 1e-4, 1e-2, 1e-3], dtype=torch.float64).view(1, 1, 1, 4, 1, 1)
    cost = per_scheme.expand(2, 1, 2, 4, 2, 1).clone()
    cal = Calibration(model="synthetic", geometry=geom, text="-", windows=1, window=512, estimator="fisher",
                      cost_unit="nats of KL per position", schemes=schemes, sink_options=[0], window_options=[0, 32],
                      cost=cost, curvature=torch.ones(2, 1, 2, 2), diameter=torch.ones(2, 1, 2))
    pmap = plan(cal, budget_bits=3.5, context=512, age_tiers=age_tiers).pmap
    keys = {s for c in pmap.schemes["key"].values() for row in c for s in row}
    values = {s for c in pmap.schemes["value"].values() for row in c for s in row}
    assert "int2-ch-pr" in keys and "int2-ch" in values and not any(s.endswith("-pr") for s in values)


def test_kernel_cache_refuses_pre_rope_keys():
    pmap = PrecisionMap.uniform(2, 2, 32, key="int2-ch-pr", value="int4")
    with pytest.raises(CacheError, match="int2-ch-pr: the PreRopeScheme family has no kernel"):
        MixedPrecisionCache(pmap, max_context=64, kernels=True, rope=[_table()] * 2)
