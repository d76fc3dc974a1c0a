"""KV bytes per sequence of a model with sliding-window layers: evicting vs keeping every position.

    python bench/window_memory.py [--model gemma3-270m] [--maps fp16,int8,int4,PLAN.json] [--contexts 512,4096,32768]

For each map, the exact stored bytes of one sequence at each context (``PrecisionMap.kv_bytes``:
window layers hold min(N, W) positions) beside the same map with every layer keeping every
position (what a cache without eviction, e.g. the map applied as if no layer had a window, would
hold), and their ratio.  Counting only; nothing is run.  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--maps", default="fp16,int8,int4")
    ap.add_argument("--contexts", default="512,4096,32768")
    ap.add_argument("--out", default="bench/results/window_memory_gemma3.json")
    args = ap.parse_args()

    from transformers import AutoConfig

    from kvcompile.models import adapter_for, resolve_model_path
    from kvcompile.plan.presets import resolve_map

    path = resolve_model_path(args.model)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name) if path.is_file() else \
        AutoConfig.from_pretrained(path)
    geometry = adapter_for(config).geometry(config)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for spec in args.maps.split(","):
        pmap = resolve_map(spec, geometry)
        # the same schemes with no layer evicting (window layers keep their one scheme for every position)
        unbounded = replace(pmap, layer_windows=(), _resolved={})
        for n in contexts:
            rows.append({"map": Path(spec).name, "context": n, "kv_bytes": pmap.kv_bytes(n),
                         "kv_bytes_without_eviction": unbounded.kv_bytes(n),
                         "ratio": pmap.kv_bytes(n) / unbounded.kv_bytes(n),
                         "bits_per_element": pmap.bits_per_element(n)})
    print(f"model {args.model}: {sum(1 for w in geometry.layer_windows if w)} of {geometry.num_layers} layers slide "
          f"(window {max(geometry.layer_windows, default=0)})")
    print(f"{'map':<24} {'context':>8} {'KV MB':>9} {'no eviction':>12} {'ratio':>7} {'bits/elt':>9}")
    for r in rows:
        print(f"{r['map']:<24} {r['context']:>8} {r['kv_bytes'] / 1e6:>9.2f} {r['kv_bytes_without_eviction'] / 1e6:>12.2f} "
              f"{r['ratio']:>7.3f} {r['bits_per_element']:>9.3f}")
    write_json(args.out, {"benchmark": "window_memory", "environment": environment(1), "model": args.model,
                          "layer_windows": list(geometry.layer_windows), "results": rows})


if __name__ == "__main__":
    main()
