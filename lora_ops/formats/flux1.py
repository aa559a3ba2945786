"""Flux.1's LoRA-targetable modules under each family of names (BFL, diffusers, XLabs)."""

from __future__ import annotations

from .schemes import ModuleNames, Schemes

#: BFL Linear modules LoRAs target; {i} is a block index.
BFL_MODULES = (
    *(
        f"double_blocks.{{i}}.{s}_{m}"
        for s in ("img", "txt")
        for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    ),
    "single_blocks.{i}.linear1",
    "single_blocks.{i}.linear2",
    "single_blocks.{i}.modulation.lin",
    "img_in",
    "txt_in",
    *(f"{e}.{layer}" for e in ("time_in", "vector_in", "guidance_in") for layer in ("in_layer", "out_layer")),
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)

#: Double-block attention under diffusers' names (the same in Flux.2).
DIFFUSERS_DOUBLE_ATTENTION = (
    *(
        (f"transformer_blocks.{{i}}.attn.{d}", f"double_blocks.{{i}}.{s}_attn.qkv", ("split", n))
        for s, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")))
        for n, d in enumerate(names)
    ),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj", None),
)

DIFFUSERS_MODULES = (
    *DIFFUSERS_DOUBLE_ATTENTION,
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0", None),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2", None),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0", None),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2", None),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin", None),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin", None),
    *(
        (f"single_transformer_blocks.{{i}}.attn.{d}", "single_blocks.{i}.linear1", ("split", n))
        for n, d in enumerate(("to_q", "to_k", "to_v"))
    ),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", "mlp"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", None),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin", None),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    *(
        (f"time_text_embed.{d}.linear_{n}", f"{b}.{layer}", None)
        for d, b in (
            ("timestep_embedder", "time_in"),
            ("text_embedder", "vector_in"),
            ("guidance_embedder", "guidance_in"),
        )
        for n, layer in ((1, "in_layer"), (2, "out_layer"))
    ),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
)

XLABS_MODULES = (
    ("double_blocks.{i}.processor.qkv_lora1", "double_blocks.{i}.img_attn.qkv", None),
    ("double_blocks.{i}.processor.qkv_lora2", "double_blocks.{i}.txt_attn.qkv", None),
    ("double_blocks.{i}.processor.proj_lora1", "double_blocks.{i}.img_attn.proj", None),
    ("double_blocks.{i}.processor.proj_lora2", "double_blocks.{i}.txt_attn.proj", None),
    ("single_blocks.{i}.processor.qkv_lora", "single_blocks.{i}.linear1", None),
    ("single_blocks.{i}.processor.proj_lora", "single_blocks.{i}.linear2", None),
)

NORM_SCALES = (
    *(f"double_blocks.{{i}}.{s}_attn.norm.{n}_norm" for s in ("img", "txt") for n in ("query", "key")),
    *(f"single_blocks.{{i}}.norm.{n}_norm" for n in ("query", "key")),
)

FLUX1_MODULES = ModuleNames(bfl=BFL_MODULES, diffusers=DIFFUSERS_MODULES, xlabs=XLABS_MODULES, norm_scales=NORM_SCALES)
FLUX1 = Schemes(FLUX1_MODULES)
