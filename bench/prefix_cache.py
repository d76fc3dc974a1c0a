"""Prefix cache of compressed KV blocks: time to first token and memory on requests sharing a prefix.

    python bench/prefix_cache.py [--scheme kivi-2] [--prefix 448] [--requests 8] [--block 64] [--out bench/results/prefix_cache.json]

Workload: ``--requests`` prompts that share a ``--prefix``-token document (held-out text) and differ
in a 24-token question (other held-out text), each generating 8 tokens greedily on the default model
with a :class:`MixedPrecisionCache` of ``--scheme``.  Run twice in one process:

* cold: every request with an empty prefix cache (it still cuts the prompt at the same block
  boundary, so both runs do the same arithmetic on a miss);
* shared: one :class:`PrefixCache` across the requests (the first misses and inserts).

Reports time to first token (prefill) per request, the ratio shared / cold, hit statistics, whether
both runs generated the same tokens, and the entry's bytes against an fp16 cache of the same prefix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="kivi-2")
    ap.add_argument("--prefix", type=int, default=448, help="shared prefix tokens")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/prefix_cache.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.cache import PrefixCache
    from kvcompile.cache.prefix import generate
    from kvcompile.data import DEFAULT_EVAL_TEXT, load_text
    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map

    lm = load_model(args.model)
    pmap = resolve_map(args.scheme, lm.geometry)
    ids = lm.tokenizer(load_text(DEFAULT_EVAL_TEXT), return_tensors="pt").input_ids[0].tolist()
    shared = ids[: args.prefix]
    questions = [ids[args.prefix + 1000 + 24 * i: args.prefix + 1000 + 24 * (i + 1)] for i in range(args.requests)]
    generate(lm.model, shared[:80] + questions[0], PrefixCache(pmap, block_size=args.block), max_new_tokens=2)  # warm-up

    runs = {}
    for name in ("cold", "shared"):
        prefix = PrefixCache(pmap, block_size=args.block)
        rows = []
        for q in questions:
            if name == "cold":
                prefix = PrefixCache(pmap, block_size=args.block)
            g = generate(lm.model, shared + q, prefix, max_new_tokens=8)
            rows.append({"prefill_seconds": g.prefill_seconds, "reused_tokens": g.reused_tokens,
                         "computed_tokens": g.computed_tokens, "tokens": g.tokens})
        runs[name] = {"requests": rows, "stats": prefix.stats.to_json(), "entry_bytes": prefix.nbytes()}
    cold = [r["prefill_seconds"] for r in runs["cold"]["requests"]]
    warm = [r["prefill_seconds"] for r in runs["shared"]["requests"]]
    later = warm[1:]  # requests after the first, which inserted
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["cold"]["requests"], runs["shared"]["requests"]))
    aligned = len(shared + questions[0]) - 1
    aligned -= aligned % args.block
    fp16_bytes = 2 * lm.geometry.num_layers * lm.geometry.num_kv_heads * lm.geometry.head_dim * aligned * 2
    entry = runs["shared"]["stats"]["bytes"]
    print(f"{args.requests} requests, {len(shared)}-token shared prefix + 24-token question, {args.scheme} cache, "
          f"blocks of {args.block}")
    print(f"{'':<28} {'cold':>10} {'shared':>10} {'ratio':>8}")
    print(f"{'median TTFT, requests 2..':<28} {statistics.median(cold[1:]):>9.3f}s {statistics.median(later):>9.3f}s "
          f"{statistics.median(later) / statistics.median(cold[1:]):>8.3f}")
    print(f"{'total prefill':<28} {sum(cold):>9.3f}s {sum(warm):>9.3f}s {sum(warm) / sum(cold):>8.3f}")
    s = runs["shared"]["stats"]
    print(f"hits {s['hits']}/{s['lookups']}, prompt tokens reused {s['hit_tokens']} ({s['token_hit_rate']:.0%} of aligned "
          f"tokens looked up); same generated tokens: {same}")
    print(f"entry: {entry} bytes for {aligned} positions = {entry / fp16_bytes:.3f}x an fp16 cache of the same prefix")
    write_json(args.out, {"benchmark": "prefix_cache", "environment": environment(args.threads), "scheme": args.scheme,
                          "prefix_tokens": len(shared), "requests": args.requests, "block_size": args.block,
                          "ttft_ratio_median": statistics.median(later) / statistics.median(cold[1:]),
                          "prefill_ratio_total": sum(warm) / sum(cold), "same_tokens": same,
                          "entry_bytes": entry, "fp16_bytes": fp16_bytes, "runs": runs})


if __name__ == "__main__":
    main()
