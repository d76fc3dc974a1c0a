"""Helpers shared by the benchmarks: thread pinning, table printing, atomic JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvcompile.artifacts import atomic_write_bytes
from kvcompile.version import __version__


def timed(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after 3 warm-up runs (CUDA events on "cuda")."""
    import statistics

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup(threads: int) -> None:
    torch.set_num_threads(threads)


def environment(threads: int) -> dict:
    from importlib import metadata

    versions = {}
    for package in ("transformers", "numpy", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"kvcompile": __version__, "torch": torch.__version__, **versions, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write_json(path: str | Path, doc: dict) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {path}")
