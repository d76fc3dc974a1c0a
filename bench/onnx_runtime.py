"""Decode speed and KV-cache bytes of an exported mixed-precision map vs a full-precision (fp16 KV) export.

    python bench/onnx_runtime.py [--scheme kivi-2 | --map MAP.json] [--contexts 512,2048] [--steps 16]

Both graphs are exported from the same model in this run and timed in this run with ONNX
Runtime (CPU, --threads intra-op threads; the CUDA provider when present).  At each context C
the prompt is C - steps tokens (one prefill), then ``steps`` greedy decode steps are timed;
decode tokens/s and the bytes of the packed cache after the last step (what the runtime
actually holds) are reported, with ratios against the fp16-KV export.  Prints a table and
writes bench/results/onnx_runtime.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

from kvcompile.data import DEFAULT_EVAL_TEXT, load_text  # noqa: E402
from kvcompile.export import export_onnx  # noqa: E402
from kvcompile.models import DEFAULT_MODEL, load_model  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.runtime import open_decoder  # noqa: E402


def measure(decoder, ids: np.ndarray, steps: int, repeats: int) -> dict:
    """Median decode seconds per step after prefilling ``ids``; cache bytes at the end."""
    per_step = []
    for _ in range(repeats):
        state = decoder.start(1)
        logits, state = decoder.step(ids[None], state)
        times = []
        for _ in range(steps):
            token = np.asarray([[int(logits[0, -1].argmax())]], dtype=np.int64)
            t0 = time.perf_counter()
            logits, state = decoder.step(token, state)
            times.append(time.perf_counter() - t0)
        per_step.append(statistics.median(times))
    return {"decode_s_per_token": min(per_step), "kv_bytes": decoder.cache_bytes(state)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scheme", default="kivi-2", help="map to benchmark: scheme or preset (default kivi-2)")
    g.add_argument("--map", help="precision map JSON (e.g. from kvcompile plan)")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "onnx_runtime.json"))
    args = ap.parse_args()
    setup(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]

    lm = load_model(args.model)
    label = Path(args.map).name if args.map else args.scheme
    maps = {"fp16 KV (baseline)": resolve_map("fp16", lm.geometry, model=args.model),
            label: resolve_map(args.map or args.scheme, lm.geometry, model=args.model)}
    ids = lm.tokenizer(load_text(DEFAULT_EVAL_TEXT), return_tensors="np").input_ids[0].astype(np.int64)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pmap in maps.items():
            t0 = time.perf_counter()
            ex = export_onnx(lm, pmap, Path(tmp) / f"export{len(rows)}", max_context=max(contexts))
            export_s = time.perf_counter() - t0
            decoder = open_decoder(ex, "ort", threads=args.threads)
            for context in contexts:
                m = measure(decoder, ids[: context - args.steps], args.steps, args.repeats)
                rows.append({"map": name, "context": context, "export_s": export_s,
                             "providers": decoder.providers, "tokens_per_s": 1 / m["decode_s_per_token"],
                             "kv_bytes": m["kv_bytes"], "map_bits_per_element": pmap.bits_per_element(context)})
                print(f"  {name} @ {context}: {rows[-1]['tokens_per_s']:.1f} tokens/s, {m['kv_bytes']} KV bytes", flush=True)
            del decoder

    base = {r["context"]: r for r in rows if r["map"].startswith("fp16")}
    for r in rows:
        r["speed_ratio"] = r["tokens_per_s"] / base[r["context"]]["tokens_per_s"]
        r["kv_bytes_ratio"] = r["kv_bytes"] / base[r["context"]]["kv_bytes"]
    print(f"\n{'map':<22} {'context':>7} {'tokens/s':>9} {'x fp16':>7} {'KV MiB':>8} {'x fp16':>7} {'bits/elt':>8}")
    for r in rows:
        print(f"{r['map']:<22} {r['context']:>7} {r['tokens_per_s']:>9.1f} {r['speed_ratio']:>7.2f} "
              f"{r['kv_bytes'] / 2**20:>8.2f} {r['kv_bytes_ratio']:>7.3f} {r['map_bits_per_element']:>8.2f}")
    write_json(args.output, {"benchmark": "onnx_runtime", "model": args.model, "steps": args.steps,
                             "environment": environment(args.threads), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
