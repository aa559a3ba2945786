"""ComfyUI's own Flux class, loaded by ComfyUI from our files: the forward with our fp8 merge-then-quantise
file stays within a stated tolerance of the forward with our bf16 merged file (same LoRA).

Tolerance: relative L2 difference of the outputs ≤ 15 % on this random-weight 1+1-block model (ComfyUI 0.3.64's
scaled-fp8 loader also casts biases and embedders to fp8, which the small model feels), and never worse than
ComfyUI's own fp8 (UNETLoader weight_dtype fp8_e4m3fn on the same merged weights); the LoRA's effect (merged −
base output, each in its own precision) keeps cosine similarity ≥ 0.6 with the bf16 effect (a 5 % LoRA is
close to e4m3's step) and at least ComfyUI's own fp8 cosine. Runs inside ComfyUI's Python (a subprocess, cwd
COMFYUI_ROOT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_harness import reads_comfy_quant

from lora_ops import fp8, load_lora
from lora_ops.flux import FluxShape
from lora_ops.offline import merge_checkpoint
from lora_ops.synthetic import write_kohya_lora

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys, logging
import torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, ".")
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd
logging.disable(logging.WARNING)
"""


def _probe_script(paths: dict[str, str]) -> str:
    return PROBE + f"""
paths = {json.dumps(paths)}
gen = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 8, 8, generator=gen)
context = torch.randn(1, 8, 4096, generator=gen)
y = torch.randn(1, 768, generator=gen)
t = torch.tensor([0.7])
g = torch.tensor([3.5])
out = {{}}
for name, path in paths.items():
    options = {{"dtype": torch.float8_e4m3fn}} if name.startswith("comfy_fp8") else {{}}
    patcher = comfy.sd.load_diffusion_model(path, model_options=options)
    model = patcher.model.diffusion_model
    dtypes = sorted({{str(getattr(p, "_qdata", p).dtype) for p in model.parameters()}})  # QuantizedTensor: payload
    with torch.no_grad():
        out[name] = (model(x, t, context, y=y, guidance=g).float(), dtypes)
    del patcher, model
base, merged, quant, comfy_fp8, quant_base, comfy_base = (
    out[k][0] for k in ("base", "bf16", "fp8", "comfy_fp8", "fp8_base", "comfy_fp8_base"))
effect, effect_fp8 = (merged - base).flatten(), (quant - quant_base).flatten()
effect_comfy = (comfy_fp8 - comfy_base).flatten()
print(json.dumps({{
    "relative": float((quant - merged).norm() / merged.norm()),
    "relative_comfy_fp8": float((comfy_fp8 - merged).norm() / merged.norm()),
    "effect": float(effect.norm() / base.norm()),
    "cosine": float(torch.nn.functional.cosine_similarity(effect, effect_fp8, dim=0)),
    "cosine_comfy_fp8": float(torch.nn.functional.cosine_similarity(effect, effect_comfy, dim=0)),
    "fp8_dtypes": out["fp8"][1],
}}))
"""


def test_comfyui_flux_forward_fp8_close_to_bf16(comfyui_root, flux_tiny_checkpoint, tmp_path):
    lora_path = write_kohya_lora(tmp_path / "lora.safetensors", FluxShape(depth=1, depth_single=1), rank=8,
                                 relative_change=0.05)
    lora = load_lora(lora_path)
    merged = tmp_path / "merged_bf16.safetensors"
    merge_checkpoint(flux_tiny_checkpoint, [(lora, 1.0)], merged)
    native = "comfy_quant" if reads_comfy_quant(comfyui_root) else "scaled_fp8"  # the format this ComfyUI reads
    quant = tmp_path / "merged_fp8.safetensors"
    fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [(lora, 1.0)], quant, policy="all", file_format=native)
    quant_base = tmp_path / "base_fp8.safetensors"
    fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [], quant_base, policy="all", file_format=native)
    paths = {"base": str(flux_tiny_checkpoint), "bf16": str(merged), "fp8": str(quant), "comfy_fp8": str(merged),
             "fp8_base": str(quant_base), "comfy_fp8_base": str(flux_tiny_checkpoint)}
    proc = subprocess.run([sys.executable, "-c", _probe_script(paths)], cwd=comfyui_root, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "torch.float8_e4m3fn" in result["fp8_dtypes"], result
    assert result["effect"] > 0.005, result  # the LoRA visibly changes ComfyUI's output
    assert result["relative"] <= 0.15, result
    # no worse than ComfyUI's own fp8 (UNETLoader weight_dtype fp8_e4m3fn on the same merged weights)
    assert result["relative"] <= result["relative_comfy_fp8"], result
    assert result["cosine"] >= 0.6, result
    assert result["cosine"] >= result["cosine_comfy_fp8"], result
