#!/usr/bin/env bash
# usage: .ci/comfy_venv.sh TREE VENV TORCH_VENV
# A venv that runs a ComfyUI tree's real-ComfyUI tests on the CPU: the tree's requirements.txt without its
# torch / torchvision / torchaudio lines (torchsde stays), plus the pack with its test extras.
#
# torch comes from TORCH_VENV, shared by every tree's venv through a .pth file: torch 2.14.1 + torchvision 0.29.1
# (+ torchaudio 2.11.1 for 0.33's start-up). ComfyUI imports torchvision, and the registry's torchvision wheels are
# CUDA builds that fail to load beside a CPU-only torch ("operator torchvision::nms does not exist"); these CUDA
# builds of torch and torchvision match each other and run on the CPU.
set -euo pipefail
TREE=$1; VENV=$2; TORCH_VENV=$3
PINS=(torch==2.14.1 torchvision==0.29.1)
if [ ! -x "$TORCH_VENV/bin/python" ]; then
  python3 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/python" -m pip install -q "${PINS[@]}"
  "$TORCH_VENV/bin/python" -m pip install -q --no-deps "torchaudio==2.11.1"
fi
python3 -m venv "$VENV"
site() { "$1/bin/python" -c "import site; print(site.getsitepackages()[0])"; }
site "$TORCH_VENV" > "$(site "$VENV")/zz_shared_torch.pth"
tmp=$(mktemp -d)
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$TREE/requirements.txt" > "$tmp/requirements.txt"
printf '%s\n' "${PINS[@]}" > "$tmp/constraints.txt"
"$VENV/bin/python" -m pip install -q -r "$tmp/requirements.txt" -c "$tmp/constraints.txt"
"$VENV/bin/python" -m pip install -q -e ".[test]" -c "$tmp/constraints.txt"
rm -r "$tmp"
"$VENV/bin/python" -c "import torch, torchvision, torchaudio, torchsde; print('ComfyUI test venv ok:', '$TREE', torch.__version__)"
