"""Decode speed and peak memory in ONNX Runtime: fp16-KV export vs packed export (function bodies / native library).

    python bench/onnx_runtime.py [--scheme kivi-2 | --map MAP.json] [--contexts 512,2048,8192] [--batches 1,8]

Variants, all exported from the same model in this run and timed in this run with ONNX Runtime
on the CPU (``--threads`` intra-op threads):

* ``fp16 KV``: the map ``fp16`` (plain fp16 cache, MatMul/Softmax attention) - the baseline;
* ``packed, function bodies``: the packed map with KVAttention run as its ONNX function body
  (stock ONNX Runtime, ``native=False``);
* ``packed, native``: the same ``model.onnx`` with kvcompile's native library registered;
* ``packed, native, Lloyd-Max in bodies`` (``--variants ...,native-lm-body``): the packed map exported
  as if the library had no Lloyd-Max reader (those head groups run the function body), native
  library registered: the baseline for the library's Lloyd-Max reader;
* ``cross-layer predicted, native`` (``--variants ...,predicted --predicted-map MAP.json``): a map
  with cross-layer predictors (``kvcompile calibrate --predict``), its residual segments written and
  read by the native ``KVQuantize`` / ``KVDequantize`` kernels, the predictions and attention in
  standard ops (:mod:`kvcompile.export.predicted`);
* ``ORT GroupQueryAttention, int8 KV``: ONNX Runtime's own fused attention with a quantized
  cache (``com.microsoft.GroupQueryAttention``), tried on a one-layer graph; recorded as not
  runnable, with ONNX Runtime's reason, when this build has no CPU kernel for it.

Each point (variant, context C, batch B) runs in its own process, so that its peak resident
memory (``ru_maxrss``) is its own.  The cache holds C - steps positions before timing starts:
Gaussian keys and values (unit variance) stored through the map's own segment rule
(:func:`kvcompile.ops.cache_update.run_cache_update`; decode speed does not depend on the
values), then ``steps`` decode steps of B sequences are timed after one warm-up step (median);
each point runs ``--rounds`` times, the variants in alternating order, and keeps its fastest run
(a 2-core machine's background noise only slows runs down).  Reported:
decode tokens/s (B tokens per step), the ratio to the fp16-KV export at the same (C, B), the bytes
of the cache the runtime holds, and peak RSS.  Prints a table and writes
bench/results/onnx_runtime.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

#: variant key -> label
VARIANTS = {"fp16": "fp16 KV", "body": "packed, function bodies", "native": "packed, native",
            "native-lm-body": "packed, native, Lloyd-Max in bodies", "predicted": "cross-layer predicted, native"}
#: variant key -> the export it runs (native-lm-body: exported as if the library had no Lloyd-Max reader,
#: so those head groups are KVAttentionPortable nodes: what a planned map ran before that reader)
EXPORTS = {"fp16": "fp16 KV", "body": "packed", "native": "packed", "native-lm-body": "packed, lm portable",
           "predicted": "predicted"}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not carry over an exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_past(export, batch: int, positions: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The graph's past inputs holding ``positions`` Gaussian positions, stored as the map says.

    One layer's tensors are computed per distinct group signature and copied for the others, so
    every input is its own array (the memory a runtime really holds)."""
    import torch

    from kvcompile.ops.cache_update import run_cache_update

    made: dict[tuple, list[np.ndarray]] = {}
    past = {}
    g = torch.Generator().manual_seed(seed)
    for group in export.groups:
        heads = len(group.heads)
        if group.window:  # a sliding-window layer holds its last W - 1 positions, one per-token scheme
            rows = min(positions, group.window - 1)
            key = ("window", group.bulk_scheme, group.plain, heads, rows)
            if key not in made:
                from kvcompile.quant import get_scheme

                states = torch.randn(batch, heads, rows, export.pmap.head_dim, generator=g)
                scheme = get_scheme("fp16" if group.plain else group.bulk_scheme)
                made[key] = [t.numpy() for t in scheme.quantize(states).parts.values()]
        elif group.plain:
            key = ("plain", heads)
            if key not in made:
                made[key] = [torch.randn(batch, heads, positions, export.pmap.head_dim, generator=g).half().numpy()]
        else:
            attrs = group.op_attrs(export.pmap)
            key = (tuple(sorted(attrs.items())), heads)
            if key not in made:
                from kvcompile.quant import get_scheme
                from kvcompile.quant.base import part_layout
                from kvcompile.ops.cache_update import class_scheme, segments

                empty = [torch.zeros(batch, heads, 0, p.width, dtype=p.dtype) for seg in segments(attrs)
                         for p in part_layout(get_scheme(class_scheme(attrs, seg).name), attrs["head_dim"])]
                states = torch.randn(batch, heads, positions, attrs["head_dim"], generator=g)
                made[key] = [t.numpy() for t in run_cache_update(attrs, [*empty, states])[:-1]]
        for port, value in zip(group.ports, made[key]):
            past[port.past] = value.copy()
    return past


