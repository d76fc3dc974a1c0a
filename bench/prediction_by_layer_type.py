"""The planner's corrected KL prediction against measured KL, per layer type (sliding-window vs full attention).

    python bench/prediction_by_layer_type.py [--model gemma3-270m] [--calibration bench/results/gemma3-calibration]
                                             [--schemes int4,int3,nf4,lm3-rot] [--out bench/results/prediction_by_layer_type.json]

For each scheme, three maps: the scheme on the window layers only (the others fp16), on the
full-attention layers only, and on all layers.  ``predicted`` is what the planner adds up for that
map (the calibration's corrected costs, window sites at ``cost(s, 0, 0)``); ``measured`` is the mean
KL per position in simulate mode on the tokens the calibration's correction pass uses (the first 256
of the first calibration window).  The calibration fits its per-scheme correction constant on all
layers at once (there measured / predicted comes out near 1), so the two halves show whether the
estimator's error depends on the layer type.  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--calibration", default="bench/results/gemma3-calibration")
    ap.add_argument("--schemes", default="int4,int3,nf4,lm3-rot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/prediction_by_layer_type.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.calibrate import Calibration
    from kvcompile.calibrate.estimate import CORRECTION_TOKENS
    from kvcompile.data import load_text
    from kvcompile.kv.precision_map import PrecisionMap
    from kvcompile.measure.quality import mean_kl, reference_log_probs, token_windows
    from kvcompile.models import load_model
    from kvcompile.plan.optimize import _window_option

    lm = load_model(args.model)
    calib = Calibration.load(args.calibration)
    g = lm.geometry
    if not any(g.layer_windows):
        raise SystemExit(f"{args.model} has no sliding-window layers; expected a model with two layer types")
    cost = calib.corrected_cost().numpy()
    ids = token_windows(lm.tokenizer, load_text(calib.text), calib.window, 1)[:, :CORRECTION_TOKENS]
    ref = reference_log_probs(lm.model, ids)
    w0, n0 = calib.window_options.index(min(calib.window_options)), calib.sink_options.index(min(calib.sink_options))
    subsets = {"window layers": lambda l: bool(g.window(l)), "full layers": lambda l: not g.window(l),
               "all layers": lambda l: True}
    rows = []
    for s in args.schemes.split(","):
        si = calib.schemes.index(s)
        for label, pick in subsets.items():
            base = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, s).windowed(g.layer_windows)
            schemes = {st: {c: tuple(grid[l] if pick(l) else tuple("fp16" for _ in grid[l]) for l in range(g.num_layers))
                            for c, grid in v.items()} for st, v in base.schemes.items()}
            pmap = replace(base, schemes=schemes, _resolved={})
            predicted = float(sum(_window_option(calib, cost[l, h, st], s) if g.window(l) else cost[l, h, st, si, w0, n0]
                                  for l in range(g.num_layers) if pick(l) for h in range(g.num_kv_heads)
                                  for st in range(2)))
            measured = mean_kl(lm.model, ids, pmap, reference=ref)
            rows.append({"scheme": s, "layers": label, "predicted_kl": predicted, "measured_kl": measured,
                         "measured_over_predicted": measured / predicted})
            print(f"{s:<8} {label:<14} predicted {predicted:.4f} measured {measured:.4f} "
                  f"measured/predicted {measured / predicted:.2f}", flush=True)
    write_json(args.out, {"benchmark": "prediction_by_layer_type", "environment": environment(args.threads),
                          "model": args.model, "calibration": Path(args.calibration).name, "tokens": CORRECTION_TOKENS,
                          "results": rows})


if __name__ == "__main__":
    main()
