"""Flux.2's LoRA-targetable modules under each family of names (BFL, diffusers).

Flux.2 (dev, klein) has no per-block modulation: one shared Linear for all double blocks' image
stream, one for their text stream and one for all single blocks. Its MLP input Linear holds gate and
value halves, and the single blocks' `linear1` is diffusers' `attn.to_qkv_mlp_proj` (q, k, v and both
MLP inputs, the same row order), `linear2` is `attn.to_out`. kohya-style names (musubi-tuner
`lora_unet_…`), LyCORIS, OneTrainer and the `transformer.` / `diffusion_model.` prefixes come from
`Schemes`, as for Flux.1.
"""

from __future__ import annotations

from ..flux import FLUX2_SHARED_MODULATIONS
from .flux1 import DIFFUSERS_DOUBLE_ATTENTION
from .schemes import ModuleNames, Schemes

BFL_MODULES = (
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{i}.linear1",
    "single_blocks.{i}.linear2",
    *(f"{m}.lin" for m in FLUX2_SHARED_MODULATIONS),
    "img_in",
    "txt_in",
    *(f"{e}.{layer}" for e in ("time_in", "guidance_in") for layer in ("in_layer", "out_layer")),
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)

DIFFUSERS_MODULES = (
    *DIFFUSERS_DOUBLE_ATTENTION,
    ("transformer_blocks.{i}.ff.linear_in", "double_blocks.{i}.img_mlp.0", None),
    ("transformer_blocks.{i}.ff.linear_out", "double_blocks.{i}.img_mlp.2", None),
    ("transformer_blocks.{i}.ff_context.linear_in", "double_blocks.{i}.txt_mlp.0", None),
    ("transformer_blocks.{i}.ff_context.linear_out", "double_blocks.{i}.txt_mlp.2", None),
    ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "single_blocks.{i}.linear1", None),
    ("single_transformer_blocks.{i}.attn.to_out", "single_blocks.{i}.linear2", None),
    *((f"{m}.linear", f"{m}.lin", None) for m in FLUX2_SHARED_MODULATIONS),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    *(
        (f"{embed}.{d}.linear_{n}", f"{b}.{layer}", None)
        for embed in ("time_guidance_embed", "time_text_embed")  # diffusers' name; ComfyUI's Flux.1 name
        for d, b in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in"))
        for n, layer in ((1, "in_layer"), (2, "out_layer"))
    ),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
)

FLUX2_MODULES = ModuleNames(bfl=BFL_MODULES, diffusers=DIFFUSERS_MODULES)
FLUX2 = Schemes(FLUX2_MODULES)
