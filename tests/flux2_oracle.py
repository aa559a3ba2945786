"""The oracle's Flux.2 knowledge, written out by hand from diffusers' Flux2Transformer2DModel and BFL's
names (no lora_ops mapping): which modules a Flux.2 LoRA targets and where each diffusers module's
output rows land in the BFL weight. lora_factory uses it when the shape's family is Flux.2."""

from __future__ import annotations

import torch

FLUX2_SHARED = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
#: Formats a Flux.2 LoRA exists in (lora_factory names; "aitoolkit" = BFL names under `transformer.`).
FLUX2_FORMATS = (
    "kohya",
    "bfl",
    "bfl_bare",
    "bfl_ab",
    "aitoolkit",
    "diffusers",
    "diffusers_alpha",
    "diffusers_bare",
    "onetrainer",
    "lokr",
    "lokr_lowrank",
    "loha",
    "full_diff",
    "dora",
)
#: Formats whose names ComfyUI 0.33.0 maps for a Flux.2 model (comfy/lora.py model_lora_keys_unet).
COMFY_FLUX2_FORMATS = ("kohya", "bfl", "bfl_ab", "diffusers", "diffusers_bare", "onetrainer", "lokr", "loha")


def flux2_default_targets(depth: int, depth_single: int, guidance: bool) -> list[str]:
    """Every Linear of block 0 of each kind, some of the last block, the shared modulations and the globals."""
    double_all = (
        "img_attn.qkv",
        "txt_attn.qkv",
        "img_attn.proj",
        "txt_attn.proj",
        "img_mlp.0",
        "img_mlp.2",
        "txt_mlp.0",
        "txt_mlp.2",
    )
    mods = [f"double_blocks.0.{m}" for m in double_all]
    mods += [f"double_blocks.{depth - 1}.{m}" for m in ("txt_attn.qkv", "img_mlp.2")] if depth > 1 else []
    mods += ["single_blocks.0.linear1", "single_blocks.0.linear2"]
    mods += [f"single_blocks.{depth_single - 1}.linear1"] if depth_single > 1 else []
    mods += [f"{m}.lin" for m in FLUX2_SHARED]
    mods += ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer"]
    mods += ["guidance_in.in_layer", "guidance_in.out_layer"] if guidance else []
    return mods + ["final_layer.linear", "final_layer.adaLN_modulation.1"]


def flux2_diffusers_modules(module: str, hidden: int, mlp_hidden: int, out_channels: int) -> list[tuple[str, object]]:
    """Diffusers module(s) of a Flux.2 BFL module, each with the BFL rows its output rows land in."""
    h, m = hidden, mlp_hidden
    parts = module.split(".")
    if parts[0] == "double_blocks":
        b, rest = f"transformer_blocks.{parts[1]}", ".".join(parts[2:])
        qkv = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
        if rest in qkv:
            return [(f"{b}.attn.{name}", torch.arange(j * h, (j + 1) * h)) for j, name in enumerate(qkv[rest])]
        whole = {
            "img_attn.proj": ("attn.to_out.0", h),
            "txt_attn.proj": ("attn.to_add_out", h),
            "img_mlp.0": ("ff.linear_in", 2 * m),
            "img_mlp.2": ("ff.linear_out", h),
            "txt_mlp.0": ("ff_context.linear_in", 2 * m),
            "txt_mlp.2": ("ff_context.linear_out", h),
        }
        name, rows = whole[rest]
        return [(f"{b}.{name}", torch.arange(rows))]
    if parts[0] == "single_blocks":
        b = f"single_transformer_blocks.{parts[1]}"
        if parts[2] == "linear1":  # diffusers splits to_qkv_mlp_proj as [q, k, v, gate+value]: BFL's order
            return [(f"{b}.attn.to_qkv_mlp_proj", torch.arange(3 * h + 2 * m))]
        return [(f"{b}.attn.to_out", torch.arange(h))]
    if parts[0] in FLUX2_SHARED:
        return [(f"{parts[0]}.linear", torch.arange((6 if parts[0].startswith("double") else 3) * h))]
    emb = {"time_in": "timestep_embedder", "guidance_in": "guidance_embedder"}
    if parts[0] in emb:
        layer = {"in_layer": "linear_1", "out_layer": "linear_2"}[parts[1]]
        return [(f"time_guidance_embed.{emb[parts[0]]}.{layer}", torch.arange(h))]
    simple = {
        "img_in": ("x_embedder", h),
        "txt_in": ("context_embedder", h),
        "final_layer.linear": ("proj_out", out_channels),
    }
    if module in simple:
        name, rows = simple[module]
        return [(name, torch.arange(rows))]
    if module == "final_layer.adaLN_modulation.1":  # diffusers [scale; shift] vs BFL [shift; scale]
        return [("norm_out.linear", torch.cat([torch.arange(h, 2 * h), torch.arange(h)]))]
    raise KeyError(module)
