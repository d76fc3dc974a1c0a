"""The ``trt`` export target: ONNX export + TensorRT engine build with the kvcompile plugins.

``export_trt(lm, pmap, out_dir)`` writes the ONNX export (see :mod:`kvcompile.export`) into a
staged directory, builds ``model.engine`` from it in a child process
(:mod:`kvcompile.targets.trt.worker`), adds its ``trt`` section to the manifest
(:func:`~kvcompile.export.onnx_export.add_target_section`) and renames the directory into place;
any failure leaves nothing behind.  One ``model.onnx`` serves both
runtimes: ONNX Runtime runs the ops' function bodies, TensorRT's parser substitutes the plugins.

TensorRT comes from ``tensorrt`` where installed, else ``tensorrt_rtx`` (``pip install
tensorrt-rtx``: builds engines on a CPU-only machine; running them needs an RTX-class GPU); the
choice is :mod:`kvcompile.targets.trt.loader`'s.
TensorRT-RTX dlopens ``libtensorrt_rtx.so`` by that unversioned name when plugins are involved,
and the process aborts if it does not resolve; :func:`library_env` makes it resolve with a symlink
to the wheel's ``libtensorrt_rtx.so.1`` in kvcompile's cache directory (one directory per
library directory and version, :func:`unversioned_links`), put on the child's ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvcompile.artifacts import load_json_artifact, save_json_artifact, staged_directory
from kvcompile.errors import ExportError
from kvcompile.targets.trt.library import LIBRARY_NAME, require_library
from kvcompile.targets.trt.loader import find_tensorrt, require_tensorrt
from kvcompile.export.onnx_export import (FORMAT_VERSION, MANIFEST, add_target_section, check_output_directory,
                                          resolve_max_context, write_onnx_export)

ENGINE_FILE = "model.engine"


def tensorrt_flavour(prefer: str | None = None) -> str | None:
    """Which TensorRT package builds and runs engines here (see :mod:`kvcompile.targets.trt.loader`)."""
    return find_tensorrt(prefer)


def library_env() -> dict:
    """Environment for the worker: unversioned symlinks for the TensorRT libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    dirs = []
    for package in ("tensorrt_rtx_libs", "tensorrt_libs"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        libdir = Path(list(spec.submodule_search_locations)[0])
        dirs += [str(unversioned_links(libdir)), str(libdir)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env


def unversioned_links(libdir: Path) -> Path:
    """A directory of ``libX.so -> libdir/libX.so.N`` symlinks for the libraries in ``libdir``.

    The directory lives in kvcompile's per-user cache under a key of what the links depend on:
    the library directory's real path and each library's name, size and modification time.  So
    two Python environments (or two TensorRT versions) never share links, and removing one
    environment cannot leave another with dangling links into it.
    """
    from kvcompile.models import cache_dir

    libdir = libdir.resolve()
    libs = sorted(libdir.glob("lib*.so.*"))
    key = hashlib.sha256(str(libdir).encode())
    for lib in libs:
        st = lib.stat()
        key.update(f"\0{lib.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    links = cache_dir() / "trt-libs" / f"{libdir.parent.name}-{libdir.name}-{key.hexdigest()[:16]}"
    links.mkdir(parents=True, exist_ok=True)
    for lib in libs:
        unversioned = links / (lib.name.split(".so.")[0] + ".so")
        if (libdir / unversioned.name).exists() or (unversioned.is_symlink() and unversioned.resolve() == lib):
            continue
        tmp = links / f".{unversioned.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(lib)
        os.replace(tmp, unversioned)  # atomic: concurrent builds may race here
    return links


#: which plugins an engine is built with: the compiled library (default; engines load in trtexec,
#: Triton Inference Server and C++ applications) or the Python ones (a fallback kept for reference:
#: its KVCacheUpdate plugin attends over a de-quantized copy and runs only inside a Python process)
PLUGIN_KINDS = ("compiled", "python")
#: TensorRT-RTX's default targets: the GPUs the compiled library has cubins for that it can build for
#: (it has no SM90; full TensorRT builds for the GPU it runs on instead)
RTX_COMPUTE_CAPABILITIES = (80, 86, 89, 120)


def build_engine(export_dir: Path, *, max_batch: int = 1, opt_context: int = 256, timeout: int = 3600,
                 tensorrt: str | None = None, plugins: str = "compiled",
                 compute_capabilities: tuple[int, ...] | None = None) -> dict:
    """Build ``model.engine`` inside ``export_dir``; returns the engine report (also saved as JSON).

    ``tensorrt``: ``"tensorrt"`` or ``"tensorrt_rtx"`` (default: :func:`~kvcompile.targets.trt.loader.find_tensorrt`).
    ``plugins``: ``"compiled"`` (the graph must attend through KVAttention: ``export_onnx``'s default)
    or ``"python"`` (the graph must update the cache with KVCacheUpdate: ``fused_attention=False``).
    ``compute_capabilities``: SM versions to build for (TensorRT-RTX only; default
    :data:`RTX_COMPUTE_CAPABILITIES` there, the GPU in use with full TensorRT)."""
    flavour = require_tensorrt(tensorrt)
    if plugins not in PLUGIN_KINDS:
        raise ExportError(f"unknown plugin kind {plugins!r}; expected one of {', '.join(PLUGIN_KINDS)}")
    if compute_capabilities is None:
        compute_capabilities = RTX_COMPUTE_CAPABILITIES if flavour == "tensorrt_rtx" else ()
    elif compute_capabilities and flavour != "tensorrt_rtx":
        raise ExportError("compute capabilities can only be chosen with TensorRT-RTX; full TensorRT builds for the "
                          "GPU it runs on")
    library = require_library() if plugins == "compiled" else None
    doc = load_json_artifact(export_dir / MANIFEST, "onnx_export", FORMAT_VERSION)
    rows_per = {p["past"]: p["rows_per"] for g in doc["cache_layout"] for p in g["ports"]}
    import onnx

    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    fused = [n for n in graph.node if n.domain == "kvcompile" and
             (n.op_type.startswith("KVAttention") or n.op_type == "KVWindowAttention")]
    if plugins == "python" and fused:
        raise ExportError(f"{export_dir / 'model.onnx'} attends through {fused[0].op_type} nodes, which the Python plugins "
                          "do not implement; build it with the compiled plugin library (plugins='compiled'), or export "
                          "with fused_attention=False")
    if plugins == "compiled" and any(n.op_type == "KVCacheUpdate" for n in graph.node):
        raise ExportError(f"{export_dir / 'model.onnx'} updates the cache with KVCacheUpdate nodes, which the compiled "
                          "plugin library does not implement; export it with KVAttention (the default), or build with "
                          "plugins='python'")
    if plugins == "compiled":  # KVAttentionPortable nodes run their function bodies
        kvcompile_nodes = sum(n.op_type in ("KVAttention", "KVWindowAttention") for n in fused)
    else:
        kvcompile_nodes = sum(n.domain == "kvcompile" for n in graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"onnx": str(export_dir / "model.onnx"), "output": str(export_dir), "engine": ENGINE_FILE,
               "result": str(Path(tmp) / "result.json"), "max_batch": max_batch, "max_context": doc["max_context"],
               "opt_context": min(opt_context, doc["max_context"]), "rows_per": rows_per,
               "kvcompile_nodes": kvcompile_nodes, "tensorrt": flavour, "plugins": plugins,
               "library": str(library) if library else None, "compute_capabilities": list(compute_capabilities)}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "kvcompile.targets.trt.worker", "build", str(Path(tmp) / "job.json")],
                              env=library_env(), capture_output=True, text=True, timeout=timeout)
        result_path = Path(job["result"])
        if not result_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise ExportError(f"the TensorRT build process died ({tail[0]}); see {export_dir / 'build.log'}")
        result = json.loads(result_path.read_text())
    if not result["ok"]:
        raise ExportError(f"TensorRT engine build failed: {result['error']}")
    report = result["report"]
    save_json_artifact(export_dir / "engine_report.json", "trt_engine_report", 1, report)
    return report


def export_trt(lm, pmap, out_dir, *, max_context: int | None = None, max_batch: int = 1, opt_context: int = 256,
               overwrite: bool = True, tensorrt: str | None = None, plugins: str = "compiled",
               compute_capabilities: tuple[int, ...] | None = None):
    """ONNX export + engine build, written atomically to ``out_dir`` (``tensorrt``, ``plugins``,
    ``compute_capabilities``: see :func:`build_engine`).

    With the compiled plugins (the default) the directory also holds what production runtimes
    need: the plugin library (``libkvcompile_trt.so``, also embedded in the engine), a Triton
    Inference Server model repository for the ``tensorrt_plan`` platform (``triton/``) and a
    trtexec command (``trtexec.sh``, see docs/deploy.md)."""
    from kvcompile.export import ExportedModel

    if pmap.predictors is not None:
        raise ExportError("--target trt cannot read cross-layer prediction residuals (no plugin reads them, and their "
                          "float64 products are not TensorRT layers); expected --target onnx, or a map planned "
                          "without --predict")
    flavour = require_tensorrt(tensorrt)
    out = check_output_directory(out_dir, overwrite)
    max_context = resolve_max_context(lm, max_context)
    with staged_directory(out, what="export") as work:
        write_onnx_export(lm, pmap, work, max_context=max_context, fused_attention=plugins == "compiled")
        report = build_engine(work, max_batch=max_batch, opt_context=opt_context, tensorrt=flavour, plugins=plugins,
                              compute_capabilities=compute_capabilities)
        files = [ENGINE_FILE, "engine_report.json", "build.log"]
        section = {"engine": ENGINE_FILE, "tensorrt": report["tensorrt"], "tensorrt_version": report["tensorrt_version"],
                   "plugin_namespace": report["plugin_namespace"], "max_batch": max_batch,
                   "plugin_layers": len(report["plugin_layers"]), "plugins": plugins,
                   "compute_capabilities": report["compute_capabilities"]}
        if plugins == "compiled":
            files += write_deployment_files(lm, work, max_batch=max_batch, opt_context=min(opt_context, max_context))
            section.update({"plugin_library": LIBRARY_NAME, "triton_repository": TRITON_REPOSITORY,
                            "trtexec": TRTEXEC_SCRIPT})
        add_target_section(work, "trt", section, files=files)
    return ExportedModel.load(out)


TRITON_REPOSITORY = "triton"
TRTEXEC_SCRIPT = "trtexec.sh"
TRTEXEC_INPUTS = "trtexec_input_ids.bin"


def write_deployment_files(lm, directory: Path, *, max_batch: int, opt_context: int) -> list[str]:
    """Beside ``model.engine``: the plugin library, a Triton model repository and a trtexec script.

    Returns the files written (relative to ``directory``), for the manifest."""
    import shutil

    import numpy as np

    from kvcompile.export import ExportedModel
    from kvcompile.export.onnx_export import triton_config, triton_model_name

    groups = ExportedModel.load(directory).groups
    shutil.copyfile(require_library(), directory / LIBRARY_NAME)
    name = triton_model_name(lm.name)
    repo = directory / TRITON_REPOSITORY / name
    (repo / "1").mkdir(parents=True)
    (repo / "config.pbtxt").write_text(triton_config(lm.name, groups, lm.model.config.vocab_size,
                                                     platform="tensorrt_plan"))
    os.link(directory / ENGINE_FILE, repo / "1" / "model.plan")  # the same file, not a copy
    # trtexec: a prefill of opt_context tokens with an empty cache (every past part has 0 positions)
    (np.arange(opt_context, dtype=np.int64) % lm.model.config.vocab_size).tofile(directory / TRTEXEC_INPUTS)
    shapes = [f"input_ids:1x{opt_context}"] + [f"{p.past}:1x{len(g.heads)}x0x{p.width}" for g in groups for p in g.ports]
    script = "\n".join([
        "#!/bin/sh",
        "# written by kvcompile: runs model.engine with trtexec (see docs/deploy.md); the plugin library is",
        "# loaded explicitly (it is also embedded in the engine).  Extra arguments go to trtexec.",
        'cd "$(dirname "$0")" || exit 1',
        f"exec trtexec --loadEngine={ENGINE_FILE} --dynamicPlugins=./{LIBRARY_NAME} \\",
        f"  --loadInputs=input_ids:{TRTEXEC_INPUTS} \\",
        f"  --shapes={','.join(shapes)} \\",
        '  "$@"', ""])
    (directory / TRTEXEC_SCRIPT).write_text(script)
    (directory / TRTEXEC_SCRIPT).chmod(0o755)
    return [LIBRARY_NAME, TRTEXEC_SCRIPT, TRTEXEC_INPUTS, f"{TRITON_REPOSITORY}/{name}/config.pbtxt",
            f"{TRITON_REPOSITORY}/{name}/1/model.plan"]
