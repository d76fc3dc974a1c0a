"""Baseline quality of KV storage formats on the default model and held-out text.

    python bench/quality.py [--windows 16] [--window 512] [--out bench/results/quality.json]

Scores every scheme on the same windows (exact simulation of token-by-token decoding through
the quantized cache) against the full-precision cache, counting every stored bit (scales, zero
points, fp16 sinks and windows).  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

# (label, map spec, sinks, recent window)
SCHEMES = [
    ("fp16", "fp16", None, None),
    ("int8 per-token g32", "int8", None, None),
    ("fp8 e4m3", "fp8", None, None),
    ("int4 per-token g32", "int4", None, None),
    ("int4 per-token g32 +H", "int4-rot", None, None),
    ("nf4 g16 dq", "nf4", None, None),
    ("int2 per-token g32", "int2", None, None),
    ("int2 per-token g32 +H", "int2-rot", None, None),
    ("kivi-4 w32", "kivi-4", 0, 32),
    ("kivi-4 w32 +4 sinks", "kivi-4", 4, 32),
    ("kivi-2 w32", "kivi-2", 0, 32),
    ("kivi-2 w32 +4 sinks", "kivi-2", 4, 32),
    ("kivi-2 w128", "kivi-2", 0, 128),
    ("kivi-2 w128 +4 sinks", "kivi-2", 4, 128),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/quality.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map
    from kvcompile.measure.quality import evaluate, format_table

    lm = load_model(args.model)
    maps = {label: resolve_map(spec, lm.geometry, sink_tokens=s, recent_window=w) for label, spec, s, w in SCHEMES}
    results = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.windows)
    print(f"model {args.model}, text {args.text}")
    print(format_table(results))
    write_json(args.out, {"benchmark": "quality", "environment": environment(args.threads), "model": args.model,
                          "text": args.text, "results": [r.to_json() for r in results]})


if __name__ == "__main__":
    main()
