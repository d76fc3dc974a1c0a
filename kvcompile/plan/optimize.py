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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcompile.calibrate.artifact import Calibration
from kvcompile.errors import KvcompileError
from kvcompile.kv.precision_map import STREAMS, PrecisionMap
from kvcompile.kv.segments import MEMORY_ACCOUNTING, class_lengths
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


def plan(calib: Calibration, budget_bits: float | None = None, target_kl: float | None = None, context: int | None = None,
         schemes: list[str] | None = None, sink_options: list[int] | None = None,
         window_options: list[int] | None = None, corrected: bool = True, memory: str = "final") -> PlanResult:
    """Optimal precision map under a memory budget (``budget_bits``) or a quality target (``target_kl``).

    ``memory``: how bits are counted at the context, ``final`` (the cache holding ``context``
    positions, default) or ``allocated`` (buffers for any length up to it; see
    :data:`~kvcompile.kv.precision_map.MEMORY_ACCOUNTING`)."""
    if (budget_bits is None) == (target_kl is None):
        raise KvcompileError("give exactly one of --budget-bits or --target-kl")
    if memory not in MEMORY_ACCOUNTING:
        raise KvcompileError(f"memory accounting must be one of {', '.join(MEMORY_ACCOUNTING)}, got {memory!r}")
    g = calib.geometry
    context = context or calib.window
    schemes = schemes or calib.schemes
    missing = [s for s in schemes if s not in calib.schemes]
    if missing:
        raise KvcompileError(f"schemes {missing} were not calibrated; calibrated: {', '.join(calib.schemes)}")
    for opts, have, what in ((sink_options, calib.sink_options, "sink"), (window_options, calib.window_options, "window")):
        if opts and any(o not in have for o in opts):
            raise KvcompileError(f"{what} options {opts} were not all calibrated; calibrated: {have}")
    sink_options = sink_options or calib.sink_options
    window_options = window_options or calib.window_options
    s_idx = [calib.schemes.index(s) for s in schemes]
    sites = [(l, h, st) for l in range(g.num_layers) for h in range(g.num_kv_heads) for st in range(2)]
    cost_all = (calib.corrected_cost() if corrected else calib.cost).numpy()
    candidates = []
    best_pick = None
    for n in sink_options:
        for w in window_options:
            ni, wi = calib.sink_options.index(n), calib.window_options.index(w)
            costs = np.array([[cost_all[l, h, st, si, wi, ni] for si in s_idx] for (l, h, st) in sites])
            bits = np.array([[site_bits(s, g.head_dim, context, n, w, memory) for s in schemes]] * len(sites))
            weights = np.ceil(bits * UNITS_PER_BIT - 1e-9).astype(np.int64)
            if budget_bits is not None:
                capacity = int(np.floor(budget_bits * UNITS_PER_BIT * len(sites) + 1e-9))
                if weights.min(1).sum() > capacity:
                    candidates.append({"sink_tokens": n, "recent_window": w, "feasible": False})
                    continue
            else:
                capacity = int(weights.max(1).sum())
            best, choice = _dp(costs, weights, capacity)
            if budget_bits is not None:
                cap = capacity
            else:
                ok = np.nonzero(best <= target_kl)[0]
                cap = int(ok[0]) if len(ok) else capacity  # misses the target: take the best there is
            picks = _backtrack(choice, weights, cap)
            total_cost = float(sum(costs[j, o] for j, o in enumerate(picks)))
            exact_bits = float(np.mean([bits[j, o] for j, o in enumerate(picks)]))
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
        calibration_hash=calib.content_hash(),
        description=f"planned ({mode}, context {context}): {exact_bits:.3f} bits/element, predicted {calib.cost_unit} {total_cost:.4g}",
        provenance={"planner": "multiple-choice knapsack, exact DP at 1/64 bit (rounded up)", "mode": mode,
                    "context": context, "memory": memory, "estimator": calib.estimator, "cost_unit": calib.cost_unit,
                    "predicted_cost": total_cost, "bits_per_element": exact_bits, "schemes": schemes,
                    "corrected": corrected,
                    "target_kl": target_kl, "budget_bits": budget_bits, "candidates": candidates},
    )
    return PlanResult(pmap, total_cost, exact_bits, n, w, candidates)
