"""Our scaled-fp8 file, loaded by ComfyUI's own loader: it is scaled fp8 there, and the weights ComfyUI
dequantises are ours, bit for bit (merge-then-quantise of the 3072-wide test checkpoint + a LoRA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_ops import fp8, load_lora
from lora_ops.synthetic import write_kohya_lora

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "bench" / "fp8_fidelity.py"  # its --comfy-probe runs inside ComfyUI's Python
LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin")


def test_comfyui_loads_our_fp8_file_as_scaled_fp8(comfyui_root, flux_tiny_checkpoint, tmp_path):
    from lora_ops.flux import FluxShape

    lora = load_lora(write_kohya_lora(tmp_path / "lora.safetensors", FluxShape(depth=1, depth_single=1), rank=8))
    out = tmp_path / "flux_fp8.safetensors"
    fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [(lora, 1.0)], out, policy="all", file_format="scaled_fp8")
    written = load_file(str(out))
    assert "scaled_fp8" in written
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(PROBE), "--comfy-probe", "load", str(out), str(out), str(flux_tiny_checkpoint)],
        cwd=comfyui_root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "scaled" in result["ops"].lower() or "fp8" in result["ops"].lower(), result["ops"]
    for name in LAYERS:
        entry = result[name]
        assert entry["weight_dtype"] == str(torch.float8_e4m3fn), entry
        assert entry["max_abs_diff_vs_file"] == 0.0, entry  # ComfyUI's dequantised weights are ours
        assert entry["forward_rel_err"] < 1e-2, entry
        assert written[f"{name}.weight"].dtype == torch.float8_e4m3fn
