"""The planner is an exact optimizer: checked against brute force on small problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvcompile.calibrate import Calibration
from kvcompile.errors import KvcompileError
from kvcompile.models.adapters import KVGeometry
from kvcompile.plan.optimize import UNITS_PER_BIT, plan, site_bits
from kvcompile.plan.refine import refine_budget, refine_to_target

SCHEMES = ["fp16", "int8", "int4", "int2"]
GEOM = KVGeometry(num_layers=2, num_kv_heads=1, num_q_heads=2, head_dim=64, max_positions=1024)


def synthetic(seed=0, windows=(0, 32), sinks=(0, 4)) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    # cost grows ~4x per bit removed, with random per-site sensitivity; fp16 costs nothing
    sens = torch.rand(2, 1, 2, 1, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    per_scheme = torch.tensor([0.0, 1e-4, 1e-2, 0.5], dtype=torch.float64).view(1, 1, 1, 4, 1, 1)
    discount = torch.tensor([1.0, 0.3][: len(windows)], dtype=torch.float64).view(1, 1, 1, 1, -1, 1)
    sink_gain = torch.tensor([1.0, 0.8][: len(sinks)], dtype=torch.float64).view(1, 1, 1, 1, 1, -1)
    cost = sens * per_scheme * discount * sink_gain
    return Calibration(model="synthetic", geometry=GEOM, text="-", windows=1, window=512, estimator="fisher",
                       cost_unit="nats of KL per position", schemes=SCHEMES, sink_options=list(sinks),
                       window_options=list(windows), cost=cost, curvature=torch.ones(2, 1, 2, len(windows)),
                       diameter=torch.ones(2, 1, 2))


def brute_force(calib, context, budget=None, target=None, allowed=lambda combo: True):
    """The best (key, cost, units) over every map; ``allowed(combo)``: which scheme indices per site
    (K and V of layer 0, then of layer 1) may be chosen."""
    best = None
    for n, w in itertools.product(calib.sink_options, calib.window_options):
        ni, wi = calib.sink_options.index(n), calib.window_options.index(w)
        for combo in itertools.product(range(len(SCHEMES)), repeat=4):
            if not allowed(combo):
                continue
            sites = [(l, 0, st) for l in range(2) for st in range(2)]
            cost = sum(calib.cost[l, h, st, o, wi, ni].item() for (l, h, st), o in zip(sites, combo))
            units = sum(-(-int(site_bits(SCHEMES[o], 64, context, n, w) * UNITS_PER_BIT * 1e6) // 10**6) for o in combo)
            if budget is not None and units > budget * UNITS_PER_BIT * 4:
                continue
            key = cost if budget is not None else ((cost > target), units, cost)
            if best is None or key < best[0]:
                best = (key, cost, units)
    return best


@pytest.mark.parametrize("budget", [4.0, 6.5, 9.0, 12.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_mode_is_optimal_and_within_budget(budget, seed):
    calib = synthetic(seed)
    result = plan(calib, budget_bits=budget, context=512, corrected=False)
    assert result.pmap.bits_per_element(512) <= budget + 1e-12
    assert result.predicted_cost == pytest.approx(brute_force(calib, 512, budget=budget)[1], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("target", [1e-3, 0.05, 2.0])
def test_target_mode_finds_the_fewest_bits(target):
    calib = synthetic(3)
    result = plan(calib, target_kl=target, context=512, corrected=False)
    assert result.predicted_cost <= target
    best = brute_force(calib, 512, target=target)
    assert result.bits_per_element * 4 * UNITS_PER_BIT == pytest.approx(best[2], abs=4)


def test_plan_is_deterministic_byte_for_byte(tmp_path):
    calib = synthetic(5)
    for name in ("a", "b"):
        plan(calib, budget_bits=5.0, context=256).pmap.save(tmp_path / f"{name}.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_short_context_makes_fp16_windows_expensive():
    calib = synthetic(0)
    long = plan(calib, budget_bits=4.0, context=4096, corrected=False)
    short = plan(calib, budget_bits=4.0, context=64, corrected=False)
    assert long.recent_window == 32 and short.recent_window == 0  # a 32-position fp16 window eats a 64-token budget


def test_allocated_memory_budget_counts_the_per_channel_waiting_block():
    """Under 'allocated' accounting a per-channel bulk pays for up to G - 1 waiting fp16 positions."""
    calib = synthetic(0)
    calib.schemes = ["fp16", "int8", "int4", "int2-ch-g128"]
    for budget in (5.5, 7.0):  # int4 (5 bits) is the cheapest allocated option
        final = plan(calib, budget_bits=budget, context=512, corrected=False)
        allocated = plan(calib, budget_bits=budget, context=512, corrected=False, memory="allocated")
        assert allocated.pmap.bits_per_element(512, memory="allocated") <= budget + 1e-12
        assert allocated.pmap.provenance["memory"] == "allocated"
        assert allocated.predicted_cost >= final.predicted_cost  # a tighter accounting never predicts better
    # 128-position blocks fill a 512 context exactly: cheap when counted at N, not when allocated
    assert site_bits("int2-ch-g128", 64, 512, 0, 0) == pytest.approx(2.25)
    assert site_bits("int2-ch-g128", 64, 512, 0, 0, "allocated") == pytest.approx((512 * 2.25 + 127 * 16) / 512)
    # so a 3-bit budget is met with 128-position blocks when counted at N, and by no map when allocated
    cheap = plan(calib, budget_bits=3.0, context=512, corrected=False)
    assert [x for st in ("key", "value") for row in cheap.pmap.schemes[st]["bulk"] for x in row].count("int2-ch-g128") >= 3
    with pytest.raises(KvcompileError, match=r"below the smallest map possible .*5.000 bits at context 512, allocated"):
        plan(calib, budget_bits=3.0, context=512, corrected=False, memory="allocated")


def test_infeasible_and_invalid_requests():
    calib = synthetic(0)
    with pytest.raises(KvcompileError, match="below the smallest map possible"):
        plan(calib, budget_bits=2.0, context=512)
    with pytest.raises(KvcompileError, match="exactly one of"):
        plan(calib, context=512)
    with pytest.raises(KvcompileError, match="were not calibrated"):
        plan(calib, budget_bits=4, schemes=["nf4"])
    with pytest.raises(KvcompileError, match="memory accounting must be one of final, allocated"):
        plan(calib, budget_bits=4, memory="peak")


def test_planned_map_records_its_provenance():
    calib = synthetic(0)
    pmap = plan(calib, budget_bits=5.0, context=512).pmap
    assert pmap.calibration_hash == calib.content_hash()
    assert pmap.provenance["mode"].startswith("budget") and pmap.provenance["candidates"]


def _measured_as(factor):
    """A stand-in for measured KL: the map's predicted cost scaled by factor(predicted) (super-additive if it grows)."""
    return lambda pmap: pmap.provenance["predicted_cost"] * factor(pmap.provenance["predicted_cost"])


