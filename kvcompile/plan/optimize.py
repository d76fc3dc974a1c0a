"""The planner: choose a bulk scheme per KV site, and the sink count and recent window, by optimization.

Problem (for one choice of n fp16 sinks and an fp16 recent window of w positions):

    minimize   sum_j cost_j(s_j)            (predicted KL, additive over sites j = (layer, head, K|V))
    subject to sum_j bits_j(s_j) <= B * J   (B = average bits per element at context N)

with ``cost_j(s)`` from the :class:`~kvcompile.calibrate.Calibration` and ``bits_j(s)`` the exact
average bits of site j over a context of N positions (fp16 sinks and window, the bulk in s, a
per-channel scheme's incomplete last block in fp16), i.e. what :meth:`PrecisionMap.bits_per_element`
counts (``memory="allocated"``: the buffers for any length up to N, the incomplete block at its
largest, G - 1 positions).  This is a multiple-choice knapsack.  We solve it *exactly* by dynamic
programming over integer weights: each site's bits are counted in units of 1/64 bit per element, **rounded up**, so
the chosen map never exceeds the budget, and it is optimal among all maps under that (1/64-bit,
conservative) accounting — an optimality guarantee, not a heuristic.  The outer choice of (n, w)
is exhaustive over the calibrated options.  The same DP table answers the dual question
(``target_kl``): the fewest bits whose predicted cost meets the target.

Deterministic: ties break towards the earlier scheme / option, and the output contains no clock.

Recency tiers (``age_tiers=K >= 1``, :func:`plan_tiers`): the structure is n sinks, an fp16
window of w positions and up to K age tiers whose boundaries ``w = W_1 < W_2 < ... < W_{K+1}``
are calibrated window options; each site chooses a per-token scheme per age tier and a bulk
scheme.  A tier read by the queries at distances ``[W_t, W_{t+1})`` is charged
``max(cost(s, W_t) - cost(s, W_{t+1}), 0)``, the bulk ``cost(s, W_{K+1})``: the calibration's costs
are sums over query distances (docs/theory.md), so a tier's share is the difference of two of them.
This charges each tier's own rounding only; a position re-quantized along the chain
(``Q_bulk(Q_age(x))``) carries both errors, which the difference ignores (small when the age tier is
finer than the bulk).  Each site's options are its (age schemes, bulk scheme) combinations, cut to
the Pareto front of (bits, cost) before the same exact knapsack; the outer choice over (n, W_1..)
is exhaustive.  ``W_1 = 0`` makes the first age tier a quantized recent window.

Sliding-window layers (``calib.geometry.layer_windows``): a site of a window layer stores one
per-token scheme s for every position of its window (:class:`~kvcompile.kv.precision_map.PrecisionMap`),
charged ``cost(s, 0, 0)`` (no fp16 window, no sinks; the calibration's sink option 0, or its
smallest) and ``bits(s)`` over ``min(N, W)`` positions.  Since sites then store different numbers of
elements, each site's weight is its bits times its share of the stored elements, ``e_j / mean(e)``,
so the budget bounds the bits per stored element (what :meth:`PrecisionMap.bits_per_element` counts).

Sink formats (``plan_tiers``; :data:`SINK_SCHEMES`): each site may also store its n sinks in a
per-token format s instead of fp16, charged ``max(cost(s, 0, 0) - cost(s, 0, n), 0)``: the bulk
cost of s over all query distances without protected sinks, minus with n of them, which is the
sinks' own share of it.

Protected heads (``protect``, e.g. the retrieval heads of
:mod:`kvcompile.calibrate.retrieval_heads`): every site of a listed (layer, kv head), K and V,
may only store its sinks, age tiers and bulk in ``protect_scheme`` or fp16.  A constraint, not a
cost: what these heads lose (copying from far back) is what the KL of running text does not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcompile.calibrate.artifact import Calibration
from kvcompile.errors import KvcompileError
from kvcompile.kv.precision_map import STREAMS, PrecisionMap
from kvcompile.kv.segments import MEMORY_ACCOUNTING, SegmentRule, class_lengths
from kvcompile.kv.rope import stores_pre_rope
from kvcompile.quant import get_scheme

UNITS_PER_BIT = 64


@dataclass
class PlanResult:
    pmap: PrecisionMap
    predicted_cost: float
    bits_per_element: float
    sink_tokens: int
    recent_window: int
    candidates: list[dict]  # one per (n, w): best cost / bits found


def site_bits(scheme_name: str, head_dim: int, context: int, sinks: int, window: int, memory: str = "final") -> float:
    """Average stored bits per element of one site over ``context`` positions (fp16 sinks / window).

    ``memory``: ``final`` counts the cache holding exactly ``context`` positions, ``allocated`` the
    buffers that hold any length up to it (:data:`~kvcompile.kv.precision_map.MEMORY_ACCOUNTING`)."""
    s = get_scheme(scheme_name)
    seg = class_lengths(context, sinks, window, s.token_group, memory)
    return ((seg["sink"] + seg["recent"]) * 16 + seg["bulk"] * s.bits_per_element(head_dim)) / context


def _dp(costs: np.ndarray, weights: np.ndarray, capacity: int):
    """Exact multiple-choice knapsack: min sum cost with sum weight <= w, for every w <= capacity.

    costs, weights: [sites, options].  Returns (best[capacity+1], choice[sites, capacity+1]) where
    best[w] is the least cost using total weight exactly <= w (monotone), choice the argmin per site.
    """
    sites, options = costs.shape
    best = np.zeros(capacity + 1)  # zero sites: cost 0 at any capacity
    choice = np.zeros((sites, capacity + 1), dtype=np.int16)
    for j in range(sites):
        new = np.full(capacity + 1, np.inf)
        arg = np.zeros(capacity + 1, dtype=np.int16)
        for o in range(options):
            w = int(weights[j, o])
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + costs[j, o]
            better = cand < new
            new[better] = cand[better]
            arg[better] = o
        best = new
        choice[j] = arg
    return best, choice


def _backtrack(choice: np.ndarray, weights: np.ndarray, capacity: int) -> list[int]:
    picks = []
    w = capacity
    for j in range(choice.shape[0] - 1, -1, -1):
        o = int(choice[j, w])
        picks.append(o)
        w -= int(weights[j, o])
    return picks[::-1]


def _site_elements(calib: Calibration, context: int) -> np.ndarray:
    """Per site (layer, head, stream order), its stored positions at ``context`` over the mean."""
    g = calib.geometry
    per_layer = [min(context, g.window(l)) if g.window(l) else context for l in range(g.num_layers)]
    e = np.array([per_layer[l] for l in range(g.num_layers) for _ in range(g.num_kv_heads) for _ in range(2)], float)
    return e / e.mean()


def _window_option(calib: Calibration, site_cost: np.ndarray, name: str) -> float:
    """``cost(s, 0, 0)`` of one site of a window layer: ``site_cost`` [schemes, windows, sinks]."""
    if name == "fp16":
        return 0.0
    return float(site_cost[calib.schemes.index(name), calib.window_options.index(min(calib.window_options)),
                           calib.sink_options.index(min(calib.sink_options))])


def _weights(bits: np.ndarray, scale: np.ndarray, allowed: np.ndarray, capacity_hint: int) -> np.ndarray:
    """Integer knapsack weights: bits x element share in 1/64 units, rounded up; options a site
    may not take get a weight no capacity admits."""
    w = np.ceil(bits * scale[:, None] * UNITS_PER_BIT - 1e-9).astype(np.int64)
    return np.where(allowed, w, capacity_hint + 1)


def _request(calib: Calibration, budget_bits, target_kl, memory: str, context, schemes, sink_options, window_options):
    """Check a planning request against the calibration; ``(context, schemes, sinks, windows)`` with defaults filled."""
    if (budget_bits is None) == (target_kl is None):
        raise KvcompileError("give exactly one of --budget-bits or --target-kl")
    if memory not in MEMORY_ACCOUNTING:
        raise KvcompileError(f"memory accounting must be one of {', '.join(MEMORY_ACCOUNTING)}, got {memory!r}")
    schemes = schemes or calib.schemes
    missing = [s for s in schemes if s not in calib.schemes]
    if missing:
        raise KvcompileError(f"schemes {missing} were not calibrated; calibrated: {', '.join(calib.schemes)}")
    for opts, have, what in ((sink_options, calib.sink_options, "sink"), (window_options, calib.window_options, "window")):
        if opts and any(o not in have for o in opts):
            raise KvcompileError(f"{what} options {opts} were not all calibrated; calibrated: {have}")
    return (context or calib.window, schemes, sink_options or calib.sink_options,
            window_options or calib.window_options)


def plan(calib: Calibration, budget_bits: float | None = None, target_kl: float | None = None, context: int | None = None,
         schemes: list[str] | None = None, sink_options: list[int] | None = None,
         window_options: list[int] | None = None, corrected: bool = True, memory: str = "final",
         age_tiers: int = 0, sink_schemes: list[str] | None = None, protect: list[tuple[int, int]] | None = None,
         protect_scheme: str = "int8") -> PlanResult:
    """Optimal precision map under a memory budget (``budget_bits``) or a quality target (``target_kl``).

    ``memory``: how bits are counted at the context, ``final`` (the cache holding ``context``
    positions, default) or ``allocated`` (buffers for any length up to it; see
    :data:`~kvcompile.kv.precision_map.MEMORY_ACCOUNTING`).  ``age_tiers`` > 0: also consider up to
    that many recency tiers, a quantized recent window among them (an age tier starting at distance 0),
    and quantized sinks (:func:`plan_tiers`).  ``sink_schemes``: the sink formats to choose from per site
    (default fp16 only without age tiers, :data:`SINK_SCHEMES` with them).  ``protect``: (layer, kv
    head) pairs whose K and V store everything in ``protect_scheme`` or fp16 (module docstring)."""
    if age_tiers or (sink_schemes and set(sink_schemes) != {"fp16"}):
        return plan_tiers(calib, age_tiers, budget_bits=budget_bits, target_kl=target_kl, context=context,
                          schemes=schemes, sink_options=sink_options, window_options=window_options,
                          corrected=corrected, memory=memory, sink_schemes=sink_schemes, protect=protect,
                          protect_scheme=protect_scheme)
    context, schemes, sink_options, window_options = _request(calib, budget_bits, target_kl, memory, context, schemes,
                                                              sink_options, window_options)
    g = calib.geometry
    s_idx = [calib.schemes.index(s) for s in schemes]
    sites = [(l, h, st) for l in range(g.num_layers) for h in range(g.num_kv_heads) for st in range(2)]
    cost_all = (calib.corrected_cost() if corrected else calib.cost).numpy()
    scale = _site_elements(calib, context)
    windowed = np.array([bool(g.window(l)) for (l, h, st) in sites])
    per_token = np.array([get_scheme(s).token_group == 1 for s in schemes])
    allowed = np.where(windowed[:, None], per_token[None, :], True)
    allowed &= ~(_value_sites(sites)[:, None] & _pre_rope(schemes)[None, :])  # values have no RoPE
    protected = _protected_sites(calib, protect, protect_scheme, schemes)
    allowed &= ~(protected[:, None] & ~np.isin(schemes, ["fp16", protect_scheme])[None, :])
    big = 1 << 40
    candidates = []
    best_pick = None
    for n in sink_options:
        for w in window_options:
            ni, wi = calib.sink_options.index(n), calib.window_options.index(w)
            costs = np.array([[_window_option(calib, cost_all[l, h, st], s) if windowed[j] else cost_all[l, h, st, si, wi, ni]
                               for s, si in zip(schemes, s_idx)] for j, (l, h, st) in enumerate(sites)])
            costs = np.where(allowed, costs, np.inf)
            plain = [site_bits(s, g.head_dim, context, n, w, memory) for s in schemes]
            bits = np.array([[get_scheme(s).bits_per_element(g.head_dim) if windowed[j] else b
                              for s, b in zip(schemes, plain)] for j in range(len(sites))])
            weights = _weights(bits, scale, allowed, big)
            if budget_bits is not None:
                capacity = int(np.floor(budget_bits * UNITS_PER_BIT * len(sites) + 1e-9))
                if weights.min(1).sum() > capacity:
                    candidates.append({"sink_tokens": n, "recent_window": w, "feasible": False})
                    continue
            else:
                capacity = int(np.where(allowed, weights, 0).max(1).sum())
            best, choice = _dp(costs, weights, capacity)
            if budget_bits is not None:
                cap = capacity
            else:
                ok = np.nonzero(best <= target_kl)[0]
                cap = int(ok[0]) if len(ok) else capacity  # misses the target: take the best there is
            picks = _backtrack(choice, weights, cap)
            total_cost = float(sum(costs[j, o] for j, o in enumerate(picks)))
            exact_bits = float(np.mean([bits[j, o] * scale[j] for j, o in enumerate(picks)]))
            candidates.append({"sink_tokens": n, "recent_window": w, "feasible": True,
                               "predicted_cost": total_cost, "bits_per_element": exact_bits})
            key = (total_cost, exact_bits) if budget_bits is not None else (total_cost > target_kl, exact_bits, total_cost)
            if best_pick is None or key < best_pick[0]:
                best_pick = (key, n, w, picks, total_cost, exact_bits)
    if best_pick is None:
        floor = min(site_bits(s, g.head_dim, context, n, w, memory) for s in schemes for n in sink_options
                    for w in window_options)
        raise KvcompileError(f"budget of {budget_bits} bits/element is below the smallest map possible with these "
                             f"schemes and options ({floor:.3f} bits at context {context}, {memory} memory)")
    _, n, w, picks, total_cost, exact_bits = best_pick
    grids = {st: [[None] * g.num_kv_heads for _ in range(g.num_layers)] for st in STREAMS}
    for (l, h, st), o in zip(sites, picks):
        grids[STREAMS[st]][l][h] = schemes[o]
    base = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, key="fp16", sink_tokens=n, recent_window=w,
                                model=calib.model)
    mode = f"budget {budget_bits} bits/element" if budget_bits is not None else f"target KL {target_kl}"
    if memory != "final":
        mode += f", {memory} memory"
    pmap = base.with_bulk(
        {st: tuple(tuple(row) for row in grids[st]) for st in STREAMS},
        calibration_hash=calib.content_hash(), predictors=calib.predictors_reference(),
        description=f"planned ({mode}, context {context}): {exact_bits:.3f} bits/element, predicted {calib.cost_unit} {total_cost:.4g}",
        provenance={"planner": "multiple-choice knapsack, exact DP at 1/64 bit (rounded up)", "mode": mode,
                    "context": context, "memory": memory, "estimator": calib.estimator, "cost_unit": calib.cost_unit,
                    "predicted_cost": total_cost, "bits_per_element": exact_bits, "schemes": schemes,
                    "corrected": corrected, **_protect_record(protect, protect_scheme),
                    "target_kl": target_kl, "budget_bits": budget_bits, "candidates": candidates},
    ).windowed(g.layer_windows)  # window layers: their (per-token) bulk choice in every class
    return PlanResult(pmap, total_cost, exact_bits, n, w, candidates)


def _tier_structures(sink_options: list[int], window_options: list[int], max_tiers: int) -> list[tuple[int, tuple]]:
    """``(n, (W_1, ..., W_{K+1}))``: increasing boundaries from the window options, K <= max_tiers."""
    from itertools import combinations

    out = []
    for n in sink_options:
        for k in range(0, max_tiers + 1):
            out += [(n, bounds) for bounds in combinations(sorted(window_options), k + 1)]
    return out


def _pareto(costs: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Indices of the options no other option beats in both bits and cost (ties: the first)."""
    order = np.lexsort((costs, bits))
    keep, best = [], np.inf
    for o in order:
        if costs[o] < best:
            keep.append(o)
            best = costs[o]
    return np.array(keep)