def worker(job: dict) -> dict:
    """One (variant, context, batch) point; runs in its own process."""
    from kvcompile.export import ExportedModel
    from kvcompile.runtime import open_decoder

    ex = ExportedModel.load(job["export"])
    batch, steps = job["batch"], job["steps"]
    decoder = open_decoder(ex, "ort", threads=job["threads"], native=job["native"])
    state = {"past": synthetic_past(ex, batch, job["context"] - steps - 1), "length": job["context"] - steps - 1}
    token = np.full((batch, 1), 42, dtype=np.int64)
    _, state = decoder.step(token, state)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, state = decoder.step(token, state)
        times.append(time.perf_counter() - t0)
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    step_s = statistics.median(times)
    return {"tokens_per_s": batch / step_s, "step_s": step_s, "kv_bytes": decoder.cache_bytes(state),
            "peak_rss_bytes": peak_rss_bytes(), "runner": decoder.name}


def gqa_node(hq: int, hkv: int, d: int):
    """One com.microsoft.GroupQueryAttention node with an int8 cache and per-tensor scales."""
    from onnx import TensorProto, helper

    node = helper.make_node("GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                                                    "total_sequence_length", "", "", "", "", "", "k_scale", "v_scale"],
                            ["output", "present_key", "present_value"], domain="com.microsoft", num_heads=hq,
                            kv_num_heads=hkv, k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR",
                            kv_cache_bit_width=8)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "gqa", [
        helper.make_tensor_value_info("query", f, ["B", "S", hq * d]),
        helper.make_tensor_value_info("key", f, ["B", "S", hkv * d]),
        helper.make_tensor_value_info("value", f, ["B", "S", hkv * d]),
        helper.make_tensor_value_info("past_key", TensorProto.INT8, ["B", hkv, "P", d]),
        helper.make_tensor_value_info("past_value", TensorProto.INT8, ["B", hkv, "P", d]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("k_scale", f, [1]), helper.make_tensor_value_info("v_scale", f, [1])],
        [helper.make_tensor_value_info("output", f, None),
         helper.make_tensor_value_info("present_key", TensorProto.INT8, None),
         helper.make_tensor_value_info("present_value", TensorProto.INT8, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def time_session(sess, feed: dict, repeats: int) -> float:
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_peers(export_dir: str, context: int, batch: int, threads: int, repeats: int) -> dict:
    """One layer's decode attention at (context, batch): KVAttention with the native library vs
    ONNX Runtime's GroupQueryAttention with an int8 cache (per-tensor scales), same shapes."""
    import onnxruntime as ort

    from kvcompile.export import ExportedModel
    from kvcompile.kernels import native
    from kvcompile.ops import KV_ATTENTION
    from kvcompile.ops.attention import attention_attrs

    ex = ExportedModel.load(export_dir)
    key_group, value_group = ex.groups[0], ex.groups[len(ex.groups) // (2 * ex.geometry["num_layers"])]
    hkv, hq, d = len(key_group.heads), ex.geometry["num_q_heads"], ex.pmap.head_dim
    past = synthetic_past(ex, batch, context - 1)
    attrs = attention_attrs(key_group.op_attrs(ex.pmap), value_group.op_attrs(ex.pmap), hq // hkv, d ** -0.5)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, h, 1, d)).astype(np.float32) for h in (hq, hkv, hkv))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    native.register(options)
    ours = ort.InferenceSession(KV_ATTENTION.single_node_model(attrs).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    ports = KV_ATTENTION.inputs(attrs)[3:]
    names = [p.past for p in key_group.ports] + [p.past for p in value_group.ports]
    feed = {"query": q, "key": k, "value": v, **{p.name: past[n] for p, n in zip(ports, names)}}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    peer = ort.InferenceSession(gqa_node(hq, hkv, d).SerializeToString(), options, providers=["CPUExecutionProvider"])
    cache = rng.integers(-127, 128, (batch, hkv, context - 1, d), dtype=np.int8)
    peer_feed = {"query": q.transpose(0, 2, 1, 3).reshape(batch, 1, hq * d),
                 "key": k.transpose(0, 2, 1, 3).reshape(batch, 1, hkv * d),
                 "value": v.transpose(0, 2, 1, 3).reshape(batch, 1, hkv * d), "past_key": cache, "past_value": cache.copy(),
                 "seqlens_k": np.full(batch, context - 1, np.int32), "total_sequence_length": np.array(context, np.int32),
                 "k_scale": np.full(1, 0.05, np.float32), "v_scale": np.full(1, 0.05, np.float32)}
    native_s, gqa_s = float("inf"), float("inf")
    for _ in range(3):  # interleaved, fastest median of each kept
        native_s = min(native_s, time_session(ours, feed, repeats))
        gqa_s = min(gqa_s, time_session(peer, peer_feed, repeats))
    return {"context": context, "batch": batch, "native_ms": 1e3 * native_s, "gqa_int8_ms": 1e3 * gqa_s,
            "native_speedup_vs_gqa_int8": gqa_s / native_s, "onnxruntime": ort.__version__}


@contextlib.contextmanager
def _without_lloyd_reader(active: bool):
    """Export as if the native library could not read Lloyd-Max formats (their groups: KVAttentionPortable)."""
    if not active:
        yield
        return
    from kvcompile.quant.base import family_traits, update_traits
    from kvcompile.quant.lloyd import LloydMaxScheme

    saved = family_traits(LloydMaxScheme()).native
    update_traits(LloydMaxScheme, native=None)
    try:
        yield
    finally:
        update_traits(LloydMaxScheme, native=saved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scheme", default="kivi-2", help="packed map: scheme or preset (default kivi-2)")
    g.add_argument("--map", help="precision map JSON (e.g. from kvcompile plan)")
    ap.add_argument("--predicted-map", help="a map with cross-layer predictors, for the predicted variant")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per point (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs per point, in alternating variant order; the fastest is kept (all are in the JSON)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp16,body,native",
                    help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one layer's attention: KVAttention native vs ORT GroupQueryAttention (int8 cache)")
    ap.add_argument("--peer-repeats", type=int, default=30)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "onnx_runtime.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup(args.threads)
    if args.worker:
        job = json.loads(args.worker)
        result = attention_peers(job["peers"], job["context"], job["batch"], job["threads"], job["repeats"]) \
            if "peers" in job else worker(job)
        print(json.dumps(result))
        return 0

    from kvcompile.export import export_onnx
    from kvcompile.models import DEFAULT_MODEL, load_model
    from kvcompile.plan.presets import resolve_map

    model = args.model or DEFAULT_MODEL
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: expected a comma-separated subset of {', '.join(VARIANTS)}, got {args.variants!r}")
    lm = load_model(model)
    label = Path(args.map).name if args.map else args.scheme
    packed = resolve_map(args.map or args.scheme, lm.geometry, model=model)
    maps = {"fp16 KV": resolve_map("fp16", lm.geometry, model=model), "packed": packed}
    if "native-lm-body" in variants:
        maps["packed, lm portable"] = packed
    if "predicted" in variants:
        if not args.predicted_map:
            raise SystemExit("--variants predicted needs --predicted-map MAP.json (planned from kvcompile calibrate --predict)")
        maps["predicted"] = resolve_map(args.predicted_map, lm.geometry, model=model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for name, pmap in maps.items():
            with _without_lloyd_reader(name == "packed, lm portable"):
                exports[name] = str(export_onnx(lm, pmap, Path(tmp) / name.replace(" ", "_").replace(",", ""),
                                                max_context=max(contexts)).path)
        del lm
        best: dict[tuple, dict] = {}
        for round_ in range(args.rounds):  # rounds interleave the variants; each point keeps its fastest run
            for context in contexts:
                for batch in batches:
                    for variant in variants if round_ % 2 == 0 else variants[::-1]:
                        job = {"export": exports[EXPORTS[variant]], "context": context,
                               "batch": batch, "steps": args.steps, "threads": args.threads,
                               "native": variant.startswith("native") or variant == "predicted"}
                        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                               json.dumps(job)], capture_output=True, text=True)
                        if proc.returncode:
                            raise SystemExit(f"{variant} @ {context} x {batch} failed: "
                                             f"{proc.stderr.strip().splitlines()[-1]}")
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                        key = (context, batch, variant)
                        runs = best.get(key, {}).get("tokens_per_s_runs", []) + [r["tokens_per_s"]]
                        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                            best[key] = {"variant": VARIANTS[variant], "map": {"fp16": "fp16", "predicted": Path(
                                             args.predicted_map or "-").name}.get(variant, label),
                                         "context": context, "batch": batch, **r}
                        best[key]["tokens_per_s_runs"] = runs
                        print(f"  round {round_ + 1}: {VARIANTS[variant]} @ {context} x {batch}: "
                              f"{r['tokens_per_s']:.1f} tokens/s, {r['kv_bytes'] / 2**20:.1f} MiB KV, "
                              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB peak RSS", flush=True)
        rows = [best[(c, b, v)] for c in contexts for b in batches for v in variants]
        peers = []
        for context in contexts if args.peers else []:
            for batch in batches:
                job = {"peers": exports["packed"], "context": context, "batch": batch, "threads": args.threads,
                       "repeats": args.peer_repeats}
                proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                       json.dumps(job)], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"attention peers @ {context} x {batch} failed: "
                                     f"{proc.stderr.strip().splitlines()[-1]}")
                peers.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  attention @ {context} x {batch}: KVAttention native {peers[-1]['native_ms']:.2f} ms, "
                      f"GroupQueryAttention int8 {peers[-1]['gqa_int8_ms']:.2f} ms", flush=True)
    base = {(r["context"], r["batch"]): r for r in rows if r["variant"] == "fp16 KV"}
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        r["speed_vs_fp16"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        r["kv_bytes_vs_fp16"] = r["kv_bytes"] / b["kv_bytes"] if b else None
        r["peak_rss_vs_fp16"] = r["peak_rss_bytes"] / b["peak_rss_bytes"] if b else None
    print(f"\n{'variant':<26} {'context':>7} {'batch':>5} {'tokens/s':>9} {'x fp16':>7} {'KV MiB':>8} {'x fp16':>7} "
          f"{'peak MiB':>9} {'x fp16':>7}")
    for r in rows:
        ratio = (lambda x: f"{x:>7.2f}" if x is not None else f"{'-':>7}")
        print(f"{r['variant']:<26} {r['context']:>7} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {ratio(r['speed_vs_fp16'])} "
              f"{r['kv_bytes'] / 2**20:>8.1f} {ratio(r['kv_bytes_vs_fp16'])} {r['peak_rss_bytes'] / 2**20:>9.0f} "
              f"{ratio(r['peak_rss_vs_fp16'])}")
    if peers:
        print(f"\none layer's decode attention (fastest of 3 interleaved medians of {args.peer_repeats} runs of one node):")
        print(f"{'context':>7} {'batch':>5} {'KVAttention native ms':>21} {'GQA int8 ms':>11} {'native speedup':>14}")
        for p in peers:
            print(f"{p['context']:>7} {p['batch']:>5} {p['native_ms']:>21.3f} {p['gqa_int8_ms']:>11.3f} "
                  f"{p['native_speedup_vs_gqa_int8']:>14.2f}")
    write_json(args.output, {"benchmark": "onnx_runtime", "model": model, "packed_map": label, "steps": args.steps,
                             "rounds": args.rounds,
                             "past": "Gaussian keys/values, C - steps - 1 positions, stored by the map's rule",
                             "environment": environment(args.threads), "results": rows, "attention_peers": peers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
