"""TensorRT work in a child process: ``python -m kvcompile.targets.trt.worker build JOB.json``.

Run by :mod:`kvcompile.targets.trt.build` with a library path on which ``libtensorrt_rtx.so``
resolves (TensorRT-RTX's plugin machinery dlopens that name and aborts the whole process if it
cannot), so an abort here is reported as an error instead of killing the caller.

The job builds an engine from an export directory's ``model.onnx``: registers the kvcompile
plugins, parses with ``ENABLE_PLUGIN_OVERRIDE`` (the ``kvcompile`` nodes become plugin layers
rather than their function bodies), adds one optimization profile over batch and context,
reuses / saves a timing cache, and writes the engine, a build log and ``engine_report.json``
(the network's plugin layers with their fields, the I/O tensors, sizes, timings).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def build(job: dict) -> dict:
    from kvcompile.ops.spec import get_op
    from kvcompile.targets.trt.loader import import_tensorrt
    from kvcompile.targets.trt.plugin import NAMESPACE, attrs_from_fields, register_plugins

    trt = import_tensorrt(job.get("tensorrt"))
    out = Path(job["output"])
    log_lines: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log_lines.append(f"[{str(severity).split('.')[-1]}] {msg}")

    logger = Logger()
    register_plugins(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    t0 = time.perf_counter()
    if not parser.parse_from_file(job["onnx"]):
        errors = [parser.get_error(i).desc().splitlines()[0] for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser rejected the graph: " + "; ".join(errors[:3]))
    parse_s = time.perf_counter() - t0

    plugins = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # the Python bindings' way to down-cast a layer
        plugin = layer.plugin
        spec = get_op(plugin.plugin_name)
        fields = attrs_from_fields(spec, plugin.get_fields_to_serialize())
        plugins.append({"layer": layer.name, "plugin": plugin.plugin_name, "namespace": plugin.plugin_namespace,
                        "version": plugin.plugin_version, "fields": fields,
                        "outputs": [layer.get_output(k).name for k in range(layer.num_outputs)]})

    expected = job["kvcompile_nodes"]
    if len(plugins) != expected:
        raise RuntimeError(f"TensorRT mapped {len(plugins)} of the graph's {expected} kvcompile nodes to plugins; "
                           f"expected every node to find its creator (namespace {NAMESPACE!r}, version 1) — "
                           "a missing or mismatched plugin")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    batch, context, opt = job["max_batch"], job["max_context"], job["opt_context"]
    tensors = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        tensors.append({"name": t.name, "io": "input", "dtype": str(t.dtype).split(".")[-1], "shape": shape})
        if t.name == "input_ids":
            profile.set_shape(t.name, (1, 1), (1, 1), (batch, context))
            continue
        rows_per = job["rows_per"][t.name]
        heads, width = shape[1], shape[3]
        profile.set_shape(t.name, (1, heads, 0, width), (1, heads, opt // rows_per, width),
                          (batch, heads, context // rows_per, width))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        tensors.append({"name": t.name, "io": "output", "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
    config.add_optimization_profile(profile)
    cache_path = out / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    (out / "build.log").write_text("\n".join(log_lines) + "\n")
    if serialized is None:
        errors = [line for line in log_lines if line.startswith("[ERROR]") or line.startswith("[INTERNAL_ERROR]")]
        raise RuntimeError("engine build failed: " + ("; ".join(errors[:3]) or "see build.log"))
    engine = bytes(memoryview(serialized))
    (out / job["engine"]).write_bytes(engine)
    (out / "timing.cache").write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    report = {"tensorrt": trt.__name__, "tensorrt_version": trt.__version__, "plugin_namespace": NAMESPACE,
              "engine_bytes": len(engine), "parse_seconds": parse_s, "build_seconds": build_s,
              "layers": network.num_layers, "plugin_layers": plugins, "io": tensors,
              "profile": {"max_batch": batch, "max_context": context, "opt_context": opt},
              "engine_contains_plugin_fields": all(
                  p["plugin"].encode() in engine and all(str(v).encode() in engine for v in p["fields"].values()
                                                         if isinstance(v, str)) for p in plugins)}
    return report


def main(argv: list[str]) -> int:
    command, job_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        if command != "build":
            raise RuntimeError(f"unknown worker command {command!r}")
        report = build(job)
    except Exception as e:  # reported to the parent as one line
        Path(job["result"]).write_text(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 1
    Path(job["result"]).write_text(json.dumps({"ok": True, "report": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
