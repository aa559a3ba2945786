"""Valid LoRAs and models for the hostile-file cases (tests/hostile_files.py), and LoRAs that are broken or foreign
at the tensor level: bad factors, alphas and metadata, two naming schemes on one target, other models' LoRAs, a
model that is not Flux.

Each `make` here is a `Callable[[Path], Path]` that writes one file. Models and LoRAs are for `lora_factory.TINY`
(hidden 32); `model_state_dict()` is the model the fit cases are refused by.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lora_factory import TINY, base_state_dict, lora_factors, write_lora
from safetensors.torch import save_file

from lora_ops.flux import FluxShape, flux_weight_shapes

MODEL_SEED = 11
LORA_SEED = 5
RANK = 4
#: The module the hand-made kohya LoRAs change (fused qkv of double block 0) and its key stem.
MODULE = "double_blocks.0.img_attn.qkv"
STEM = "lora_unet_double_blocks_0_img_attn_qkv"
DOWN, UP, ALPHA = f"{STEM}.lora_down.weight", f"{STEM}.lora_up.weight", f"{STEM}.alpha"
#: A second, plain module (single block 0 linear2) so that the files have more than one target.
STEM2 = "lora_unet_single_blocks_0_linear2"


def model_state_dict(shape: FluxShape = TINY) -> dict[str, torch.Tensor]:
    return base_state_dict(shape, MODEL_SEED)


def write_model(path: Path, shape: FluxShape = TINY) -> Path:
    save_file(model_state_dict(shape), str(path), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------------ valid LoRAs


def kohya_tensors(shape: FluxShape = TINY, rank: int = RANK, alpha: float | None = RANK / 2
                  ) -> dict[str, torch.Tensor]:
    """A small valid kohya LoRA on MODULE and single_blocks.0.linear2 (bf16 factors, like the factory's)."""
    out: dict[str, torch.Tensor] = {}
    shapes = flux_weight_shapes(shape)
    for stem, module in ((STEM, MODULE), (STEM2, "single_blocks.0.linear2")):
        rows, cols = shapes[f"{module}.weight"]
        down, up = lora_factors(LORA_SEED, module, rows, cols, rank)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    return out


def write_valid_lora(path: Path) -> Path:
    save_file(kohya_tensors(), str(path))
    return path


# ------------------------------------------------------------------------------------------------ broken LoRAs


def saved(tensors: dict[str, torch.Tensor]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    return make


def mutated(**changes: torch.Tensor | None) -> Callable[[Path], Path]:
    """The valid LoRA with some keys replaced (None removes a key). Keys are given with '.' as '__'."""

    def make(path: Path) -> Path:
        tensors = kohya_tensors()
        for name, value in changes.items():
            key = name.replace("__", ".")
            if value is None:
                tensors.pop(key)
            else:
                tensors[key] = value
        return saved(tensors)(path)

    return make


def replaced(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        tensors = kohya_tensors()
        tensors[key] = fn(tensors[key])
        return saved(tensors)(path)

    return make


def poked(value: float, index: tuple[int, int] = (1, 2)) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return fn


def conv_factors(path: Path) -> Path:
    tensors = kohya_tensors()
    tensors[DOWN] = torch.randn(RANK, TINY.hidden, 3, 3).to(torch.bfloat16)
    return saved(tensors)(path)


def two_schemes_prefix(path: Path) -> Path:
    """The same LoRA on MODULE under kohya names and BFL names."""
    tensors = kohya_tensors()
    tensors[f"diffusion_model.{MODULE}.lora_down.weight"] = tensors[DOWN].clone()
    tensors[f"diffusion_model.{MODULE}.lora_up.weight"] = tensors[UP].clone()
    return saved(tensors)(path)


def two_schemes_suffix(path: Path) -> Path:
    """kohya lora_down/lora_up and PEFT lora_A/lora_B on one module name."""
    tensors = kohya_tensors()
    tensors[f"{STEM}.lora_A.weight"] = tensors[DOWN].clone()
    tensors[f"{STEM}.lora_B.weight"] = tensors[UP].clone()
    return saved(tensors)(path)


def two_schemes_split(path: Path) -> Path:
    """BFL qkv (kohya) plus a diffusers to_k on the same rows."""
    tensors = kohya_tensors()
    h = TINY.hidden
    tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = tensors[DOWN].clone()
    tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = tensors[UP][h : 2 * h].clone()
    return saved(tensors)(path)


def sd3_kohya(path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    t = {}
    for i in range(2):
        for m in ("x_block_attn_qkv", "context_block_attn_proj", "x_block_mlp_fc1"):
            stem = f"lora_unet_joint_blocks_{i}_{m}"
            t[f"{stem}.lora_down.weight"] = torch.randn(4, 64, generator=g)
            t[f"{stem}.lora_up.weight"] = torch.randn(192, 4, generator=g)
            t[f"{stem}.alpha"] = torch.tensor(4.0)
    return saved(t)(path)


def sd3_diffusers(path: Path) -> Path:
    """SD3's diffusers names are Flux's double-block names: it loads, and its 24-wide shapes do not fit."""
    g = torch.Generator().manual_seed(4)
    t = {}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"):
        t[f"transformer.transformer_blocks.0.{m}.lora_A.weight"] = torch.randn(4, 24, generator=g)
        t[f"transformer.transformer_blocks.0.{m}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    return saved(t)(path)


def text_encoder_only(path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    t = {}
    for stem in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_encoder_block_0_layer_0_SelfAttention_q"):
        t[f"{stem}.lora_down.weight"] = torch.randn(4, 24, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(24, 4, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(2.0)
    return saved(t)(path)


def peft(metadata: str) -> Callable[[Path], Path]:
    """A diffusers (PEFT) LoRA without alpha keys whose `lora_adapter_metadata` header entry is `metadata`."""

    def make(path: Path) -> Path:
        h = TINY.hidden
        down, up = lora_factors(LORA_SEED, MODULE, 3 * h, h, RANK)
        tensors = {f"transformer.transformer_blocks.0.attn.{n}.lora_{ab}.weight": t.clone()
                   for i, n in enumerate(("to_q", "to_k", "to_v"))
                   for ab, t in (("A", down), ("B", up[i * h : (i + 1) * h]))}
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata})
        return path

    return make


def from_factory(fmt: str, shape: FluxShape = TINY, **kw) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        write_lora(fmt, path, shape, RANK, LORA_SEED, **kw)
        return path

    return make


def deeper_lora(path: Path) -> Path:
    """A LoRA on double block 5 (TINY has 2)."""
    rows, cols = 3 * TINY.hidden, TINY.hidden
    down, up = lora_factors(LORA_SEED, "double_blocks.5.img_attn.qkv", rows, cols, RANK)
    return saved({"lora_unet_double_blocks_5_img_attn_qkv.lora_down.weight": down,
                  "lora_unet_double_blocks_5_img_attn_qkv.lora_up.weight": up})(path)


def not_flux_model(path: Path) -> Path:
    g = torch.Generator().manual_seed(6)
    t = {f"input_blocks.{i}.0.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16) for i in range(3)}
    t["middle_block.1.proj_in.weight"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    return saved(t)(path)
