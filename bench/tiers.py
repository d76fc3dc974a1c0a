"""Recency tiers against three position classes, planned under the same memory budget.

    python bench/tiers.py [--contexts 2048,4096] [--budgets 2.5,3.0] [--age-tiers 2]
                          [--calibration bench/results/tiers-calibration] [--out bench/results/tiers.json]
    python bench/tiers.py --budgets 3.5 --append      # more rows in the same JSON

One calibration on the calibration text (``--calib-window`` tokens, window options up to the
largest tier boundary considered) serves every plan.  For each context N and budget B the planner
makes the best three-class map (sinks, fp16 window, bulk; ``plan``) and the best map with up to
``--age-tiers`` recency tiers (``plan --age-tiers``), both counting every stored bit at N.  Both are
scored on the same held-out windows of N tokens (exact simulation of token-by-token decoding),
with ΔPPL, KL and a paired bootstrap over windows for the difference.  Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def table(rows: list[dict]) -> str:
    """The Markdown table README.md quotes."""
    out = ["| context | budget | 3-class bits | 3-class ΔPPL | 3-class KL | tiers bits | tiers: window + age tiers "
           "| tiers ΔPPL | tiers KL | tiers − 3-class ΔPPL [95 % CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c, b = r["tiers"], r["three_class"], r["tiers_minus_three_class"]
        out.append(f"| {r['context']} | {r['budget_bits']} | {c['bits_per_element']:.3f} | {c['delta_ppl_pct']:+.2f} % | "
                   f"{c['kl']:.4f} | {t['bits_per_element']:.3f} | {t['recent_window']} + {t['age_windows']} | "
                   f"{t['delta_ppl_pct']:+.2f} % | {t['kl']:.4f} | "
                   f"{b['difference_pct']:+.2f} [{b['ci_low_pct']:+.2f}, {b['ci_high_pct']:+.2f}] |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--budgets", default="2.5,3.0")
    ap.add_argument("--age-tiers", type=int, default=2)
    ap.add_argument("--eval-windows", default="6,3", help="held-out windows per context (one value, or one per context)")
    ap.add_argument("--calibration", default="bench/results/tiers-calibration",
                    help="calibration directory: loaded if it exists, else calibrated and saved there")
    ap.add_argument("--calib-window", type=int, default=1024)
    ap.add_argument("--calib-windows", type=int, default=3)
    ap.add_argument("--window-options", default="0,16,32,128,512")
    ap.add_argument("--schemes", default="fp16,int8,int4,int4-ch,int3,int2,int2-ch,int2-g64,int2-ch-g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/tiers.json")
    ap.add_argument("--append", action="store_true",
                    help="add these (context, budget) rows to --out's (same calibration), replacing equal ones")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.calibrate import Calibration, calibrate
    from kvcompile.measure.quality import evaluate, format_table, paired_bootstrap
    from kvcompile.models import load_model
    from kvcompile.plan.optimize import plan

    lm = load_model(args.model)
    calib_dir = Path(args.calibration)
    if (calib_dir / "calibration.json").is_file():
        calib = Calibration.load(calib_dir)
        print(f"calibration loaded from {calib_dir} ({calib.seconds:.0f} s when made)")
    else:
        calib = calibrate(lm, windows=args.calib_windows, window=args.calib_window, schemes=args.schemes.split(","),
                          window_options=ints(args.window_options))
        calib.save(calib_dir)
        print(f"calibrated in {calib.seconds:.0f} s -> {calib_dir}")
    contexts, budgets = ints(args.contexts), [float(b) for b in args.budgets.split(",")]
    eval_windows = ints(args.eval_windows)
    eval_windows = eval_windows * len(contexts) if len(eval_windows) == 1 else eval_windows
    rows = []
    for context, windows in zip(contexts, eval_windows):
        for budget in budgets:
            t0 = time.perf_counter()
            three = plan(calib, budget_bits=budget, context=context)
            tiered = plan(calib, budget_bits=budget, context=context, age_tiers=args.age_tiers)
            plan_seconds = time.perf_counter() - t0
            maps = {f"3-class {budget}b": three.pmap, f"tiers {budget}b": tiered.pmap}
            results = evaluate(lm, maps, text=args.text, window=context, max_windows=windows, progress=False)
            print(f"\ncontext {context}, budget {budget} bits/element (planned in {plan_seconds:.1f} s)")
            for name, pmap in maps.items():
                print(f"  {name}: {pmap.summary()}")
            print(format_table(results))
            r3, rt = results
            boot = paired_bootstrap(rt, r3)
            print(f"  tiers - 3-class: dPPL {boot['difference_pct']:+.3f} % "
                  f"(95 % interval [{boot['ci_low_pct']:+.3f}, {boot['ci_high_pct']:+.3f}])")
            rows.append({"context": context, "budget_bits": budget, "plan_seconds": plan_seconds,
                         "three_class": {**r3.to_json(), "sink_tokens": three.pmap.sink_tokens,
                                         "recent_window": three.pmap.recent_window,
                                         "predicted_kl": three.predicted_cost, "map": three.pmap.to_json_body()},
                         "tiers": {**rt.to_json(), "sink_tokens": tiered.pmap.sink_tokens,
                                   "recent_window": tiered.pmap.recent_window,
                                   "age_windows": list(tiered.pmap.age_windows),
                                   "predicted_kl": tiered.predicted_cost, "map": tiered.pmap.to_json_body()},
                         "tiers_minus_three_class": boot})
    runs = [environment(args.threads)]
    if args.append and Path(args.out).is_file():
        import json

        old = json.loads(Path(args.out).read_text())
        new = {(r["context"], r["budget_bits"]) for r in rows}
        rows = sorted([r for r in old["results"] if (r["context"], r["budget_bits"]) not in new] + rows,
                      key=lambda r: (r["context"], r["budget_bits"]))
        runs = old.get("runs", [old["environment"]]) + runs
    print("\n" + table(rows))
    write_json(args.out, {"benchmark": "tiers", "environment": runs[-1], "runs": runs, "model": args.model,
                          "text": args.text, "age_tiers": args.age_tiers,
                          "calibration": {"dir": str(calib_dir), "window": calib.window, "windows": calib.windows,
                                          "window_options": calib.window_options, "sink_options": calib.sink_options,
                                          "schemes": calib.schemes, "estimator": calib.estimator,
                                          "seconds": calib.seconds},
                          "results": rows})


if __name__ == "__main__":
    main()
