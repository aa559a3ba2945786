"""Every Flux LoRA key format, converted into one canonical form (`LoRAFile`).

By job: `schemes` (naming schemes) with each architecture's module tables (`flux1`), `factor_keys`
(which suffix is which factor; alphas), `split_qkv` (kohya's block-diagonal layout), `loader`
(`load_lora`) and `lora_file` (the canonical form, `describe`, `check_fits`).
"""

from .loader import load_lora
from .lora_file import UNMERGED_BYTES_PER_PARAM, Coverage, LoRAFile, ShapeLookup, check_fits, describe
from .schemes import ModuleNames, Resolved, Schemes

__all__ = [
    "UNMERGED_BYTES_PER_PARAM",
    "Coverage",
    "LoRAFile",
    "ModuleNames",
    "Resolved",
    "Schemes",
    "ShapeLookup",
    "check_fits",
    "describe",
    "load_lora",
]
