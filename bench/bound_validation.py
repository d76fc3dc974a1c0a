"""Does the per-site prediction (and the HNF bound built on it) match measured error?

    python bench/bound_validation.py [--calibration bench/results/calibration] [--sites 24] [--windows 2]

For a random sample of (layer, kv head, K|V) sites and formats, stores only that site's positions
in that format (everything else fp16, no sinks, no window), measures the mean KL with the exact
simulation on calibration windows, and compares it with

* the calibration's prediction for that site and format (its estimator: hybrid by default), raw
  and times the data-calibrated constant c of its format (what the planner optimizes), and
* the HNF closed form  kappa m D^2 / (24 (2^b - 1)^2)  from the site's curvature kappa and range D.

Reports Spearman rank correlation, the fraction of sites where measured <= c * predicted for c = 1
and for the c calibrated so the bound holds on 90 % of sites, writes JSON and a scatter plot.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

FORMATS = ["int4", "int3", "int2", "int2-ch", "int4-ch", "nf4", "fp8", "int2-rot"]


def spearman(a, b) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", default="bench/results/calibration")
    ap.add_argument("--sites", type=int, default=24)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/bound_validation.json")
    ap.add_argument("--plot", default="bench/results/bound_validation.png")
    args = ap.parse_args()
    setup(args.threads)

    import numpy as np
    from tqdm import tqdm

    from kvcompile.calibrate import Calibration
    from kvcompile.models import load_model
    from kvcompile.kv.precision_map import STREAMS, PrecisionMap
    from kvcompile.quant import get_scheme
    from kvcompile.measure.quality import mean_kl, token_windows
    from kvcompile.data import load_text

    calib = Calibration.load(args.calibration)
    lm = load_model(calib.model)
    g = calib.geometry
    windows = token_windows(lm.tokenizer, load_text(calib.text), calib.window, args.windows)
    rng = random.Random(args.seed)
    formats = [f for f in FORMATS if f in calib.schemes]
    samples = [(rng.randrange(g.num_layers), rng.randrange(g.num_kv_heads), rng.randrange(2), rng.choice(formats))
               for _ in range(args.sites)]
    w0, n0 = calib.window_options.index(0), calib.sink_options.index(0)
    rows = []
    for layer, head, stream, fmt in tqdm(samples, desc="single-site KL"):
        base = PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, key="fp16")
        bulk = {s: [list(r) for r in base.schemes[s]["bulk"]] for s in STREAMS}
        bulk[STREAMS[stream]][layer][head] = fmt
        pmap = base.with_bulk({s: tuple(tuple(r) for r in bulk[s]) for s in STREAMS})
        measured = mean_kl(lm.model, windows, pmap)
        si = calib.schemes.index(fmt)
        predicted = calib.cost[layer, head, stream, si, w0, n0].item()
        scheme = get_scheme(fmt)
        kappa = calib.curvature[layer, head, stream, w0].item()
        m = calib.window * g.head_dim  # elements of the site per window
        hnf = kappa * m * calib.diameter[layer, head, stream].item() ** 2 / (24 * (2**scheme.bits - 1) ** 2) / (calib.window - 1)
        rows.append({"layer": layer, "head": head, "stream": STREAMS[stream], "scheme": fmt, "measured_kl": measured,
                     "predicted": predicted, "predicted_corrected": predicted * calib.correction[si].item(),
                     "predicted_hnf": hnf})
    meas = np.array([r["measured_kl"] for r in rows])
    summary = {}
    for key in ("predicted", "predicted_corrected", "predicted_hnf"):
        pred = np.array([r[key] for r in rows])
        ratio = meas / np.maximum(pred, 1e-30)
        c90 = float(np.quantile(ratio, 0.9))
        summary[key] = {"spearman": spearman(pred, meas), "holds_c1": float(np.mean(meas <= pred)),
                        "c_for_90pct": c90, "holds_c90": float(np.mean(meas <= c90 * pred)),
                        "median_ratio": float(np.median(ratio))}
    print(f"{'prediction':<28} {'spearman':>8} {'holds c=1':>9} {'c (90%)':>8} {'median meas/pred':>16}")
    for key, s in summary.items():
        print(f"{key:<28} {s['spearman']:>8.3f} {s['holds_c1']:>9.2f} {s['c_for_90pct']:>8.2f} {s['median_ratio']:>16.2f}")
    write_json(args.out, {"benchmark": "bound_validation", "environment": environment(args.threads),
                          "calibration": args.calibration, "estimator": calib.estimator, "windows": args.windows, "summary": summary, "sites": rows})
    from kvcompile.report.plots import scatter_predicted_measured

    scatter_predicted_measured(rows, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