#: sink formats the tier planner may choose per site (those the calibration measured)
SINK_SCHEMES = ("fp16", "int8", "int4")


def _protected_sites(calib: Calibration, protect, protect_scheme: str, schemes) -> np.ndarray:
    """[sites] bool over (layer, head, stream) sites: those of the ``protect`` (layer, kv head) pairs;
    one line for a pair outside the model or a protect scheme outside the menu."""
    g = calib.geometry
    mask = np.zeros((g.num_layers, g.num_kv_heads, 2), dtype=bool)
    for pair in protect or ():
        if (len(pair) != 2 or any(type(x) is not int for x in pair)
                or not (0 <= pair[0] < g.num_layers and 0 <= pair[1] < g.num_kv_heads)):
            raise KvcompileError(f"protected head {tuple(pair)} is not a (layer, kv head) of {calib.model} "
                                 f"({g.num_layers} layers, {g.num_kv_heads} kv heads)")
        mask[pair[0], pair[1]] = True
    if mask.any() and protect_scheme not in schemes:
        raise KvcompileError(f"protect scheme {protect_scheme!r} is not in the planner's menu ({', '.join(schemes)})")
    if mask.any() and protect_scheme != "fp16" and get_scheme(protect_scheme).token_group != 1:
        raise KvcompileError(f"protect scheme {protect_scheme!r} must be per-token (it stores sinks and age tiers too)")
    return mask.reshape(-1)


