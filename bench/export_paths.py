"""Export paths for a new architecture: kvcompile's decoder graph builder vs torch.onnx.export (dynamo).

    python bench/export_paths.py [--model gemma3-270m] [--tokens 512] [--out bench/results/export_paths.json]

Both graphs come from the same loaded model in this run:

* ``kvcompile builder``: ``export_onnx`` with the all-fp16 map (:mod:`kvcompile.export.decoder`,
  the architecture described by its adapter's ``DecoderTraits``); cache I/O included;
* ``torch.onnx.export``: the generic path, PyTorch's dynamo exporter (needs ``onnxscript``:
  ``pip install -c constraints.txt -e ".[generic-export]"``) on the
  model's cache-free forward ``logits = model(input_ids)``, sequence length dynamic.  It has no cache
  inputs or outputs and no kvcompile ops: what it would take to give it those is the price of the
  generic path beyond these figures.

Measured per path: export seconds, graph nodes, ``model.onnx`` + weights bytes, ONNX Runtime
session creation seconds and prefill seconds for ``--tokens`` tokens of held-out text (median of
``--repeats``, ``--threads`` intra-op threads), and agreement with transformers on those logits
(max |delta|, top-1 agreement).  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def measure(onnx_path: Path, feed_name: str, ids, reference, threads: int, repeats: int, extra_feed=None) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    nodes = len(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    size = sum(f.stat().st_size for f in onnx_path.parent.iterdir() if f.is_file() and f.name.startswith("model"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    create_s = time.perf_counter() - t0
    feed = {feed_name: ids.numpy(), **(extra_feed or {})}
    times, logits = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = session.run(["logits"] if "logits" in [o.name for o in session.get_outputs()] else None, feed)[0]
        times.append(time.perf_counter() - t0)
    ref = reference.numpy()
    return {"graph_nodes": nodes, "bytes": size, "session_s": create_s, "prefill_s": statistics.median(times),
            "max_abs_logit_delta": float(np.abs(logits - ref).max()),
            "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/export_paths.json")
    args = ap.parse_args()
    setup(args.threads)

    import torch

    from kvcompile.data import DEFAULT_EVAL_TEXT, load_text
    from kvcompile.export import export_onnx
    from kvcompile.measure.quality import token_windows
    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map
    from kvcompile.runtime.base import empty_past

    lm = load_model(args.model)
    ids = token_windows(lm.tokenizer, load_text(DEFAULT_EVAL_TEXT), args.tokens, 1)[0][None]
    with torch.no_grad():
        reference = lm.model(ids, use_cache=False).logits.float()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ex = export_onnx(lm, resolve_map("fp16", lm.geometry), Path(tmp) / "builder", max_context=args.tokens)
        export_s = time.perf_counter() - t0
        rows["kvcompile builder"] = {"export_s": export_s, "cache_io": True,
                                     **measure(ex.onnx_path, "input_ids", ids, reference, args.threads, args.repeats,
                                               extra_feed=empty_past(ex, 1))}
        print("kvcompile builder", rows["kvcompile builder"], flush=True)

        class Logits(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                return self.model(input_ids=input_ids, use_cache=False).logits

        generic = Path(tmp) / "generic" / "model.onnx"
        generic.parent.mkdir()
        t0 = time.perf_counter()
        try:
            program = torch.onnx.export(Logits(lm.model), (ids,), dynamo=True, opset_version=21,
                                        dynamic_shapes={"input_ids": {1: torch.export.Dim("sequence", max=4096)}})
            program.save(str(generic), external_data=True)
            export_s = time.perf_counter() - t0
            rows["torch.onnx.export (dynamo)"] = {
                "export_s": export_s, "cache_io": False,
                **measure(generic, "input_ids", ids, reference, args.threads, args.repeats)}
        except Exception as e:  # the generic path's own failure is a result
            rows["torch.onnx.export (dynamo)"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print("torch.onnx.export", rows["torch.onnx.export (dynamo)"], flush=True)
    print(f"\nmodel {args.model}, prefill of {args.tokens} tokens, {args.threads} threads")
    print(f"{'path':<28} {'export s':>9} {'nodes':>7} {'MB':>7} {'session s':>9} {'prefill s':>9} {'max|dl|':>9} {'top-1':>6}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
            continue
        print(f"{name:<28} {r['export_s']:>9.1f} {r['graph_nodes']:>7} {r['bytes'] / 1e6:>7.0f} {r['session_s']:>9.2f} "
              f"{r['prefill_s']:>9.3f} {r['max_abs_logit_delta']:>9.2e} {r['top1_agreement']:>6.3f}")
    write_json(args.out, {"benchmark": "export_paths", "environment": environment(args.threads), "model": args.model,
                          "tokens": args.tokens, "results": rows})


if __name__ == "__main__":
    main()
