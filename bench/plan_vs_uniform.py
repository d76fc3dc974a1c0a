"""Planned precision maps against uniform and KIVI-style maps at equal or larger memory.

    python bench/plan_vs_uniform.py [--matched] [--windows 16] [--calibration DIR] [--out bench/results/plan_vs_uniform.json]

1. Calibrates the default model on the calibration text (timed; skipped with --calibration DIR).
2. Plans maps at ~4, 3 and 2.5 bits/element (context = the evaluation window) and for a KL target,
   each twice: the plain plan (decided by the additive prediction) and the refined one (``plan
   --refine``: sinks and window chosen by, or the target met by, KL measured on the calibration
   text; see kvcompile/plan/refine.py).
3. Evaluates planned and baseline maps on the same held-out windows (exact simulation of decoding).
4. For each planned map, lists every baseline with at least as many bits and whether the plan has
   lower dPPL than all of them.  Every comparison carries a 95 % paired-bootstrap interval of the
   dPPL difference over the held-out windows (``paired_bootstrap`` in kvcompile/measure/quality.py),
   so a win or loss smaller than the window-to-window noise is reported as not significant.
5. With --matched: also plans one map (plain and refined) at *each* baseline's exact bits/element
   and compares them at equal memory (the fair pairwise test; a 2.5-bit map cannot be expected to beat a 5.7-bit one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

BASELINES = [  # (label, spec, sinks, window)
    ("fp8", "fp8", None, None), ("int4", "int4", None, None), ("int4-g64", "int4-g64", None, None),
    ("int4-rot", "int4-rot", None, None), ("nf4", "nf4", None, None), ("int3", "int3", None, None),
    ("int2", "int2", None, None), ("int2-g64", "int2-g64", None, None), ("int2-rot", "int2-rot", None, None),
    ("kivi-4 w32", "kivi-4", 0, 32), ("kivi-4 w32 s4", "kivi-4", 4, 32),
    ("kivi-2 w32", "kivi-2", 0, 32), ("kivi-2 w32 s4", "kivi-2", 4, 32),
    ("kivi-2 w128", "kivi-2", 0, 128), ("kivi-2 w128 s4", "kivi-2", 4, 128),
]
BUDGETS = [4.0, 3.0, 2.5]
TARGET_KL = 0.02


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", help="reuse this calibration directory instead of calibrating")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--estimator", default="hybrid")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-windows", type=int, default=2, help="calibration windows measured per refinement round")
    ap.add_argument("--matched", action="store_true", help="also plan at each baseline's bits (equal memory)")
    ap.add_argument("--out", default="bench/results/plan_vs_uniform.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.calibrate import Calibration, calibrate
    from kvcompile.models import load_model
    from kvcompile.plan.optimize import plan
    from kvcompile.measure.quality import kl_meter
    from kvcompile.plan.refine import refine_budget, refine_to_target
    from kvcompile.plan.presets import resolve_map
    from kvcompile.measure.quality import evaluate, format_table, paired_bootstrap

    lm = load_model(args.model)
    if args.calibration:
        calib = Calibration.load(args.calibration)
    else:
        t0 = time.perf_counter()
        calib = calibrate(lm, windows=args.calib_windows, window=args.window, estimator=args.estimator)
        print(f"calibration ({args.estimator}): {time.perf_counter() - t0:.1f} s wall ({args.calib_windows} x "
              f"{args.window} tokens, {args.threads} threads)")
        calib.save("bench/results/calibration")
    maps, planned = {}, {}
    meter = kl_meter(lm, calib.text, args.window, args.refine_windows)
    for b in BUDGETS:
        r = plan(calib, budget_bits=b, context=args.window)
        planned[f"plan {b:g}b"] = {"budget_bits": b, "predicted_kl": r.predicted_cost, "sinks": r.sink_tokens,
                                   "window": r.recent_window}
        maps[f"plan {b:g}b"] = r.pmap
        t0 = time.perf_counter()
        rb = refine_budget(calib, b, meter, context=args.window)
        planned[f"plan {b:g}b refined"] = {"budget_bits": b, "predicted_kl": rb.result.predicted_cost,
                                           "measured_kl_on_calibration_text": rb.measured_kl,
                                           "refinement_seconds": time.perf_counter() - t0,
                                           "sinks": rb.result.sink_tokens, "window": rb.result.recent_window}
        maps[f"plan {b:g}b refined"] = rb.result.pmap
    r = plan(calib, target_kl=TARGET_KL, context=args.window)
    planned[f"plan kl<={TARGET_KL}"] = {"target_kl": TARGET_KL, "predicted_kl": r.predicted_cost,
                                        "sinks": r.sink_tokens, "window": r.recent_window}
    maps[f"plan kl<={TARGET_KL}"] = r.pmap
    t0 = time.perf_counter()
    refined = refine_to_target(calib, TARGET_KL, meter, context=args.window)
    name = f"plan kl<={TARGET_KL} refined"
    planned[name] = {"target_kl": TARGET_KL, "predicted_kl": refined.result.predicted_cost,
                     "measured_kl_on_calibration_text": refined.measured_kl, "refinement_rounds": refined.rounds,
                     "refinement_seconds": time.perf_counter() - t0,
                     "sinks": refined.result.sink_tokens, "window": refined.result.recent_window}
    maps[name] = refined.result.pmap
    print(f"refinement: {len(refined.rounds)} rounds, {time.perf_counter() - t0:.1f} s, measured KL on calibration "
          f"text {refined.measured_kl:.4f} at {refined.result.bits_per_element:.3f} bits")
    for label, spec, s, w in BASELINES:
        maps[label] = resolve_map(spec, lm.geometry, sink_tokens=s, recent_window=w)
    matched = {}
    if args.matched:
        for label, *_ in BASELINES:
            bits = maps[label].bits_per_element(args.window)
            key = f"plan @{bits:.2f}b"
            if key not in maps:
                maps[key] = plan(calib, budget_bits=bits, context=args.window).pmap
                maps[key + " refined"] = refine_budget(calib, bits, meter, context=args.window).result.pmap
            matched.setdefault(key, []).append(label)
    results = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.windows)
    print(format_table(results))
    by_name = {r.name: r for r in results}
    comparisons = []
    print("\nplanned map vs every baseline with at least as many bits:")
    for name, info in planned.items():
        p = by_name[name]
        rivals = [by_name[l] for l, *_ in BASELINES if by_name[l].bits_per_element >= p.bits_per_element - 1e-9]
        beaten = [r.name for r in rivals if p.delta_ppl_pct < r.delta_ppl_pct]
        gaps = {r.name: paired_bootstrap(p, r) for r in rivals}
        lost = [f"{r.name} ({r.bits_per_element:.2f} b, {r.delta_ppl_pct:+.2f} %{'' if gaps[r.name]['significant'] else ', n.s.'})"
                for r in rivals if r.name not in beaten]
        line = (f"{name}: {p.bits_per_element:.3f} b, dPPL {p.delta_ppl_pct:+.2f} %, KL {p.kl:.4f} "
                f"(predicted {info['predicted_kl']:.4f}); beats {len(beaten)}/{len(rivals)}")
        if lost:
            line += "; not: " + ", ".join(lost)
        if "target_kl" in info:
            target = info["target_kl"]
            verdict = "met" if p.kl <= target else f"missed by {p.kl / target:.2f}x"
            line += f"; target KL {target} {verdict}"
        print(line)
        comparisons.append({"map": name, **info, "bits_per_element": p.bits_per_element, "delta_ppl_pct": p.delta_ppl_pct,
                            "kl": p.kl, "beats": beaten, "does_not_beat": lost,
                            "beats_all_at_equal_or_more_memory": not lost,
                            "significant_losses": [n for n, g in gaps.items() if g["significant"] and g["difference_pct"] > 0],
                            "bootstrap": gaps})
    equal_memory = []
    if matched:
        print("\nplanned map vs baseline at equal memory:")
        for key, labels in matched.items():
            for pkey in (key, key + " refined"):
                p = by_name[pkey]
                for label in labels:
                    b = by_name[label]
                    wins = p.delta_ppl_pct < b.delta_ppl_pct
                    gap = paired_bootstrap(p, b)
                    print(f"{label:<16} {b.bits_per_element:5.2f} b dPPL {b.delta_ppl_pct:+8.2f} %  |  {pkey:<22} "
                          f"{p.bits_per_element:5.2f} b dPPL {p.delta_ppl_pct:+8.2f} %  {'plan wins' if wins else 'baseline wins'}"
                          f"{'' if gap['significant'] else ' (n.s.)'}  diff [{gap['ci_low_pct']:+.2f}, {gap['ci_high_pct']:+.2f}]")
                    equal_memory.append({"baseline": label, "baseline_bits": b.bits_per_element,
                                         "baseline_delta_ppl_pct": b.delta_ppl_pct, "plan": pkey,
                                         "refined": pkey.endswith("refined"),
                                         "plan_bits": p.bits_per_element, "plan_delta_ppl_pct": p.delta_ppl_pct,
                                         "plan_wins": wins, "significant": gap["significant"],
                                         "difference_ci_pct": [gap["ci_low_pct"], gap["ci_high_pct"]]})
        for refined_ in (False, True):
            rows = [e for e in equal_memory if e["refined"] == refined_]
            wins = [e for e in rows if e["plan_wins"]]
            print(f"{'refined' if refined_ else 'plain'} plan wins {len(wins)}/{len(rows)} equal-memory comparisons "
                  f"({sum(e['significant'] for e in wins)} significant at 95 %; significant losses: "
                  f"{sum(e['significant'] for e in rows if not e['plan_wins'])})")
    write_json(args.out, {"benchmark": "plan_vs_uniform", "environment": environment(args.threads),
                          "calibration_seconds": calib.seconds, "calibration": {"windows": calib.windows,
                          "window": calib.window, "estimator": calib.estimator, "schemes": calib.schemes,
                          "correction": dict(zip(calib.schemes, calib.correction.tolist()))},
                          "results": [r.to_json() for r in results], "comparisons": comparisons,
                          "equal_memory": equal_memory})


if __name__ == "__main__":
    main()
