"""Flux-shaped checkpoints and LoRAs made from seeds (weights cannot be downloaded here).

Used by `python -m lora_ops demo`, the benchmarks and the tests. Weights are random normal with
Flux-like scales; names and shapes are the real ones (see flux.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .flux import FluxShape, flux_weight_shapes, is_block_linear
from .safetensors_io import StreamingWriter


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("_norm.scale"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    std = 0.01 if name.endswith(".bias") else 0.02
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def flux_state_dict(shape: FluxShape, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A Flux state dict with bare BFL names, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return {name: _tensor(name, dims, gen, dtype) for name, dims in flux_weight_shapes(shape).items()}


def write_flux_checkpoint(
    path: str | Path, shape: FluxShape, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = ""
) -> Path:
    """Write a Flux checkpoint tensor by tensor (never the whole model in memory)."""
    path = Path(path)
    shapes = flux_weight_shapes(shape)
    plan = [(prefix + name, dtype, dims) for name, dims in shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, plan, {"format": "pt", "lora_ops.synthetic": f"seed={seed}"}) as out:
        for name, dims in shapes.items():
            out.write(prefix + name, _tensor(name, dims, gen, dtype))
    return path


def kohya_lora_tensors(
    shape: FluxShape, rank: int, seed: int = 1, alpha: float | None = None, relative_change: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A kohya-format (`lora_unet_*`) LoRA on every block Linear, as sd-scripts trains by default.

    Factors are scaled so that ‖ΔW‖ is about `relative_change` of a 0.02-std weight's norm.
    """
    gen = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    out: dict[str, torch.Tensor] = {}
    for name, dims in flux_weight_shapes(shape).items():
        if not is_block_linear(name):
            continue
        rows, cols = dims
        module = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        # std of up@down entries = su*sd*sqrt(rank); want relative_change*0.02 after alpha/rank.
        sd = 1.0 / cols**0.5
        su = relative_change * 0.02 * cols**0.5 / (rank**0.5) * (rank / alpha)
        out[f"{module}.lora_down.weight"] = (torch.randn(rank, cols, generator=gen) * sd).to(dtype)
        out[f"{module}.lora_up.weight"] = (torch.randn(rows, rank, generator=gen) * su).to(dtype)
        out[f"{module}.alpha"] = torch.tensor(alpha)
    return out


def write_kohya_lora(path: str | Path, shape: FluxShape, rank: int, seed: int = 1, **kw) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(kohya_lora_tensors(shape, rank, seed, **kw), str(path), metadata={"ss_network_dim": str(rank)})
    return path
