"""The one place that finds and imports TensorRT.

Two Python packages provide the same API: full TensorRT (``tensorrt``: every GPU it supports,
SM90 included) and TensorRT for RTX (``tensorrt_rtx``: builds engines on a CPU-only machine for
RTX-class GPUs).  Full TensorRT is preferred where installed; ``KVCOMPILE_TENSORRT=tensorrt`` or
``=tensorrt_rtx`` (or ``export --tensorrt``) picks one.  The choice is made without importing
either package, so asking is cheap; the engine build child process is told the flavour.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from kvcompile.errors import ExportError

FLAVOURS = ("tensorrt", "tensorrt_rtx")
ENV = "KVCOMPILE_TENSORRT"
INSTALL_HINT = "pip install tensorrt-rtx (builds on CPU) or tensorrt"


def _installed(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    if name == "tensorrt":  # the `tensorrt` meta package without its compiled bindings does not count
        root = Path(spec.origin).parent if spec.origin else None
        return bool(root and any(root.glob("tensorrt*.so")))
    return True


def requested_flavour(prefer: str | None = None) -> str | None:
    """The flavour asked for by ``prefer`` or ``KVCOMPILE_TENSORRT`` (None: no preference)."""
    choice = prefer or os.environ.get(ENV) or None
    if choice is not None and choice not in FLAVOURS:
        raise ExportError(f"TensorRT flavour must be one of {', '.join(FLAVOURS)}, got {choice!r} "
                          f"(from {'the option' if prefer else ENV})")
    return choice


def find_tensorrt(prefer: str | None = None) -> str | None:
    """``"tensorrt"``, ``"tensorrt_rtx"`` or None: the TensorRT package to use here."""
    choice = requested_flavour(prefer)
    if choice is not None:
        return choice if _installed(choice) else None
    return next((name for name in FLAVOURS if _installed(name)), None)


def require_tensorrt(prefer: str | None = None) -> str:
    """:func:`find_tensorrt`, or one :class:`ExportError` line saying what to install."""
    flavour = find_tensorrt(prefer)
    if flavour is None:
        choice = requested_flavour(prefer)
        raise ExportError(f"the trt target needs TensorRT: {choice} was requested and is not installed" if choice
                          else f"the trt target needs TensorRT: {INSTALL_HINT}")
    return flavour


def import_tensorrt(flavour: str | None = None):
    """Import and return the TensorRT module (``flavour``, default :func:`require_tensorrt`)."""
    name = flavour or require_tensorrt()
    module = importlib.import_module(name)
    if not hasattr(module, "Builder"):
        raise ExportError(f"the installed {name} package has no Builder; reinstall it ({INSTALL_HINT})")
    return module
