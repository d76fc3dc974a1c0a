"""How do errors at many sites compose?  Whole-map KL against the sum of its parts, measured.

    python bench/composition.py [--calibration bench/results/calibration] [--budgets 4,2.5] [--windows 1]

The planner adds per-site predicted costs (docs/theory.md, section 4).  For a planned map M this
measures, with the exact simulation of decoding on calibration windows,

* KL(M): the whole map,
* sum over layers l of KL(M restricted to layer l)        -> cross-layer interaction,
* sum over (l, K|V) of KL(M restricted to layer l, stream) -> K-with-V interaction within a layer,
* the planner's prediction, in total and per layer,

("restricted to": every other site's bulk in fp16; sinks and window as in M).  A ratio near 1
means that level composes additively; the per-layer measured / predicted spread says how far the
per-site predictions themselves are off.

With ``--rescale`` it also tries the obvious fix: scale every cost of layer l by that layer's
measured / predicted ratio (clipped to [0.1, 10]), re-plan at the same budget, and evaluate both
maps on ``--eval-windows`` held-out windows.  Writes bench/results/composition.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def restricted(pmap, keep):
    """``pmap`` with every bulk site not in ``keep(layer, stream)`` stored in fp16."""
    from kvcompile.kv.precision_map import STREAMS

    grids = {st: tuple(tuple(pmap.schemes[st]["bulk"][l][h] if keep(l, st) else "fp16"
                             for h in range(pmap.num_kv_heads)) for l in range(pmap.num_layers)) for st in STREAMS}
    return pmap.with_bulk(grids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="bench/results/calibration")
    ap.add_argument("--budgets", default="4,2.5")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--rescale", action="store_true", help="re-plan with per-layer measured/predicted cost factors")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out windows for --rescale")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/composition.json")
    args = ap.parse_args()
    setup(args.threads)
    import dataclasses

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from kvcompile.calibrate import Calibration
    from kvcompile.data import load_text
    from kvcompile.models import load_model
    from kvcompile.plan.optimize import plan
    from kvcompile.kv.precision_map import STREAMS
    from kvcompile.measure.quality import evaluate, mean_kl, reference_log_probs, token_windows

    lm = load_model(args.model)
    calib = Calibration.load(args.calibration)
    ids = token_windows(lm.tokenizer, load_text(calib.text), calib.window, args.windows)
    reference = reference_log_probs(lm.model, ids)
    cost = calib.corrected_cost()
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        t0 = time.perf_counter()
        r = plan(calib, budget_bits=budget, context=calib.window)
        m = r.pmap
        ni, wi = calib.sink_options.index(m.sink_tokens), calib.window_options.index(m.recent_window)
        predicted = np.zeros((m.num_layers, 2))
        for l in range(m.num_layers):
            for si, st in enumerate(STREAMS):
                predicted[l, si] = sum(float(cost[l, h, si, calib.schemes.index(m.schemes[st]["bulk"][l][h]), wi, ni])
                                       for h in range(m.num_kv_heads))
        kl = lambda pm: mean_kl(lm.model, ids, pm, reference=reference)  # noqa: E731
        whole = kl(m)
        per_stream = np.zeros((m.num_layers, 2))
        per_layer = np.zeros(m.num_layers)
        for l in tqdm(range(m.num_layers), desc=f"{budget:g} b", leave=False):
            per_layer[l] = kl(restricted(m, lambda ll, st: ll == l))
            for si, st in enumerate(STREAMS):
                per_stream[l, si] = kl(restricted(m, lambda ll, s: ll == l and s == st))
        ratio = per_layer / np.maximum(predicted.sum(1), 1e-12)
        row = {"budget_bits": budget, "bits_per_element": r.bits_per_element, "sinks": m.sink_tokens,
               "window": m.recent_window, "predicted_total": float(predicted.sum()), "measured_whole": whole,
               "sum_of_layers": float(per_layer.sum()), "sum_of_layer_streams": float(per_stream.sum()),
               "whole_over_sum_of_layers": whole / per_layer.sum(),
               "layer_over_its_streams": float(per_layer.sum() / per_stream.sum()),
               "whole_over_predicted": whole / predicted.sum(),
               "layer_measured_over_predicted": {"min": float(ratio.min()), "median": float(np.median(ratio)),
                                                 "max": float(ratio.max())},
               "per_layer": [{"layer": l, "predicted": float(predicted[l].sum()), "measured": float(per_layer[l]),
                              "measured_key": float(per_stream[l, 0]), "measured_value": float(per_stream[l, 1])}
                             for l in range(m.num_layers)],
               "seconds": time.perf_counter() - t0}
        if args.rescale:
            factor = torch.from_numpy(np.where(predicted.sum(1) > 1e-6, ratio, 1.0).clip(0.1, 10.0))
            rescaled = plan(dataclasses.replace(calib, cost=calib.cost * factor.view(-1, 1, 1, 1, 1, 1)),
                            budget_bits=budget, context=calib.window).pmap
            held_out = evaluate(lm, {"planned": m, "rescaled": rescaled}, window=calib.window,
                                max_windows=args.eval_windows, progress=False)
            row["rescaled"] = {q.name: {"bits_per_element": q.bits_per_element, "delta_ppl_pct": q.delta_ppl_pct,
                                        "kl": q.kl} for q in held_out}
        rows.append(row)
    print(f"{'map':<10} {'bits':>6} {'predicted':>10} {'whole':>8} {'sum layers':>11} {'sum K,V':>8} "
          f"{'whole/layers':>13} {'layer/(K+V)':>12} {'layer meas/pred (min, median, max)':>36}")
    for r in rows:
        q = r["layer_measured_over_predicted"]
        print(f"{'plan ' + format(r['budget_bits'], 'g') + 'b':<10} {r['bits_per_element']:6.3f} {r['predicted_total']:10.4f} "
              f"{r['measured_whole']:8.4f} {r['sum_of_layers']:11.4f} {r['sum_of_layer_streams']:8.4f} "
              f"{r['whole_over_sum_of_layers']:13.2f} {r['layer_over_its_streams']:12.2f} "
              f"{q['min']:12.2f} {q['median']:11.2f} {q['max']:11.2f}")
    for r in rows:
        for name, q in r.get("rescaled", {}).items():
            print(f"plan {r['budget_bits']:g}b {name:<9} on {args.eval_windows} held-out windows: "
                  f"{q['bits_per_element']:.3f} b, dPPL {q['delta_ppl_pct']:+.2f} %, KL {q['kl']:.4f}")
    print(f"({args.windows} calibration window(s) of {calib.window} tokens of {calib.text}; exact simulation of decoding)")
    write_json(args.out, {"benchmark": "composition", "environment": environment(args.threads),
                          "calibration": {"estimator": calib.estimator, "text": calib.text, "window": calib.window},
                          "windows": args.windows, "results": rows})


if __name__ == "__main__":
    main()
