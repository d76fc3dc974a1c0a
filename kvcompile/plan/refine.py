"""Measured refinement of a plan: decide with KL measured on calibration text what predictions decide poorly.

Budget mode (:func:`refine_budget`): the sink count and recent window are chosen by measured KL
among the exact per-site optima for each (sinks, window); with recency tiers, the structure (sinks,
tier boundaries) among the :data:`TIER_CANDIDATES` the prediction ranks best.  Target mode (:func:`refine_to_target`),
described next, meets the KL target on real decoding, not only on the prediction.

The planner's objective is a *sum* of per-site predicted costs.  Measured whole-map KL differs from
that sum by a map-dependent factor (on SmolLM2 0.8x to 3x for planned maps).  Sites compose nearly
additively (bench/composition.py); the factor comes from per-site predictions being off at the
map's operating point.  A map planned to a predicted KL of E can therefore land above E.
Refinement treats the planner as a function of the target it is handed and searches that target
with measured KL in the loop:

    t_0 = E,   m_i = KL_measured(plan(t_i)),   alpha_i = m_i / predicted(plan(t_i)),   t_{i+1} = E / alpha_i

safeguarded like a bracketing root finder: targets whose map met E (``m <= E``) and targets whose map
did not bracket the answer, and a step that leaves the bracket is replaced by the geometric mean of
its ends.  KL is measured on the *calibration* text (the held-out text stays held out).  Every map
tried is still the exact knapsack optimum for its target; refinement only chooses the target.  The
result is the smallest map measured to meet E, or, when none did within ``rounds``, the map with the
lowest measured KL together with its miss factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from kvcompile.calibrate.artifact import Calibration
from kvcompile.errors import KvcompileError
from kvcompile.plan.optimize import PlanResult, plan
from kvcompile.kv.precision_map import PrecisionMap

#: stop once a map meets the target with measured KL at least this fraction of it (little left to save)
CLOSE_ENOUGH = 0.85
#: tier structures measured by a budget refinement with recency tiers: the best predicted ones
TIER_CANDIDATES = 8


@dataclass
class RefineResult:
    result: PlanResult  # the chosen plan (its pmap records the refinement in provenance["refinement"])
    measured_kl: float  # on the calibration text
    target_kl: float | None  # None in budget mode
    met: bool  # target met (always True in budget mode)
    rounds: list[dict]  # one per map measured: planning target, predicted, measured, bits

    @property
    def miss_factor(self) -> float | None:
        return self.measured_kl / self.target_kl if self.target_kl else None


def refine_to_target(calib: Calibration, target_kl: float, measure: Callable[[PrecisionMap], float],
                     rounds: int = 6, **plan_options) -> RefineResult:
    """Plan for ``target_kl`` with measured KL in the loop (see the module docstring).

    ``measure(pmap) -> float``: mean KL per position of decoding with ``pmap`` (e.g.
    :func:`kvcompile.measure.quality.kl_meter`).
    ``plan_options``: passed to :func:`kvcompile.plan.optimize.plan` (context, schemes, ...).
    """
    if not target_kl > 0:
        raise KvcompileError(f"--target-kl must be positive, got {target_kl}")
    if rounds < 1:
        raise KvcompileError(f"refinement needs at least 1 round, got {rounds}")
    met_at, missed_at = None, None  # largest planning target known to meet E, smallest known to miss
    tried: dict[str, tuple[PlanResult, float]] = {}  # map hash -> (plan, measured)
    log = []
    t = target_kl
    for _ in range(rounds):
        r = plan(calib, target_kl=t, **plan_options)
        key = r.pmap.content_hash()
        if key not in tried:
            tried[key] = (r, float(measure(r.pmap)))
        measured = tried[key][1]
        alpha = measured / r.predicted_cost if r.predicted_cost > 0 else 1.0
        log.append({"planning_target": t, "predicted_kl": r.predicted_cost, "measured_kl": measured,
                    "bits_per_element": r.bits_per_element, "met": measured <= target_kl})
        if measured <= target_kl:
            met_at = t if met_at is None else max(met_at, t)
            if measured >= CLOSE_ENOUGH * target_kl:
                break
        else:
            missed_at = t if missed_at is None else min(missed_at, t)
        guess = target_kl / alpha if alpha > 0 else t * 2
        lo, hi = met_at, missed_at
        if (lo is not None and guess <= lo) or (hi is not None and guess >= hi) or math.isclose(guess, t):
            if lo is not None and hi is not None:
                guess = math.sqrt(lo * hi)
            elif hi is not None:  # only misses so far: go well below the smallest miss
                guess = min(guess, hi / 2)
            else:  # only successes: go above the largest success
                guess = max(guess, lo * 2)
        t = guess
    met = [(r, m) for r, m in tried.values() if m <= target_kl]
    if met:
        chosen, measured = min(met, key=lambda rm: (rm[0].bits_per_element, rm[1]))
    else:
        chosen, measured = min(tried.values(), key=lambda rm: (rm[1], rm[0].bits_per_element))
    chosen = _recorded(chosen, {"measured_on": calib.text, "measured_kl": measured, "met": bool(met), "rounds": log},
                       f"refined to target KL {target_kl}: measured {measured:.4g} on calibration text",
                       target_kl=target_kl)
    return RefineResult(chosen, measured, target_kl, bool(met), log)


def refine_budget(calib: Calibration, budget_bits: float, measure: Callable[[PrecisionMap], float],
                  **plan_options) -> RefineResult:
    """Plan for ``budget_bits`` and choose the sink count and recent window by *measured* KL.

    For each calibrated (sinks n, window w) the per-site choice is the exact knapsack optimum under
    the budget, as in :func:`~kvcompile.plan.optimize.plan`; instead of comparing the (n, w)
    candidates by their summed predictions, each candidate map is measured with ``measure`` and the
    lowest measured KL wins (ties: fewer bits).  Why: the predictions barely separate sink counts,
    measurement does (docs/calibration-results.md: 4 fp16 sinks instead of 1 cut held-out KL by
    ~30 % at 4 bits and both predicted about the same).  Cost: one measurement per feasible (n, w).
    """
    if plan_options.get("age_tiers"):
        return _refine_budget_tiers(calib, budget_bits, measure, **plan_options)
    sink_options = plan_options.pop("sink_options", None) or calib.sink_options
    window_options = plan_options.pop("window_options", None) or calib.window_options
    tried, log = [], []
    for n in sink_options:
        for w in window_options:
            try:
                r = plan(calib, budget_bits=budget_bits, sink_options=[n], window_options=[w], **plan_options)
            except KvcompileError:  # this (n, w) alone does not fit the budget
                continue
            measured = float(measure(r.pmap))
            tried.append((r, measured))
            log.append({"sink_tokens": n, "recent_window": w, "predicted_kl": r.predicted_cost,
                        "measured_kl": measured, "bits_per_element": r.bits_per_element})
    if not tried:  # let the planner say why nothing fits
        plan(calib, budget_bits=budget_bits, sink_options=sink_options, window_options=window_options, **plan_options)
    chosen, measured = min(tried, key=lambda rm: (rm[1], rm[0].bits_per_element))
    chosen = _recorded(chosen, {"measured_on": calib.text, "measured_kl": measured,
                                "chosen_by": "measured KL over (sinks, window)", "rounds": log},
                       f"sinks and window chosen by KL measured on calibration text ({measured:.4g})")
    return RefineResult(chosen, measured, None, True, log)


def _refine_budget_tiers(calib: Calibration, budget_bits: float, measure: Callable[[PrecisionMap], float],
                         candidates: int = TIER_CANDIDATES, **plan_options) -> RefineResult:
    """:func:`refine_budget` with recency tiers: the structure (n sinks, boundaries ``W_1 < .. < W_{K+1}``)
    is chosen by measured KL among the ``candidates`` feasible structures of lowest predicted cost,
    each with its exact per-site optimum under the budget.  Why: a structure's share of the
    prediction is a difference of distance buckets that ignores re-quantization along the chain
    (:mod:`kvcompile.plan.optimize`), and a too-short age tier predicted cheap measured 29 % worse
    on SmolLM2 at 2.5 bits (README, issue 16)."""
    from kvcompile.plan.optimize import plan_tiers

    age_tiers = plan_options.pop("age_tiers")
    full = plan_tiers(calib, age_tiers, budget_bits=budget_bits, **plan_options)
    ranked = sorted((c for c in full.candidates if c["feasible"]), key=lambda c: c["predicted_cost"])[:candidates]
    tried, log = [], []
    for c in ranked:
        structure = (c["sink_tokens"], tuple(c["boundaries"]))
        r = plan_tiers(calib, age_tiers, budget_bits=budget_bits, structures=[structure], **plan_options)
        measured = float(measure(r.pmap))
        tried.append((r, measured))
        log.append({"sink_tokens": structure[0], "boundaries": list(structure[1]), "recent_window": structure[1][0],
                    "predicted_kl": r.predicted_cost, "measured_kl": measured, "bits_per_element": r.bits_per_element})
    chosen, measured = min(tried, key=lambda rm: (rm[1], rm[0].bits_per_element))
    chosen = _recorded(chosen, {"measured_on": calib.text, "measured_kl": measured,
                                "chosen_by": f"measured KL over the {len(tried)} best predicted tier structures",
                                "rounds": log},
                       f"tier structure chosen by KL measured on calibration text ({measured:.4g})")
    return RefineResult(chosen, measured, None, True, log)


def _recorded(result: PlanResult, refinement: dict, note: str, **provenance) -> PlanResult:
    """``result`` with its map's provenance and description saying how refinement chose it."""
    pmap = result.pmap
    pmap = replace(pmap, provenance={**pmap.provenance, **provenance, "refinement": refinement},
                   description=f"{pmap.description}; {note}")
    return replace(result, pmap=pmap)
