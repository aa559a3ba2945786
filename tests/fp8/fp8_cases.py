"""Shapes and helpers shared by the fp8 tests."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from lora_ops.flux import FluxShape
from lora_ops.merge import merge_loras

TINY = FluxShape(hidden=64, depth=1, depth_single=1, heads=2, context_dim=48, vec_dim=24, time_dim=16,
                 in_channels=16, out_channels=16)
#: Big enough that the safetensors header is far below 2 % of the file.
SMALL = FluxShape(hidden=256, depth=1, depth_single=1, heads=2, context_dim=96, vec_dim=48, time_dim=32,
                  in_channels=16, out_channels=16)
E4M3 = torch.float8_e4m3fn
QKV = "double_blocks.0.img_attn.qkv.weight"



def fp32_reference(base, stack) -> dict[str, torch.Tensor]:
    ref = {k: v.float().clone() for k, v in base.items()}
    merge_loras(ref, stack)
    return ref


def flux_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A bare torch module tree with Flux's Linear names (under `diffusion_model.`, as in ComfyUI)."""
    root = torch.nn.Module()

    def node(path: list[str]) -> torch.nn.Module:
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        return m

    for key, t in sd.items():
        parts = key.split(".")
        if key.endswith(".weight") and t.dim() == 2:
            bias = sd.get(key[: -len(".weight")] + ".bias")
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=bias is not None, dtype=t.dtype)
            with torch.no_grad():
                lin.weight.copy_(t)
                if bias is not None:
                    lin.bias.copy_(bias)
            node(parts[:-2]).add_module(parts[-2], lin)
        elif key.endswith(".scale"):
            node(parts[:-1]).register_parameter("scale", torch.nn.Parameter(t.clone(), requires_grad=False))
    outer = torch.nn.Module()
    outer.diffusion_model = root
    return outer


def file_sizes(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()[:8]
    (header,) = struct.unpack("<Q", raw)
    return path.stat().st_size, header
