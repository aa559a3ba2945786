"""A small Flux forward with fp8-merged weights stays close to the bf16-merged forward.

The forward is the benchmarks' own minimal BFL-structured Flux (bench/flux_forward.py), fed with
dequantised weights, as ComfyUI computes scaled fp8 (weight.to(bf16) * scale).
Tolerance stated: relative L2 error of the output ≤ 2 % (measured 0.27 %), and the LoRA's own effect on
the output kept with cosine similarity ≥ 0.9 (measured 0.97): fp8 adds noise, it must not wash the LoRA out.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from lora_ops import FluxShape, fp8, load_lora, merge_loras
from lora_ops.synthetic import flux_state_dict, write_kohya_lora

SHAPE = FluxShape(hidden=128, depth=1, depth_single=1, heads=2, context_dim=64, vec_dim=32, time_dim=256)


def _suite():
    path = Path(__file__).resolve().parents[1] / "bench" / "flux_forward.py"
    spec = importlib.util.spec_from_file_location("flux_lora_ops_flux_forward", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _forward(suite, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = suite.make_inputs(SHAPE, 128, 128, 1, 16, torch.device("cpu"))
    with torch.no_grad():
        return suite.Flux(weights, SHAPE, suite.Runtime(device_type="cpu")).forward(*inputs).float()


def test_fp8_merged_forward_is_close_to_bf16_merged_forward(tmp_path):
    suite = _suite()
    base = flux_state_dict(SHAPE, seed=0)
    lora = load_lora(write_kohya_lora(tmp_path / "l.safetensors", SHAPE, rank=8, relative_change=1.0))
    merged = {k: v.clone() for k, v in base.items()}
    merge_loras(merged, [(lora, 1.0)])
    quantized = fp8.merge_to_fp8(base, [(lora, 1.0)], policy="default")
    dequantized = fp8.dequantize_state_dict(quantized, torch.bfloat16)

    y_base = _forward(suite, base)
    y_bf16 = _forward(suite, merged)
    y_fp8 = _forward(suite, {k: dequantized[k] for k in base})

    relative = (y_fp8 - y_bf16).norm() / y_bf16.norm()
    effect_bf16 = (y_bf16 - y_base).flatten()
    effect_fp8 = (y_fp8 - y_base).flatten()
    cosine = torch.nn.functional.cosine_similarity(effect_bf16, effect_fp8, dim=0)
    assert effect_bf16.norm() > 0.005 * y_base.norm()  # the LoRA visibly changes the output
    assert relative <= 0.02, f"fp8 forward off by {relative:.3%}"
    assert cosine >= 0.9, f"the LoRA's effect survives fp8 with cosine {cosine:.3f}"