def _protect_record(protect, protect_scheme: str) -> dict:
    """The map's provenance entries for protected heads (none when nothing is protected)."""
    return {"protected_heads": [list(p) for p in protect], "protect_scheme": protect_scheme} if protect else {}


def _value_sites(sites) -> np.ndarray:
    """[sites] bool: which of ``(layer, head, stream index)`` sites store values."""
    return np.array([STREAMS[st] == "value" for _, _, st in sites])


def _pre_rope(schemes) -> np.ndarray:
    """[schemes] bool: which schemes store keys before RoPE (never chosen for values)."""
    return np.array([stores_pre_rope(get_scheme(s)) for s in schemes], dtype=bool)


def sink_menu(calib: Calibration, sink_schemes: list[str] | None = None) -> list[str]:
    """The sink formats a plan may choose: fp16 first, then the per-token ones the calibration holds;
    quantized sinks need the calibration's sink option 0 (their cost is a difference against it)."""
    wanted = list(sink_schemes) if sink_schemes is not None else list(SINK_SCHEMES)
    bad = [s for s in wanted if s != "fp16" and (s not in calib.schemes or get_scheme(s).token_group != 1)]
    if sink_schemes is not None and bad:
        raise KvcompileError(f"sink schemes {bad} are not per-token schemes of the calibration; "
                             f"calibrated: {', '.join(calib.schemes)}")
    if 0 not in calib.sink_options:
        return ["fp16"]
    return ["fp16", *[s for s in wanted if s != "fp16" and s not in bad]]


