"""The TensorRT plugin's kernels (libkvcompile_trt.so) on a GPU: exactness, then decode speed vs fp16.

    python bench/plugin_speed.py [--contexts 4096,16384,32768] [--batches 1,8] [--schemes fp16,kivi-4,kivi-2]

The kernels are launched as the plugin's enqueue launches them (``kvc_trt_enqueue``: the same
parameters, the same driver-API launches), on CUDA torch tensors, without TensorRT.

1. Exactness: for a few maps and a sliding-window layer's op (KVWindowAttention, window 64), over
   ragged prefill/decode steps, the GPU's present parts must be
   bit-identical to the CPU run of the same block programs (``kvc_trt_emulate``, which the unit
   tests check against the torch reference), and its attention output within 1e-5 of it.
2. Speed: one decode step (one new position per sequence) of one layer (Hq query heads, Hkv kv
   heads, head dim D) over a past of T positions, timed with CUDA events (median of --repeats
   after warm-up) against ``torch.nn.functional.scaled_dot_product_attention`` over the same cache
   in fp16, in the same run.  Reported: latency, speedup over fp16, the byte ratio fp16 / packed,
   and speedup / byte ratio, the fraction of the ideal bandwidth gain the kernels turn into speed.
   The step includes the append, which copies the past into the present outputs (the graph's
   past -> present interface): about twice the packed bytes move per step.

Without a GPU it says so and exits 0; ``--device cpu`` runs both parts on tiny shapes through the
CPU runner instead (a smoke test of this script; its timings mean nothing).  Not run in this
project's CI (no GPU): bench/gpu_check.sh runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, timed, write_json  # noqa: E402

from kvcompile.ops import KV_ATTENTION  # noqa: E402
from kvcompile.ops.attention import stream_attrs  # noqa: E402
from kvcompile.ops.cache_update import run_cache_update, segment_ports  # noqa: E402
from kvcompile.targets.trt.library import HostApi  # noqa: E402

MAPS = {  # name: (key sink, recent, bulk), (value sink, recent, bulk), window
    "fp16": (("fp16", "fp16", "fp16"), ("fp16", "fp16", "fp16"), 0),
    "int8": (("fp16", "fp16", "int8"), ("fp16", "fp16", "int8"), 32),
    "kivi-4": (("fp16", "fp16", "int4-ch"), ("fp16", "fp16", "int4"), 32),
    "kivi-2": (("fp16", "fp16", "int2-ch"), ("fp16", "fp16", "int2"), 32),
    "mixed": (("fp16", "int8", "int3-ch"), ("fp16", "int4", "nf4"), 32),
}
TORCH = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def attrs_of(name: str, head_dim: int, q_per_kv: int, sinks: int = 4) -> dict:
    key, value, window = MAPS[name]
    attrs = {f"{s}_{c}_scheme": v for s, schemes in (("key", key), ("value", value))
             for c, v in zip(("sink", "recent", "bulk"), schemes)}
    attrs.update(key_age_tiers="", value_age_tiers="", sink_tokens=sinks if name != "fp16" else 0,
                 recent_window=window, head_dim=head_dim, q_per_kv=q_per_kv, scale=head_dim ** -0.5)
    return attrs


class Runner:
    """One KVAttention call on the chosen device: the GPU enqueue, or the CPU runner."""

    def __init__(self, api: HostApi, device: str):
        self.api, self.device = api, device

    def __call__(self, attrs: dict, inputs: list[torch.Tensor], past: int) -> list[torch.Tensor]:
        """``past``: positions the inputs' past parts hold (sizes the workspace)."""
        if self.device == "cpu":
            return [torch.from_numpy(a) for a in self.api.emulate(attrs, [t.numpy() for t in inputs])]
        _, out_bytes = self.api.io(attrs)
        dims = self.api.output_dims(attrs, [tuple(t.shape) for t in inputs])
        dtypes = {4: torch.float32, 2: torch.float16, 1: torch.int8}
        outputs = [torch.empty(d, dtype=dtypes[b], device="cuda") for d, b in zip(dims, out_bytes)]
        b, h, s = (int(v) for v in inputs[1].shape[:3])
        workspace = torch.empty(self.api.workspace_size(attrs, b, h, s, past + s), dtype=torch.uint8, device="cuda")
        self.api.enqueue_on_gpu(attrs, inputs, outputs, workspace, torch.cuda.current_stream().cuda_stream)
        return outputs


