"""How far the exact simulation is from real token-by-token decoding in float32, on the default model.

    python bench/simulate_vs_decode.py [--windows 16] [--window 512] [--out bench/results/simulate_vs_decode.json]

Both modes score the same held-out windows against the same full-precision reference
(``kvcompile eval --mode simulate`` and ``--mode decode``).  In float64 they are the same
computation (``tests/unit/test_simulation.py``); in float32 parallel and incremental matrix
products give K/V that differ in the last bits, which now and then flips a rounding of a low-bit
code.  This measures what that does to ΔPPL and KL, with a paired-bootstrap interval of the ΔPPL
gap over windows.  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

# (label, map spec, sinks, recent window)
MAPS = [("int4", "int4", None, None), ("kivi-2 w32 +4 sinks", "kivi-2", 4, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/simulate_vs_decode.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map
    from kvcompile.measure.quality import evaluate, paired_bootstrap

    lm = load_model(args.model)
    maps = {label: resolve_map(spec, lm.geometry, sink_tokens=s, recent_window=w) for label, spec, s, w in MAPS}
    sim = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.windows, mode="simulate")
    dec = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.windows, mode="decode")
    rows = []
    print(f"model {args.model}, text {args.text}, {sim[0].tokens_scored} tokens in {sim[0].windows} windows of {args.window}")
    print(f"{'map':<22} {'dPPL% sim':>10} {'dPPL% dec':>10} {'gap':>7} {'95% interval':>18} {'KL sim':>8} {'KL dec':>8} "
          f"{'dec s':>7}")
    for s, d in zip(sim, dec):
        gap = paired_bootstrap(d, s)
        rows.append({"map": s.name, "simulate": s.to_json(), "decode": d.to_json(),
                     "delta_ppl_gap_pct": d.delta_ppl_pct - s.delta_ppl_pct, "delta_ppl_gap_interval": gap,
                     "kl_gap": d.kl - s.kl})
        print(f"{s.name:<22} {s.delta_ppl_pct:>+10.3f} {d.delta_ppl_pct:>+10.3f} {rows[-1]['delta_ppl_gap_pct']:>+7.3f} "
              f"[{gap['ci_low_pct']:+.3f}, {gap['ci_high_pct']:+.3f}] {s.kl:>8.5f} {d.kl:>8.5f} {d.seconds:>7.0f}")
    write_json(args.out, {"benchmark": "simulate_vs_decode", "environment": environment(args.threads), "model": args.model,
                          "text": args.text, "window": args.window, "windows": sim[0].windows,
                          "tokens_scored": sim[0].tokens_scored, "results": rows})


if __name__ == "__main__":
    main()
