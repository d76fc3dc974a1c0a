"""Calibration: per-site sensitivity of model quality to KV quantization (see docs/theory.md).

Names resolve lazily so that ``kvcompile.calibrate.defaults`` (used by the CLI's help) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvcompile.calibrate.defaults import DEFAULT_SCHEMES, ESTIMATORS

_LAZY = {"Calibration": "kvcompile.calibrate.artifact", "calibrate": "kvcompile.calibrate.estimate"}
__all__ = ["Calibration", "DEFAULT_SCHEMES", "ESTIMATORS", "calibrate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcompile.calibrate' has no attribute {name!r}")
