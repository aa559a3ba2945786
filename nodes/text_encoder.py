"""A LoRA's text-encoder keys applied to a CLIP through ComfyUI's own patching (as core LoraLoader does).

The pack's in-place engine is for the diffusion model; text encoders are small, and ComfyUI's CLIP patches
follow every clone and unpatch correctly, so the keys are handed to comfy.lora as they are in the file.
"""

from __future__ import annotations

import comfy.lora
import comfy.lora_convert

from ..lora_ops import LoRAFile, text_encoder_modules, text_encoder_tensors

#: ComfyUI's prefixes inside a Flux CLIP and the encoder each means.
ENCODER_NAMES = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL", "clip_g": "CLIP-G"}


def _encoder(model_key: str) -> str:
    prefix = model_key.split(".", 1)[0]
    return f"{ENCODER_NAMES.get(prefix, prefix)} ({prefix})"


def apply_to_clip(clip, lora: LoRAFile, strength: float, name: str):
    """(patched clone of `clip` or `clip` itself, one line for the node) for the LoRA's text-encoder keys."""
    modules = text_encoder_modules(lora)
    if not modules:
        return clip, None
    if clip is None:
        return None, (
            f"text encoder: {name} also has {len(lora.coverage.text_encoder_keys)} text-encoder keys "
            f"({len(modules)} layers); connect a CLIP to this node to apply them"
        )
    if strength == 0:
        return clip, f"text encoder: strength_clip is 0; {len(modules)} text-encoder layers not applied"
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(text_encoder_tensors(lora)), key_map, False)
    patched = clip.clone()
    applied = patched.add_patches(patches, strength)
    counts: dict[str, int] = {}
    for key in applied:
        counts[_encoder(key)] = counts.get(_encoder(key), 0) + 1
    unmatched = [m for m in modules if m not in key_map]
    parts = [f"{n} weights to {encoder}" for encoder, n in sorted(counts.items())] or ["nothing applied"]
    text = f"text encoder @ {strength:g}: " + ", ".join(parts)
    if unmatched:
        text += f"; {len(unmatched)} of {len(modules)} layers match nothing in this CLIP (e.g. {unmatched[0]})"
    return patched, text
