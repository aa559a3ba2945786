"""The Flux modules of the test oracle's LoRAs and their canonical factors (see lora_factory.py for how the
formats share them), and random Flux models with bare BFL names. Only `lora_ops.flux` is used from the library:
for the BFL weight names and shapes."""

from __future__ import annotations

import hashlib

import torch
from flux2_oracle import flux2_default_targets, flux2_diffusers_modules

from lora_ops.flux import FluxShape, flux_weight_shapes

TINY = FluxShape(hidden=32, depth=2, depth_single=2, heads=2, context_dim=48, vec_dim=24, time_dim=16,
                 in_channels=16, out_channels=16)
#: A tiny Flux.2: shared modulation, gated MLP (ratio 3), no biases, no pooled vector.
TINY_FLUX2 = FluxShape(family="flux2", hidden=64, depth=2, depth_single=3, heads=2, mlp_ratio=3, in_channels=32,
                       out_channels=32, context_dim=48, vec_dim=0, guidance=True)

FACTOR_STD = 0.1
DTYPE = torch.bfloat16


def generator(seed: int, *parts: object) -> torch.Generator:
    text = "|".join(str(p) for p in (seed, *parts))
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def randn(gen: torch.Generator, *size: int, std: float = FACTOR_STD) -> torch.Tensor:
    return (torch.randn(size, generator=gen, dtype=torch.float32) * std).to(DTYPE)


def base_state_dict(shape: FluxShape, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random Flux model with bare BFL names: weights randn*0.02, biases randn*0.01, norm scales 1+randn*0.1."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, dims in flux_weight_shapes(shape).items():
        noise = torch.randn(dims, generator=gen, dtype=torch.float32)
        if name.endswith(".scale"):
            value = 1.0 + noise * 0.1
        elif name.endswith(".bias"):
            value = noise * 0.01
        else:
            value = noise * 0.02
        out[name] = value.to(dtype)
    return out


def module_shapes(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """Every Linear module of Flux (BFL name without ``.weight``) -> (out, in)."""
    return {
        name[: -len(".weight")]: (dims[0], dims[1])
        for name, dims in flux_weight_shapes(shape).items()
        if name.endswith(".weight") and len(dims) == 2
    }


def default_targets(shape: FluxShape) -> list[str]:
    """Block 0 of each kind fully, the last block partly (so some block weights stay untouched), all globals."""
    if shape.family == "flux2":
        return flux2_default_targets(shape.depth, shape.depth_single, shape.guidance)
    mods: list[str] = []
    double_all = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
    double_some = ("img_attn.qkv", "txt_attn.proj", "txt_mlp.2", "txt_mod.lin")
    single_all = ("linear1", "linear2", "modulation.lin")
    single_some = ("linear2", "modulation.lin")
    for i in range(shape.depth):
        mods += [f"double_blocks.{i}.{m}" for m in (double_all if i == 0 else double_some if i == shape.depth - 1
                                                     else ())]
    for i in range(shape.depth_single):
        mods += [f"single_blocks.{i}.{m}" for m in (single_all if i == 0 else single_some
                                                     if i == shape.depth_single - 1 else ())]
    mods += ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
    if shape.guidance:
        mods += ["guidance_in.in_layer", "guidance_in.out_layer"]
    mods += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    return mods


def lora_factors(seed: int, module: str, out_f: int, in_f: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (down [r, in], up [out, r]) of a BFL module; shared by all formats listed in the module doc."""
    gen = generator(seed, "lora", module, rank, out_f, in_f)
    down = randn(gen, rank, in_f)
    up = randn(gen, out_f, rank)
    return down, up


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def diffusers_modules(module: str, shape: FluxShape) -> list[tuple[str, torch.Tensor]]:
    """Diffusers module(s) of a BFL module, each with the BFL rows its output rows land in (in order)."""
    h, m = shape.hidden, shape.mlp_hidden
    if shape.family == "flux2":
        return flux2_diffusers_modules(module, h, m, shape.out_channels)

    def rows(a: int, b: int) -> torch.Tensor:
        return torch.arange(a, b)

    parts = module.split(".")
    if parts[0] == "double_blocks":
        b = f"transformer_blocks.{parts[1]}"
        rest = ".".join(parts[2:])
        qkv = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
        if rest in qkv:
            return [(f"{b}.attn.{name}", rows(j * h, (j + 1) * h)) for j, name in enumerate(qkv[rest])]
        single = {
            "img_attn.proj": ("attn.to_out.0", h), "txt_attn.proj": ("attn.to_add_out", h),
            "img_mlp.0": ("ff.net.0.proj", m), "img_mlp.2": ("ff.net.2", h),
            "txt_mlp.0": ("ff_context.net.0.proj", m), "txt_mlp.2": ("ff_context.net.2", h),
            "img_mod.lin": ("norm1.linear", 6 * h), "txt_mod.lin": ("norm1_context.linear", 6 * h),
        }
        name, out_f = single[rest]
        return [(f"{b}.{name}", rows(0, out_f))]
    if parts[0] == "single_blocks":
        b = f"single_transformer_blocks.{parts[1]}"
        rest = ".".join(parts[2:])
        if rest == "linear1":
            return [(f"{b}.attn.to_q", rows(0, h)), (f"{b}.attn.to_k", rows(h, 2 * h)),
                    (f"{b}.attn.to_v", rows(2 * h, 3 * h)), (f"{b}.proj_mlp", rows(3 * h, 3 * h + m))]
        if rest == "linear2":
            return [(f"{b}.proj_out", rows(0, h))]
        if rest == "modulation.lin":
            return [(f"{b}.norm.linear", rows(0, 3 * h))]
        raise KeyError(module)
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    if parts[0] in emb:
        layer = {"in_layer": "linear_1", "out_layer": "linear_2"}[parts[1]]
        return [(f"time_text_embed.{emb[parts[0]]}.{layer}", rows(0, h))]
    if module == "img_in":
        return [("x_embedder", rows(0, h))]
    if module == "txt_in":
        return [("context_embedder", rows(0, h))]
    if module == "final_layer.linear":
        return [("proj_out", rows(0, shape.out_channels))]
    if module == "final_layer.adaLN_modulation.1":
        # diffusers rows are [scale; shift], BFL rows are [shift; scale]: diffusers row j is BFL row (j + H) % 2H.
        return [("norm_out.linear", torch.cat([rows(h, 2 * h), rows(0, h)]))]
    raise KeyError(module)
