"""TensorRT engine build of a model and map on this machine (TensorRT-RTX builds on the CPU; nothing is run).

    python bench/engine_build.py [--model gemma3-270m] [--scheme int4 | --map MAP.json] [--max-context 4096]
                                 [--out bench/results/engine_build_gemma3.json]

Runs ``export_trt`` (ONNX export + engine build with the compiled plugin library) into a temporary
directory and records: export + build seconds, the engine report's parse and build seconds, engine
bytes, TensorRT flavour and version, the SM versions built for, the plugin layers per op (KVAttention,
KVWindowAttention), and the
engine's cache I/O (how many tensors belong to sliding-window layers).  Prints a summary and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scheme", default="int4", help="map: scheme or preset (default int4)")
    g.add_argument("--map", help="precision map JSON")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/engine_build_gemma3.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map
    from kvcompile.targets.trt.build import export_trt

    lm = load_model(args.model)
    pmap = resolve_map(args.map or args.scheme, lm.geometry, model=args.model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ex = export_trt(lm, pmap, Path(tmp) / "engine", max_context=args.max_context)
        seconds = time.perf_counter() - t0
        report = json.loads((ex.path / "engine_report.json").read_text())
        window_ports = {p.past for grp in ex.groups if grp.window for p in grp.ports}
    io_names = [t["name"] for t in report["io"]]
    doc = {"benchmark": "engine_build", "environment": environment(args.threads), "model": args.model,
           "map": Path(args.map).name if args.map else args.scheme, "bits_per_element_at_max_context":
               pmap.bits_per_element(args.max_context), "max_context": args.max_context,
           "export_and_build_seconds": seconds, "parse_seconds": report["parse_seconds"],
           "build_seconds": report["build_seconds"], "engine_bytes": report["engine_bytes"],
           "tensorrt": report["tensorrt"], "tensorrt_version": report["tensorrt_version"],
           "compute_capabilities": report["compute_capabilities"], "plugins": report["plugins"],
           "plugin_layers": len(report["plugin_layers"]),
           "plugin_layers_by_op": {op: sum(p["plugin"] == op for p in report["plugin_layers"])
                                   for op in sorted({p["plugin"] for p in report["plugin_layers"]})},
           "io_tensors": len(io_names),
           "window_layer_inputs": sum(n in window_ports for n in io_names),
           "engine_contains_plugin_library": report["engine_contains_plugin_library"]}
    for k, v in doc.items():
        if k != "environment":
            print(f"{k}: {v}")
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