def plan_tiers(calib: Calibration, age_tiers: int, budget_bits: float | None = None, target_kl: float | None = None,
               context: int | None = None, schemes: list[str] | None = None, sink_options: list[int] | None = None,
               window_options: list[int] | None = None, corrected: bool = True, memory: str = "final",
               sink_schemes: list[str] | None = None, structures: list[tuple[int, tuple]] | None = None,
               protect: list[tuple[int, int]] | None = None, protect_scheme: str = "int8") -> PlanResult:
    """Optimal map with up to ``age_tiers`` recency tiers between the fp16 window and the bulk, and a
    sink format per site from ``sink_schemes`` (default :data:`SINK_SCHEMES`; see the module
    docstring); the other arguments are :func:`plan`'s.  ``structures``: only these
    ``(sinks, boundaries)`` (as in ``PlanResult.candidates``) instead of every calibrated one;
    ``protect``, ``protect_scheme``: as in :func:`plan`."""
    from itertools import product

    context, schemes, sink_options, window_options = _request(calib, budget_bits, target_kl, memory, context, schemes,
                                                              sink_options, window_options)
    window_options = [w for w in window_options if w < context]
    g = calib.geometry
    ages_menu = ["fp16", *[s for s in schemes if s != "fp16" and get_scheme(s).token_group == 1]]
    sinks_menu = sink_menu(calib, sink_schemes)
    cost_all = (calib.corrected_cost() if corrected else calib.cost).numpy()  # [L, H, 2, S, W, N]
    n_sites = g.num_layers * g.num_kv_heads * 2
    site_cost = cost_all.reshape(n_sites, *cost_all.shape[3:])  # sites in (layer, head, stream) order
    per_bits = {s: get_scheme(s).bits_per_element(g.head_dim) for s in set(schemes) | set(ages_menu) | set(sinks_menu)}
    w_first = calib.window_options.index(min(calib.window_options))
    n_none = calib.sink_options.index(0) if 0 in calib.sink_options else None  # only read for quantized sinks
    scale = _site_elements(calib, context)
    windowed = np.array([bool(g.window(l)) for l in range(g.num_layers) for _ in range(g.num_kv_heads) for _ in range(2)])
    values = np.nonzero(_value_sites([(l, h, st) for l in range(g.num_layers) for h in range(g.num_kv_heads)
                                      for st in range(2)]))[0]
    protected = np.nonzero(_protected_sites(calib, protect, protect_scheme, schemes))[0]
    candidates, best_pick = [], None
    for n, bounds in _tier_structures(sink_options, window_options, age_tiers):
        if structures is not None and (n, tuple(bounds)) not in {(m, tuple(b)) for m, b in structures}:
            continue
        ni = calib.sink_options.index(n)
        wi = [calib.window_options.index(b) for b in bounds]
        k = len(bounds) - 1
        combos = list(product(sinks_menu if n else ["fp16"], *([ages_menu] * k), schemes))
        cost = np.zeros((n_sites, len(combos)))
        bits = np.zeros(len(combos))
        for c, (sink, *combo) in enumerate(combos):
            if sink != "fp16":  # the sinks' share: the bulk cost without fp16 sinks minus with them, all distances
                si = calib.schemes.index(sink)
                cost[:, c] += np.maximum(site_cost[:, si, w_first, n_none] - site_cost[:, si, w_first, ni], 0.0)
            for t, name in enumerate(combo[:-1]):
                if name != "fp16":
                    si = calib.schemes.index(name)
                    cost[:, c] += np.maximum(site_cost[:, si, wi[t], ni] - site_cost[:, si, wi[t + 1], ni], 0.0)
            if combo[-1] != "fp16":
                cost[:, c] += site_cost[:, calib.schemes.index(combo[-1]), wi[-1], ni]
            ages = tuple((b2 - b1, 1) for b1, b2 in zip(bounds[:-1], bounds[1:]))
            counts = SegmentRule(n, bounds[0], get_scheme(combo[-1]).token_group, ages).counted(context, memory)
            tiers = ("recent", *(f"age{i}" for i in range(1, k + 1)), "bulk")
            names = {"sink": sink, **dict(zip(tiers, ("fp16", *combo)))}
            bits[c] = sum(counts[t] * (16.0 if names[t] == "fp16" else per_bits[names[t]]) for t in counts) / context
        # window-layer sites choose among ("window", s) options only (one per-token scheme s throughout)
        window_combos = [("window", s) for s in ages_menu]
        combos = combos + window_combos
        cost[np.ix_(values, _pre_rope([combo[-1] for combo in combos]))] = np.inf  # values have no RoPE
        cost = np.concatenate([np.where(windowed[:, None], np.inf, cost), np.full((n_sites, len(window_combos)), np.inf)], 1)
        for j in np.nonzero(windowed)[0]:
            cost[j, -len(window_combos):] = [_window_option(calib, site_cost[j], name) for _, name in window_combos]
        precise = {"fp16", "window", protect_scheme}
        cost[np.ix_(protected, [not set(combo) <= precise for combo in combos])] = np.inf
        bits = np.concatenate([bits, [per_bits.get(name, 16.0) for _, name in window_combos]])
        site_b = bits[None, :] * scale[:, None]  # bits x element share (see the module docstring)
        # per site, the Pareto front of (bits, cost), padded with options that are never chosen
        fronts = [_pareto(cost[j], site_b[j]) for j in range(n_sites)]
        width = max(len(f) for f in fronts)
        opt = np.zeros((n_sites, width), dtype=np.int64)
        costs = np.full((n_sites, width), np.inf)
        for j, f in enumerate(fronts):
            opt[j, :len(f)] = f
            opt[j, len(f):] = f[0]
            costs[j, :len(f)] = cost[j, f]
        site_bits_ = np.take_along_axis(site_b, opt, 1)
        weights = np.ceil(site_bits_ * UNITS_PER_BIT - 1e-9).astype(np.int64)
        label = {"sink_tokens": n, "boundaries": list(bounds)}
        if budget_bits is not None:
            capacity = int(np.floor(budget_bits * UNITS_PER_BIT * n_sites + 1e-9))
            if weights.min(1).sum() > capacity:
                candidates.append({**label, "feasible": False})
                continue
        else:
            capacity = int(np.where(np.isfinite(costs), weights, 0).max(1).sum())
        best, choice = _dp(costs, weights, capacity)
        if budget_bits is not None:
            cap = capacity
        else:
            ok = np.nonzero(best <= target_kl)[0]
            cap = int(ok[0]) if len(ok) else capacity
        picks = _backtrack(choice, weights, cap)
        total_cost = float(sum(costs[j, o] for j, o in enumerate(picks)))
        exact_bits = float(np.mean([site_bits_[j, o] for j, o in enumerate(picks)]))
        candidates.append({**label, "feasible": True, "predicted_cost": total_cost, "bits_per_element": exact_bits})
        key = (total_cost, exact_bits) if budget_bits is not None else (total_cost > target_kl, exact_bits, total_cost)
        if best_pick is None or key < best_pick[0]:
            best_pick = (key, n, bounds, [combos[opt[j, o]] for j, o in enumerate(picks)], total_cost, exact_bits)
    if best_pick is None:
        raise KvcompileError(f"budget of {budget_bits} bits/element is below the smallest map possible with these "
                             f"schemes and options at context {context} ({memory} memory)")
    _, n, bounds, chosen, total_cost, exact_bits = best_pick
    k = len(bounds) - 1
    tiers = ["sink"] + [f"age{i}" for i in range(1, k + 1)] + ["bulk"]
    grids = {st: {t: [[None] * g.num_kv_heads for _ in range(g.num_layers)] for t in tiers} for st in STREAMS}
    sites = [(l, h, st) for l in range(g.num_layers) for h in range(g.num_kv_heads) for st in range(2)]
    for (l, h, st), combo in zip(sites, chosen):
        if combo[0] == "window":  # every class; windowed() below checks it is per-token
            combo = (combo[1],) * len(tiers)
        for t, name in zip(tiers, combo):
            grids[STREAMS[st]][t][l][h] = name
    base = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, key="fp16", sink_tokens=n,
                                recent_window=bounds[0],
                                ages=tuple((b2 - b1, "fp16") for b1, b2 in zip(bounds[:-1], bounds[1:])),
                                model=calib.model)
    schemes_out = {st: {**base.schemes[st], **{t: tuple(tuple(r) for r in grids[st][t]) for t in tiers}}
                   for st in STREAMS}
    mode = f"budget {budget_bits} bits/element" if budget_bits is not None else f"target KL {target_kl}"
    if memory != "final":
        mode += f", {memory} memory"
    from dataclasses import replace

    pmap = replace(
        base, schemes=schemes_out, _resolved={}, calibration_hash=calib.content_hash(),
        predictors=calib.predictors_reference(),
        description=f"planned with up to {age_tiers} age tiers ({mode}, context {context}): {exact_bits:.3f} "
                    f"bits/element, predicted {calib.cost_unit} {total_cost:.4g}",
        provenance={"planner": "multiple-choice knapsack over tier combinations (Pareto-pruned), exact DP at 1/64 bit",
                    "mode": mode, "context": context, "memory": memory, "estimator": calib.estimator,
                    "cost_unit": calib.cost_unit, "predicted_cost": total_cost, "bits_per_element": exact_bits,
                    "schemes": schemes, "sink_schemes": sinks_menu, "age_tiers": age_tiers, "corrected": corrected,
                    **_protect_record(protect, protect_scheme),
                    "target_kl": target_kl,
                    "budget_bits": budget_bits, "candidates": candidates}).windowed(g.layer_windows)
    return PlanResult(pmap, total_cost, exact_bits, n, bounds[0], candidates)
