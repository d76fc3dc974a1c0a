"""The whole planning loop from Python: calibrate, plan under a budget, evaluate on held-out text.

    python examples/02_calibrate_plan_evaluate.py [--windows 2] [--window 256] [--budget 4.0] [--out DIR]
"""

import argparse
import tempfile

import torch

import kvcompile
from kvcompile.calibrate import calibrate
from kvcompile.plan.optimize import plan
from kvcompile.plan.presets import resolve_map
from kvcompile.measure.quality import evaluate, format_table

ap = argparse.ArgumentParser()
ap.add_argument("--windows", type=int, default=2)
ap.add_argument("--window", type=int, default=256)
ap.add_argument("--budget", type=float, default=4.0)
ap.add_argument("--out", default=tempfile.mkdtemp(prefix="kvcompile-example-"))
args = ap.parse_args()
torch.set_num_threads(2)

lm = kvcompile.load_model()
calib = calibrate(lm, windows=args.windows, window=args.window)        # on wikipedia-calibration
calib.save(f"{args.out}/calibration")
result = plan(calib, budget_bits=args.budget, context=args.window)
result.pmap.save(f"{args.out}/map.json")
print(result.pmap.description)
maps = {"planned": result.pmap, "int4": resolve_map("int4", lm.geometry), "kivi-2": resolve_map("kivi-2", lm.geometry)}
print(format_table(evaluate(lm, maps, window=args.window, max_windows=args.windows)))  # on wikipedia-heldout
print(f"artifacts in {args.out}")
