"""The experiments behind "How memory is counted" in docs/calibration-results.md.

    python bench/memory_accounting.py [--calibration DIR] [--windows 16] [--out bench/results/memory_accounting.json]

1. Calibration: time and peak resident memory of `calibrate` with the default menu (skipped with
   --calibration DIR, which reuses a saved calibration and reports its recorded time).
2. Budgets counted at N (`final`) against budgets counted as allocated buffers (`plan --memory
   allocated`) at 4, 3 and 2.5 bits and N = 512, beside KIVI-style maps, each with both counts.
3. At KIVI-4 + 4 sinks' 6.07 bits: plans with the sinks and window fixed (4/32, 4/16, 1/16).
4. The default menu plus 128-position per-channel formats (`int2-ch-g128`, `int3-ch-g128`): a
   second calibration, the 2.5-bit plan, and its allocated bits.

Every map is evaluated on the same held-out windows (exact simulation of decoding); differences carry
a 95 % paired-bootstrap interval.  Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

BUDGETS = [4.0, 3.0, 2.5]
BASELINES = [("kivi-4 w32", "kivi-4", 0, 32), ("kivi-4 w32 s4", "kivi-4", 4, 32), ("kivi-2 w32", "kivi-2", 0, 32),
             ("kivi-2 w32 s4", "kivi-2", 4, 32)]
FIXED = [(4, 32), (4, 16), (1, 16)]  # (sinks, window) at KIVI-4 + sinks' bits
G128 = ["int2-ch-g128", "int3-ch-g128"]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", help="reuse this calibration directory instead of calibrating")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/memory_accounting.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.calibrate import Calibration, calibrate
    from kvcompile.calibrate.defaults import DEFAULT_SCHEMES
    from kvcompile.models import load_model
    from kvcompile.plan.optimize import plan
    from kvcompile.plan.presets import resolve_map
    from kvcompile.measure.quality import evaluate, paired_bootstrap

    lm = load_model(args.model)
    n = args.window
    doc = {"benchmark": "memory_accounting", "environment": environment(args.threads), "model": args.model,
           "text": args.text, "window": n, "windows": args.windows}
    rss_before = peak_rss_gib()
    if args.calibration:
        calib = Calibration.load(args.calibration)
    else:
        calib = calibrate(lm, windows=4, window=n)
    doc["calibration"] = {"seconds": calib.seconds, "reused": bool(args.calibration),
                          "peak_rss_gib_before": rss_before, "peak_rss_gib_after": peak_rss_gib()}
    print(f"calibration: {calib.seconds:.1f} s; peak resident memory {peak_rss_gib():.2f} GiB "
          f"({rss_before:.2f} GiB after loading the model){' (reused)' if args.calibration else ''}")

    maps, kinds = {}, {}
    for b in BUDGETS:
        maps[f"plan {b:g}b"] = plan(calib, budget_bits=b, context=n).pmap
        maps[f"plan {b:g}b, budget counted allocated"] = plan(calib, budget_bits=b, context=n, memory="allocated").pmap
    for label, spec, s, w in BASELINES:
        maps[label] = resolve_map(spec, lm.geometry, sink_tokens=s, recent_window=w)
    kivi4s = maps["kivi-4 w32 s4"].bits_per_element(n)
    for s, w in FIXED:
        maps[f"plan @{kivi4s:.2f}b, sinks {s}, window {w}"] = plan(
            calib, budget_bits=kivi4s, context=n, sink_options=[s], window_options=[w]).pmap
    t0 = time.perf_counter()
    calib128 = calibrate(lm, windows=4, window=n, schemes=[*DEFAULT_SCHEMES, *G128])
    doc["calibration_g128"] = {"seconds": time.perf_counter() - t0, "schemes": [*DEFAULT_SCHEMES, *G128]}
    maps["plan 2.5b, menu + g128"] = plan(calib128, budget_bits=2.5, context=n).pmap

    results = {r.name: r for r in evaluate(lm, maps, text=args.text, window=n, max_windows=args.windows)}
    rows = []
    print(f"{'map':<40} {'bits, final':>11} {'bits, allocated':>15} {'dPPL %':>8} {'KL':>8}")
    for name, pmap in maps.items():
        r = results[name]
        rows.append({"map": name, "bits_final": pmap.bits_per_element(n),
                     "bits_allocated": pmap.bits_per_element(n, memory="allocated"),
                     "sinks": pmap.sink_tokens, "window": pmap.recent_window, "result": r.to_json()})
        print(f"{name:<40} {rows[-1]['bits_final']:>11.3f} {rows[-1]['bits_allocated']:>15.3f} "
              f"{r.delta_ppl_pct:>+8.2f} {r.kl:>8.4f}")
    doc["results"] = rows
    pairs = [("plan 2.5b, menu + g128", "plan 2.5b"), *[(f"plan @{kivi4s:.2f}b, sinks {s}, window {w}", "kivi-4 w32 s4")
                                                         for s, w in FIXED],
             ("plan 4b, budget counted allocated", "kivi-2 w32 s4")]
    doc["comparisons"] = []
    for a, b in pairs:
        ci = paired_bootstrap(results[a], results[b])
        doc["comparisons"].append({"a": a, "b": b, **ci})
        print(f"{a} - {b}: {ci['difference_pct']:+.2f} points, 95 % interval [{ci['ci_low_pct']:+.2f}, "
              f"{ci['ci_high_pct']:+.2f}]{'' if ci['significant'] else ' (not significant)'}")
    doc["peak_rss_gib"] = peak_rss_gib()
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
