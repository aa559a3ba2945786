#!/usr/bin/env bash
# The one GPU run for an H100/H200, as the lead passes it to the device tool (installs nothing):
#
#     bash bench/run_gpu.sh            # results in $OUT (the device tool's folder), else ./bench_results
#
# Runs the CUDA unit tests, then bench/gpu_suite.py on the full Flux-dev shape (it skips optional parts past 240 s) and then
# bench/gpu_comfy_matrix.py (ComfyUI 0.33.0 servers with dynamic VRAM on and off; parts past 180 s skipped),
# so that the whole call ends inside 10 minutes; writes gpu_suite.*, comfy_matrix.* and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT_DIR="${OUT:-./bench_results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not found"
  "$PY" -c "import torch, safetensors, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT_DIR/environment.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "torch with a CUDA device is not available to $PY; nothing run" | tee -a "$OUT_DIR/environment.txt"; exit 2; }
# The unit tests that need a CUDA device (GPU-recorded fingerprints, the rollback reserve on the caching allocator).
timeout 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_reload.py tests/test_undo.py -k "cuda or gpu" 2>&1 \
  | tee "$OUT_DIR/cuda_tests.log" || echo "CUDA unit tests failed or pytest is missing" | tee -a "$OUT_DIR/cuda_tests.log"
timeout 300 "$PY" bench/gpu_suite.py --out "$OUT_DIR" --budget-s 240 2>&1 | tee "$OUT_DIR/gpu_suite.log"
status=${PIPESTATUS[0]}
echo "gpu_suite exit status $status" | tee -a "$OUT_DIR/gpu_suite.log"
# The real-ComfyUI server matrix: dynamic VRAM on / off x branch, re-queue, quantized, vs core's LoRA. It needs
# ComfyUI's requirements in $PY and the 0.33.0 tree (../shared/comfyui or ./shared/comfyui); else it says so.
timeout 240 "$PY" bench/gpu_comfy_matrix.py --out "$OUT_DIR" --budget-s 180 2>&1 | tee "$OUT_DIR/comfy_matrix.log"
matrix=${PIPESTATUS[0]}
echo "comfy matrix exit status $matrix" | tee -a "$OUT_DIR/comfy_matrix.log"
[ "$status" -eq 0 ] && exit "$matrix"
exit "$status"