@pytest.mark.parametrize("target", [0.05, 2.0])
def test_refinement_meets_the_target_with_the_fewest_bits(target):
    calib = synthetic(3)
    measure = _measured_as(lambda p: 2.5)
    unrefined = plan(calib, target_kl=target, context=512, corrected=False)
    refined = refine_to_target(calib, target, measure, context=512, corrected=False)
    assert refined.met and refined.measured_kl <= target
    assert measure(unrefined.pmap) > target  # the plain plan misses on "measurement"
    # with a constant factor, the fewest bits that meet the target are the plan for target / 2.5
    assert refined.result.bits_per_element == plan(calib, target_kl=target / 2.5, context=512, corrected=False).bits_per_element
    rounds = refined.result.pmap.provenance["refinement"]["rounds"]
    assert rounds and rounds[-1]["met"] and not rounds[0]["met"]


def test_refinement_with_a_super_additive_measurement():
    calib = synthetic(1)
    measure = _measured_as(lambda p: 1 + p / 0.01)  # the larger the predicted error, the more it compounds
    target = 0.05
    assert measure(plan(calib, target_kl=target, context=512, corrected=False).pmap) > target
    refined = refine_to_target(calib, target, measure, context=512, corrected=False)
    assert refined.met and measure(refined.result.pmap) == refined.measured_kl <= target


def test_refinement_reports_a_miss():
    calib = synthetic(0)
    refined = refine_to_target(calib, 1e-9, lambda pmap: 1e-3,
                               rounds=3, context=512, corrected=False)
    assert not refined.met and refined.miss_factor == pytest.approx(1e6)
    assert refined.result.pmap.provenance["refinement"]["met"] is False
    with pytest.raises(KvcompileError, match="positive"):
        refine_to_target(calib, 0.0, lambda pmap: 0.0)


