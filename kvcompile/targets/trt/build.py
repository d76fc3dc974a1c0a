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


def build_engine(export_dir: Path, *, max_batch: int = 1, opt_context: int = 256, timeout: int = 3600,
                 tensorrt: str | None = None) -> dict:
    """Build ``model.engine`` inside ``export_dir``; returns the engine report (also saved as JSON).

    ``tensorrt``: ``"tensorrt"`` or ``"tensorrt_rtx"`` (default: :func:`~kvcompile.targets.trt.loader.find_tensorrt`)."""
    flavour = require_tensorrt(tensorrt)
    doc = load_json_artifact(export_dir / MANIFEST, "onnx_export", FORMAT_VERSION)
    rows_per = {p["past"]: p["rows_per"] for g in doc["cache_layout"] for p in g["ports"]}
    import onnx

    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    kvcompile_nodes = sum(n.domain == "kvcompile" for n in graph.node)
    if any(n.domain == "kvcompile" and n.op_type.startswith("KVAttention") for n in graph.node):
        raise ExportError(f"{export_dir / 'model.onnx'} attends through KVAttention nodes, which the TensorRT plugins "
                          "do not implement yet; build engines from `kvcompile export --target trt` (its graph updates "
                          "the cache with KVCacheUpdate)")
    with tempfile.TemporaryDirectory() as tmp:
        job = {"onnx": str(export_dir / "model.onnx"), "output": str(export_dir), "engine": ENGINE_FILE,
               "result": str(Path(tmp) / "result.json"), "max_batch": max_batch, "max_context": doc["max_context"],
               "opt_context": min(opt_context, doc["max_context"]), "rows_per": rows_per,
               "kvcompile_nodes": kvcompile_nodes, "tensorrt": flavour}
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
               overwrite: bool = True, tensorrt: str | None = None):
    """ONNX export + engine build, written atomically to ``out_dir`` (``tensorrt``: see :func:`build_engine`)."""
    from kvcompile.export import ExportedModel

    flavour = require_tensorrt(tensorrt)
    out = check_output_directory(out_dir, overwrite)
    max_context = resolve_max_context(lm, max_context)
    with staged_directory(out, what="export") as work:
        # unfused graph: the TensorRT plugins implement KVCacheUpdate, not yet KVAttention
        write_onnx_export(lm, pmap, work, max_context=max_context, fused_attention=False)
        report = build_engine(work, max_batch=max_batch, opt_context=opt_context, tensorrt=flavour)
        add_target_section(work, "trt", {
            "engine": ENGINE_FILE, "tensorrt": report["tensorrt"], "tensorrt_version": report["tensorrt_version"],
            "plugin_namespace": report["plugin_namespace"], "max_batch": max_batch,
            "plugin_layers": len(report["plugin_layers"])}, files=[ENGINE_FILE, "engine_report.json", "build.log"])
    return ExportedModel.load(out)
