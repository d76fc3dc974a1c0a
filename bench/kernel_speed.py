"""Decode-attention and append kernels vs fp16 scaled_dot_product_attention, on a GPU.

    python bench/kernel_speed.py [--contexts 4096,32768,131072] [--batches 1,16] [--schemes kivi-2,kivi-4,int8,int4]

For each scheme, context T and batch B: one decode step (one query position per sequence) over a
cache of T positions for one layer (Hq query heads, Hkv kv heads, head dim D), timed with CUDA
events (median of --repeats after warm-up) against ``torch.nn.functional.scaled_dot_product_attention``
on the same cache in fp16, in the same run.  Reported: latency, speedup over fp16, the byte
ratio fp16 / packed, achieved GB/s (packed bytes read / time) and its fraction of this GPU's copy
bandwidth measured in the same run.  The target (issue 6) is speedup >= 0.7 x byte ratio at 32k.
Also the append kernel's throughput (positions quantized per second).

Without a GPU it says so and exits 0.  ``--device cpu`` (with TRITON_INTERPRET=1) runs the same
code on tiny shapes as a smoke test of the benchmark itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, timed, write_json  # noqa: E402

from kvcompile.kernels import available  # noqa: E402

SCHEMES = {  # name: (bulk K scheme, bulk V scheme)
    "fp16": ("fp16", "fp16"),
    "int8": ("int8", "int8"),
    "kivi-4": ("int4-ch", "int4"),
    "int4": ("int4", "int4"),
    "kivi-2": ("int2-ch", "int2"),
}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the achievable-bandwidth yardstick."""
    n = (1 << 30) if device == "cuda" else (1 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / timed(lambda: b.copy_(a), 10, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--contexts", default="4096,16384,32768,131072")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--schemes", default="fp16,int8,kivi-4,int4,kivi-2")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--block-t", type=int, default=64)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "kernels.json"))
    args = ap.parse_args()
    ok, reason = available(args.device)
    if not ok:
        print(f"bench/kernel_speed.py: no kernel run on {args.device}: {reason}. Nothing measured.")
        return 0
    from kvcompile.kernels import decode_attention, quantize
    from kvcompile.kernels.attention import Segment, Stored
    from kvcompile.quant import get_scheme

    dev = args.device
    if dev == "cpu":
        print("smoke test on the Triton interpreter: timings are not meaningful")
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    peak = copy_bandwidth(dev)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(batch, hkv, context, d, device=dev, generator=gen)
            v = torch.randn(batch, hkv, context, d, device=dev, generator=gen)
            q = torch.randn(batch, hq, d, device=dev, generator=gen)
            k16, v16, q16 = k.half(), v.half(), q.half()[:, :, None]

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True)

            base_s = timed(sdpa, args.repeats, dev)
            base_bytes = k16.numel() * 2 * 2
            for name in args.schemes.split(","):
                ks, vs = (get_scheme(s) for s in SCHEMES[name])
                kq, vq = ks.quantize(k), vs.quantize(v)
                seg = Segment.whole(Stored(ks, kq.parts, context), Stored(vs, vq.parts, context))
                packed = kq.nbytes + vq.nbytes
                seconds = timed(lambda: decode_attention(q, [seg], d ** -0.5, block_t=args.block_t), args.repeats, dev)
                rows.append({"scheme": name, "context": context, "batch": batch, "seconds": seconds,
                             "sdpa_fp16_seconds": base_s, "speedup": base_s / seconds,
                             "byte_ratio": base_bytes / packed, "gbps": packed / seconds / 1e9,
                             "fraction_of_copy_bandwidth": packed / seconds / peak})
                r = rows[-1]
                r["target_met"] = r["speedup"] >= 0.7 * r["byte_ratio"]
                print(f"{name:<7} T={context:<7} B={batch:<3} {1e6 * seconds:9.1f} us  x{r['speedup']:.2f} vs fp16 sdpa "
                      f"(bytes x{r['byte_ratio']:.2f})  {r['gbps']:.0f} GB/s", flush=True)
            del k, v, k16, v16
    append = []
    for name in ("int8", "int4", "int2", "int2-ch"):
        s = get_scheme(name)
        x = torch.randn(16, hkv, max(s.token_group, 32), d, device=dev)
        seconds = timed(lambda: quantize(s, x), args.repeats, dev)
        append.append({"scheme": name, "positions_per_s": x.shape[0] * x.shape[2] / seconds})
    print(f"\n{'scheme':<8} {'context':>7} {'batch':>5} {'us':>9} {'x sdpa fp16':>11} {'bytes x':>8} {'GB/s':>7} "
          f"{'of copy bw':>10}  target")
    for r in rows:
        print(f"{r['scheme']:<8} {r['context']:>7} {r['batch']:>5} {1e6 * r['seconds']:>9.1f} {r['speedup']:>11.2f} "
              f"{r['byte_ratio']:>8.2f} {r['gbps']:>7.0f} {r['fraction_of_copy_bandwidth']:>10.2f}  "
              f"{'met' if r['target_met'] else 'missed'}")
    print("append: " + ", ".join(f"{a['scheme']} {a['positions_per_s']:.3g} positions/s" for a in append))
    write_json(args.output, {"benchmark": "kernels", "device": reason, "copy_bandwidth_bytes_per_s": peak,
                             "geometry": {"q_heads": hq, "kv_heads": hkv, "head_dim": d},
                             "environment": environment(torch.get_num_threads()), "results": rows, "append": append})
    return 0


if __name__ == "__main__":
    sys.exit(main())