def past_of(attrs: dict, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """The packed past after storing k, v [B, H, T, D] (the torch reference, on the CPU)."""
    parts = []
    for stream, x in (("key", k), ("value", v)):
        sa = stream_attrs(attrs, stream)
        empty = [torch.zeros(x.shape[0], x.shape[1], 0, int(p.shape[-1]), dtype=TORCH[p.dtype])
                 for p in segment_ports(sa, "past")]
        parts += list(run_cache_update(sa, [*empty, x])[:-1])
    return parts


def check_exact(api: HostApi, run: Runner, device: str) -> list[dict]:
    """GPU vs the CPU runner over ragged steps; returns one row per (map, step)."""
    from kvcompile.ops import KV_WINDOW_ATTENTION
    from kvcompile.ops.window_attention import window_attrs

    rows = []
    cases = [(name, KV_ATTENTION, attrs_of(name, 64, 3, sinks=2)) for name in ("kivi-2", "mixed", "int8")]
    # a sliding-window layer's op (window 64): the 300-position prefill and the decode steps evict
    cases.append(("window", KV_WINDOW_ATTENTION, window_attrs("int4", "int8", 64, 64, 3, 0.125)))
    for name, op, attrs in cases:
        ports = op.inputs(attrs)
        past = [np.zeros((2, 2, 0, int(p.shape[-1])), {"float32": np.float32, "float16": np.float16,
                                                       "int8": np.int8}[p.dtype]) for p in ports[3:]]
        gen = torch.Generator().manual_seed(0)
        done = 0
        for step, n in enumerate([37, 1, 1, 300, 1]):
            q, k, v = (torch.randn(2, c, n, 64, generator=gen) for c in (6, 2, 2))
            want = api.emulate(attrs, [q.numpy(), k.numpy(), v.numpy(), *past])
            got = run(attrs, [t.to(device) for t in (q, k, v, *(torch.from_numpy(p) for p in past))], done)
            done += n
            got = [g.cpu().numpy() for g in got]
            parts_equal = all(np.array_equal(a, w) for a, w in zip(got[1:], want[1:]))
            error = float(np.abs(got[0] - want[0]).max())
            rows.append({"map": name, "step": step, "positions": n, "parts_bit_identical": parts_equal,
                         "max_abs_output_difference": error, "ok": parts_equal and error <= 1e-5})
            print(f"exactness {name:<7} step {step} (+{n:>3}): parts {'identical' if parts_equal else 'DIFFER'}, "
                  f"output max |diff| {error:.2e}", flush=True)
            past = want[1:]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--schemes", default="fp16,int8,kivi-4,kivi-2")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "plugin_speed.json"))
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/plugin_speed.py: no CUDA GPU is visible; nothing measured (--device cpu: a smoke test)")
        return 0
    if device == "cpu":
        print("smoke test on the CPU runner: timings are not meaningful")
        args.contexts, args.batches, args.q_heads, args.kv_heads, args.head_dim, args.repeats = "64", "1", 4, 2, 64, 2
    api = HostApi()
    run = Runner(api, device)
    exact = check_exact(api, run, device)
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator().manual_seed(0)
            k, v = torch.randn(batch, hkv, context, d, generator=gen), torch.randn(batch, hkv, context, d, generator=gen)
            q1, k1, v1 = (torch.randn(batch, c, 1, d, generator=gen) for c in (hq, hkv, hkv))
            k16, v16 = k.half().to(device), v.half().to(device)
            q16 = q1.half().to(device)
            base_s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True),
                           args.repeats, device)
            base_bytes = 2 * k16.numel() * 2
            for name in args.schemes.split(","):
                attrs = attrs_of(name, d, hq // hkv)
                past = [p.to(device) for p in past_of(attrs, k, v)]
                packed = sum(p.numel() * p.element_size() for p in past)
                inputs = [q1.to(device), k1.to(device), v1.to(device), *past]
                seconds = timed(lambda: run(attrs, inputs, context), args.repeats, device)
                r = {"scheme": name, "context": context, "batch": batch, "seconds": seconds,
                     "sdpa_fp16_seconds": base_s, "speedup": base_s / seconds, "byte_ratio": base_bytes / packed}
                r["fraction_of_byte_ratio"] = r["speedup"] / r["byte_ratio"]
                rows.append(r)
                print(f"{name:<7} T={context:<6} B={batch:<3} {1e6 * seconds:9.1f} us  x{r['speedup']:.2f} vs fp16 "
                      f"sdpa (bytes x{r['byte_ratio']:.2f}: {r['fraction_of_byte_ratio']:.2f} of it)", flush=True)
    print(f"\n{'scheme':<8} {'context':>7} {'batch':>5} {'us':>9} {'x sdpa fp16':>11} {'bytes x':>8} {'of bytes x':>10}")
    for r in rows:
        print(f"{r['scheme']:<8} {r['context']:>7} {r['batch']:>5} {1e6 * r['seconds']:>9.1f} {r['speedup']:>11.2f} "
              f"{r['byte_ratio']:>8.2f} {r['fraction_of_byte_ratio']:>10.2f}")
    ok = all(row["ok"] for row in exact)
    print(f"exactness: {'GPU == CPU runner' if ok else 'MISMATCH'} over {len(exact)} steps")
    if device == "cuda":
        write_json(args.output, {"benchmark": "plugin_speed", "device": torch.cuda.get_device_name(),
                                 "geometry": {"q_heads": hq, "kv_heads": hkv, "head_dim": d},
                                 "environment": environment(torch.get_num_threads()), "exactness": exact,
                                 "results": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
