#!/usr/bin/env bash
# The one GPU run for an H100/H200, as the lead passes it to the device tool (installs nothing):
#
#     bash bench/run_gpu.sh            # results in $OUT (the device tool's folder), else ./bench_results
#
# Runs bench/gpu_suite.py on the full Flux-dev shape (about 4-6 minutes; it skips optional parts past
# 450 s so that it ends well inside 8 minutes) and writes gpu_suite.json, gpu_suite.txt and the log.
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
timeout 540 "$PY" bench/gpu_suite.py --out "$OUT_DIR" --budget-s 450 2>&1 | tee "$OUT_DIR/gpu_suite.log"
status=${PIPESTATUS[0]}
echo "gpu_suite exit status $status" | tee -a "$OUT_DIR/gpu_suite.log"
exit "$status"
