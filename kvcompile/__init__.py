"""kvcompile: calibrate, plan, export and validate mixed-precision KV caches for decoder LLMs.

The public API is imported lazily, so ``import kvcompile`` needs neither a GPU, TensorRT nor
onnxruntime (and does not even import torch until a stage is used).
"""

from __future__ import annotations

import importlib
from typing import Any

from kvcompile.version import __version__

_LAZY = {
    "KvcompileError": "kvcompile.errors",
    "get_scheme": "kvcompile.quant",
    "scheme_names": "kvcompile.quant",
    "PrecisionMap": "kvcompile.kv.precision_map",
    "resolve_map": "kvcompile.plan.presets",
    "MixedPrecisionCache": "kvcompile.cache.mixed",
    "PrefixCache": "kvcompile.cache.prefix",
    "load_model": "kvcompile.models",
    "evaluate": "kvcompile.measure.quality",
    "load_text": "kvcompile.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcompile' has no attribute {name!r}")
