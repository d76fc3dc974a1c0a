"""TensorRT work in a child process: ``python -m kvcompile.targets.trt.worker build JOB.json``.

Run by :mod:`kvcompile.targets.trt.build` with a library path on which ``libtensorrt_rtx.so``
resolves (TensorRT-RTX's plugin machinery dlopens that name and aborts the whole process if it
cannot), so an abort here is reported as an error instead of killing the caller.

The job builds an engine from an export directory's ``model.onnx``: registers the kvcompile
plugins — the compiled library (``job["plugins"] == "compiled"``: loaded into the registry and
embedded in the engine with ``plugins_to_serialize``; no Python plugin in this process) or the
Python ones — parses with ``ENABLE_PLUGIN_OVERRIDE`` (the ``kvcompile`` nodes become plugin layers
rather than their function bodies), adds one optimization profile over batch and context, targets
the job's compute capabilities (TensorRT-RTX), reuses / saves a timing cache, and writes the
engine, a build log and ``engine_report.json`` (the network's plugin layers with their fields, the
I/O tensors, sizes, timings, whether the engine holds the library).
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

    compiled = job.get("plugins", "python") == "compiled"

    trt = import_tensorrt(job.get("tensorrt"))
    out = Path(job["output"])
    log_lines: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log_lines.append(f"[{str(severity).split('.')[-1]}] {msg}")

    logger = Logger()
    if compiled:
        library = job["library"]
        if trt.get_plugin_registry().load_library(library) is None:
            raise RuntimeError(f"TensorRT could not load the plugin library {library}")
    else:
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

    node_attributes = {}
    if compiled:
        import onnx

        for node in onnx.load(job["onnx"], load_external_data=False).graph.node:
            if node.domain == "kvcompile":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                spec = get_op(node.op_type)
                node_attributes[node.output[0]] = spec.check_attrs(
                    {a.name: attrs[a.name].decode() if a.kind == "string" else attrs[a.name] for a in spec.attributes})
    plugins = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # the Python bindings' way to down-cast a layer
        plugin = layer.plugin
        if compiled:
            # a C++ plugin: its name through its core capability; its fields are not readable through
            # the Python bindings, so the report gives the attributes of the node it replaced (the
            # library's own field round trip is tested through its C API)
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            plugin_name, namespace, version = core.plugin_name, core.plugin_namespace, core.plugin_version
            fields = node_attributes[layer.get_output(0).name]
        else:
            plugin_name, namespace, version = plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version
            fields = attrs_from_fields(get_op(plugin_name), plugin.get_fields_to_serialize())
        plugins.append({"layer": layer.name, "plugin": plugin_name, "namespace": namespace, "version": version,
                        "fields": fields,
                        "outputs": [layer.get_output(k).name for k in range(layer.num_outputs)]})

    expected = job["kvcompile_nodes"]
    if len(plugins) != expected:
        raise RuntimeError(f"TensorRT mapped {len(plugins)} of the graph's {expected} kvcompile nodes to plugins; "
                           f"expected every node to find its creator (namespace {NAMESPACE!r}, version 1) — "
                           "a missing or mismatched plugin")
    config = builder.create_builder_config()
    if compiled:
        config.plugins_to_serialize = [job["library"]]
    capabilities = job.get("compute_capabilities") or []
    if capabilities:
        if not hasattr(config, "num_compute_capabilities"):
            raise RuntimeError(f"{trt.__name__} builds for the GPU it runs on; compute capabilities "
                               f"{capabilities} can only be chosen with TensorRT-RTX")
        config.num_compute_capabilities = len(capabilities)
        for i, sm in enumerate(capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), i)
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
    library_bytes = Path(job["library"]).read_bytes() if compiled else b""
    report = {"tensorrt": trt.__name__, "tensorrt_version": trt.__version__, "plugin_namespace": NAMESPACE,
              "plugins": "compiled" if compiled else "python", "compute_capabilities": capabilities,
              # the creators this process had for the kvcompile namespace, with their language
              "creators": sorted(f"{c.name}:{str(c.api_language).split('.')[-1]}"
                                 for c in trt.get_plugin_registry().all_creators
                                 if c.plugin_namespace == NAMESPACE),
              "plugin_library": Path(job["library"]).name if compiled else None,
              # the library embedded whole: its bytes appear in the plan
              "engine_contains_plugin_library": bool(library_bytes) and library_bytes in engine,
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