def test_budget_refinement_chooses_sinks_and_window_by_measurement():
    calib = synthetic(2)
    predicted = plan(calib, budget_bits=6.5, context=512, corrected=False)
    assert (predicted.sink_tokens, predicted.recent_window) == (4, 32)  # what the predictions choose
    # a "measurement" that punishes that choice: refinement must follow the measurement
    measure = lambda pmap: pmap.provenance["predicted_cost"] * (5.0 if pmap.sink_tokens == 4 else 1.0)  # noqa: E731
    refined = refine_budget(calib, 6.5, measure, context=512, corrected=False)
    assert refined.result.pmap.bits_per_element(512) <= 6.5
    options = [plan(calib, budget_bits=6.5, context=512, corrected=False, sink_options=[n], window_options=[w])
               for n in calib.sink_options for w in calib.window_options]
    assert len(refined.rounds) == len(options)
    assert refined.measured_kl == min(measure(o.pmap) for o in options) < measure(predicted.pmap)
    assert refined.result.sink_tokens == 0
    with pytest.raises(KvcompileError, match="below the smallest map possible"):
        refine_budget(calib, 2.0, measure, context=512)


# ----------------------------------------------------------------------------- recency tiers

def synthetic_tiers(seed=0) -> Calibration:
    """One layer (2 sites), three distance buckets: cost falls as the reading queries get farther."""
    g = torch.Generator().manual_seed(seed)
    geom = KVGeometry(num_layers=1, num_kv_heads=1, num_q_heads=2, head_dim=64, max_positions=1024)
    sens = torch.rand(1, 1, 2, 1, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    per_scheme = torch.tensor([0.0, 1e-4, 1e-2, 0.5], dtype=torch.float64).view(1, 1, 1, 4, 1, 1)
    distance = torch.tensor([1.0, 0.45, 0.1], dtype=torch.float64).view(1, 1, 1, 1, 3, 1)
    cost = sens * per_scheme * distance * torch.tensor([1.0, 0.8], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    return Calibration(model="synthetic", geometry=geom, text="-", windows=1, window=512, estimator="fisher",
                       cost_unit="nats of KL per position", schemes=SCHEMES, sink_options=[0, 4],
                       window_options=[0, 32, 128], cost=cost, curvature=torch.ones(1, 1, 2, 3),
                       diameter=torch.ones(1, 1, 2))


def brute_force_tiers(calib, context, budget, age_tiers, sink_schemes=("fp16",)):
    """Every (sinks, boundaries with at most ``age_tiers`` age tiers) and every (sink scheme, age
    schemes, bulk scheme) per site."""
    from kvcompile.kv.precision_map import PrecisionMap

    best = None
    c = calib.cost
    for n in calib.sink_options:
        ni = calib.sink_options.index(n)
        for bounds in [b for k in range(1, age_tiers + 2) for b in itertools.combinations(calib.window_options, k)]:
            wi = [calib.window_options.index(b) for b in bounds]
            per_site = []
            for st in range(2):
                opts = []
                for sink, *combo in itertools.product(sink_schemes if n else ["fp16"],
                                                      *([SCHEMES] * (len(bounds) - 1)), SCHEMES):
                    cost = sum(max(c[0, 0, st, SCHEMES.index(s), wi[t], ni].item()
                                   - c[0, 0, st, SCHEMES.index(s), wi[t + 1], ni].item(), 0.0)
                               for t, s in enumerate(combo[:-1]))
                    cost += c[0, 0, st, SCHEMES.index(combo[-1]), wi[-1], ni].item()
                    if sink != "fp16":  # sink option 0 and window 0 are the first calibrated ones
                        cost += max(c[0, 0, st, SCHEMES.index(sink), 0, 0].item()
                                    - c[0, 0, st, SCHEMES.index(sink), 0, ni].item(), 0.0)
                    ages = tuple((b2 - b1, s) for (b1, b2), s in zip(zip(bounds[:-1], bounds[1:]), combo[:-1]))
                    bits = PrecisionMap.uniform(1, 1, 64, combo[-1], sink_tokens=n, recent_window=bounds[0],
                                                sink=sink, ages=ages).bits_per_element(context)
                    opts.append((cost, bits))
                per_site.append(opts)
            for a, b in itertools.product(*per_site):
                units = sum(-(-int(x[1] * UNITS_PER_BIT * 1e6) // 10**6) for x in (a, b))
                if units > budget * UNITS_PER_BIT * 2:
                    continue
                if best is None or a[0] + b[0] < best:
                    best = a[0] + b[0]
    return best


@pytest.mark.parametrize("budget", [3.0, 5.0, 8.5])
@pytest.mark.parametrize("seed,age_tiers", [(0, 1), (1, 1), (0, 2), (3, 2)])
def test_tier_planner_is_optimal_within_budget_and_counts_bits_as_the_map_does(budget, seed, age_tiers):
    from kvcompile.plan.optimize import plan_tiers

    calib = synthetic_tiers(seed)
    for sinks in (["fp16"], ["fp16", "int8", "int4"]):
        result = plan_tiers(calib, age_tiers, budget_bits=budget, context=512, corrected=False, sink_schemes=sinks)
        assert result.pmap.bits_per_element(512) == pytest.approx(result.bits_per_element, rel=1e-12)
        assert result.bits_per_element <= budget + 1e-12
        want = brute_force_tiers(calib, 512, budget, age_tiers, sinks)
        assert result.predicted_cost == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_tier_planner_quantizes_sinks_where_their_share_is_cheap():
    """Sinks that cost little when quantized go to int8 (sink option 4 is worth 0.8x sink option 0 in
    the synthetic costs: the sinks carry a fifth of the cost).  At 5.05 bits, 4 fp16 sinks and an int4
    bulk (5.09 bits) do not fit; 4 int8 sinks do (5.03 bits)."""
    from kvcompile.plan.optimize import plan_tiers, sink_menu

    calib = synthetic_tiers(0)
    fp16_only = plan_tiers(calib, 1, budget_bits=5.05, context=512, corrected=False, sink_schemes=["fp16"])
    menu = plan_tiers(calib, 1, budget_bits=5.05, context=512, corrected=False)
    assert menu.predicted_cost < fp16_only.predicted_cost
    sinks = {name for st in ("key", "value") for row in menu.pmap.schemes[st]["sink"] for name in row}
    assert menu.pmap.sink_tokens == 4 and sinks == {"int8"} and menu.bits_per_element <= 5.05
    assert sink_menu(calib) == ["fp16", "int8", "int4"]
    with pytest.raises(KvcompileError, match="per-token schemes of the calibration"):
        sink_menu(calib, ["fp16", "nf4"])


def test_tiers_predict_no_worse_than_three_classes_and_use_a_tier_where_it_pays():
    from kvcompile.plan.optimize import plan_tiers

    calib = synthetic_tiers(2)
    three = plan(calib, budget_bits=4.0, context=512, corrected=False)
    tiered = plan_tiers(calib, 1, budget_bits=4.0, context=512, corrected=False)
    assert tiered.predicted_cost <= three.predicted_cost
    assert tiered.pmap.age_windows  # the int8 age tier for queries at distance 32..128 beats a longer fp16 window
    assert tiered.predicted_cost < three.predicted_cost
    again = plan_tiers(calib, 1, budget_bits=4.0, context=512, corrected=False)
    assert again.pmap.to_json_body() == tiered.pmap.to_json_body()


def test_cli_plans_age_tiers(tmp_path, capsys):
    from kvcompile.cli import main
    from kvcompile.kv.precision_map import PrecisionMap

    synthetic_tiers(2).save(tmp_path / "calib")
    assert main(["plan", str(tmp_path / "calib"), "--budget-bits", "4", "--context", "512", "--age-tiers", "1",
                 "-o", str(tmp_path / "m.json")]) == 0
    pmap = PrecisionMap.load(tmp_path / "m.json")
    assert pmap.age_windows and "age tiers" in capsys.readouterr().out
    assert pmap.bits_per_element(512) <= 4.0


def test_budget_refinement_chooses_the_tier_structure_by_measurement():
    from kvcompile.plan.optimize import plan_tiers
    from kvcompile.plan.refine import TIER_CANDIDATES

    calib = synthetic_tiers(2)
    predicted = plan_tiers(calib, 1, budget_bits=4.0, context=512)
    chosen = (predicted.sink_tokens, tuple(predicted.pmap.age_windows))
    # a "measurement" that punishes the predicted structure 3x: refinement must move off it
    def measure(pmap):
        return pmap.provenance["predicted_cost"] * (3.0 if (pmap.sink_tokens, tuple(pmap.age_windows)) == chosen else 1.0)
    refined = refine_budget(calib, 4.0, measure, context=512, age_tiers=1)
    pmap = refined.result.pmap
    assert pmap.bits_per_element(512) <= 4.0 and (pmap.sink_tokens, tuple(pmap.age_windows)) != chosen
    feasible = sorted(c["predicted_cost"] for c in predicted.candidates if c["feasible"])
    assert len(refined.rounds) == min(TIER_CANDIDATES, len(feasible))
    assert refined.measured_kl == min(r["measured_kl"] for r in refined.rounds) < measure(predicted.pmap)
    # each structure tried is the tier planner's exact optimum restricted to it
    for r in refined.rounds:
        alone = plan_tiers(calib, 1, budget_bits=4.0, context=512, structures=[(r["sink_tokens"], tuple(r["boundaries"]))])
        assert alone.predicted_cost == r["predicted_kl"] and r["predicted_kl"] in feasible
    assert pmap.provenance["refinement"]["chosen_by"].startswith("measured KL over the")


# ---------------------------------------------------------------- sliding-window layers


def windowed_synthetic(seed=0) -> Calibration:
    """The synthetic calibration for a model whose layer 0 slides (window 128) and layer 1 attends fully."""
    from dataclasses import replace

    calib = synthetic(seed)
    return replace(calib, geometry=replace(GEOM, layer_windows=(128, 0)))


def brute_force_windowed(calib, context, budget):
    """Every map: window-layer sites one per-token scheme at cost(s, w=0, n=0) over min(N, W)
    positions; full-layer sites as before; budget on bits per stored element."""
    best = None
    stored = [min(context, 128), context]
    for n, w in itertools.product(calib.sink_options, calib.window_options):
        ni, wi = calib.sink_options.index(n), calib.window_options.index(w)
        for combo in itertools.product(range(len(SCHEMES)), repeat=4):
            sites = [(l, 0, st) for l in range(2) for st in range(2)]
            cost, bits = 0.0, 0.0
            for (l, h, st), o in zip(sites, combo):
                if l == 0:
                    cost += calib.cost[l, h, st, o, 0, 0].item()
                    from kvcompile.quant import get_scheme
                    b = 16.0 if SCHEMES[o] == "fp16" else get_scheme(SCHEMES[o]).bits_per_element(64)
                else:
                    cost += calib.cost[l, h, st, o, wi, ni].item()
                    b = site_bits(SCHEMES[o], 64, context, n, w)
                bits += b * stored[l]
            if bits / (2 * sum(stored)) > budget + 1e-9:
                continue
            if best is None or cost < best:
                best = cost
    return best


@pytest.mark.parametrize("budget", [5.0, 7.0, 10.0])
@pytest.mark.parametrize("age_tiers", [0, 1])
def test_window_layers_are_planned_per_token_and_counted_by_their_window(budget, age_tiers):
    calib = windowed_synthetic(1)
    result = plan(calib, budget_bits=budget, context=512, corrected=False, age_tiers=age_tiers)
    pmap = result.pmap
    assert pmap.layer_windows == (128, 0)
    for stream in ("key", "value"):  # the window layer: one per-token scheme in every class
        assert len({pmap.scheme(0, 0, stream, c).name for c in pmap.classes}) == 1
    assert pmap.bits_per_element(512) <= budget + 1e-12
    assert result.bits_per_element == pytest.approx(pmap.bits_per_element(512), abs=1e-9)
    # exact: the brute force's optimum (the plan is feasible, so it cannot be cheaper; the 1/64-bit
    # rounding does not bind at these budgets); with age tiers the menu is larger, so at least as good
    best = brute_force_windowed(calib, 512, budget)
    if age_tiers == 0:
        assert result.predicted_cost == pytest.approx(best, rel=1e-9, abs=1e-15)
    else:
        assert result.predicted_cost <= best * (1 + 1e-9) + 1e-15
