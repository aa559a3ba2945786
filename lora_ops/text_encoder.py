"""The text-encoder part of a Flux LoRA file (CLIP-L `lora_te1_…`, T5 `lora_te2_…`, `text_encoders.…`).

The pack's engine merges the diffusion model only; these keys are handed, as they are in the file, to
ComfyUI's own CLIP patching (the nodes do that). This module only reads them and names their modules.
"""

from __future__ import annotations

import torch

from .formats import LoRAFile
from .formats.factor_keys import split_key
from .safetensors_io import SafetensorsFile


def text_encoder_tensors(lora: LoRAFile) -> dict[str, torch.Tensor]:
    """The file's text-encoder keys with their tensors, read again from the file (they are not cached)."""
    keys = lora.coverage.text_encoder_keys
    if not keys:
        return {}
    return dict(SafetensorsFile(lora.path).iter_tensors(keys))


def text_encoder_modules(lora: LoRAFile) -> list[str]:
    """Module names of the text-encoder keys (`lora_te1_text_model_encoder_layers_0_mlp_fc1`), in file order."""
    modules = (split_key(key) for key in lora.coverage.text_encoder_keys)
    return list(dict.fromkeys(split[0] for split in modules if split is not None))
