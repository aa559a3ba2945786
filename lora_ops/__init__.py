"""lora_ops: read every Flux LoRA format and merge LoRAs into Flux weights in place, tile by tile.

Standalone: needs torch, safetensors and numpy, never ComfyUI.
"""

from .errors import LoRAFormatError, LoRAFormatWarning, LoRAOpsError, ModelMismatchError, UnsafeFileError
from .flux import FLUX_DEV, FLUX_SCHNELL, FluxShape, flux_weight_shapes
from .formats import Coverage, LoRAFile, load_lora
from .merge import MergeOptions, MergeReport, MergeState, merge_loras, restore

__version__ = "0.1.0"

__all__ = [
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "Coverage",
    "FluxShape",
    "LoRAFile",
    "LoRAFormatError",
    "LoRAFormatWarning",
    "LoRAOpsError",
    "MergeOptions",
    "MergeReport",
    "MergeState",
    "ModelMismatchError",
    "UnsafeFileError",
    "flux_weight_shapes",
    "load_lora",
    "merge_loras",
    "restore",
]
