"""lora_ops: read every Flux LoRA format and merge LoRAs into Flux weights in place, tile by tile.

Standalone: needs torch, safetensors and numpy, never ComfyUI.
"""

from .blocks import (
    BLOCK_PRESETS,
    BLOCK_SPEC_GRAMMAR,
    BlockWeights,
    block_counts,
    blocks_touched,
    describe_blocks,
    parse_block_spec,
    with_block_weights,
)
from .errors import LoRAFormatError, LoRAFormatWarning, LoRAOpsError, ModelMismatchError, UndoError, UnsafeFileError
from .flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    VARIANTS,
    FluxShape,
    detect_family,
    flux_weight_shapes,
    parameter_count,
    shape_from_state_dict,
)
from .formats import Coverage, LoRAFile, check_fits, load_lora
from .merge import MergeOptions, MergeReport, MergeState, merge_loras, restore, terms_by_target
from .reload import find_model_file, merged_keys, reload_weights, restore_from_file
from .resize import LayerResize, ResizeReport, resize_lora, unmerged_saving
from .text_encoder import text_encoder_modules, text_encoder_tensors
from .units import GIB, MIB
from .verify import changes_on_copies, checksum, checksums

__version__ = "0.1.0"

__all__ = [
    "BLOCK_PRESETS",
    "BLOCK_SPEC_GRAMMAR",
    "BlockWeights",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "GIB",
    "Coverage",
    "FluxShape",
    "LayerResize",
    "LoRAFile",
    "LoRAFormatError",
    "LoRAFormatWarning",
    "LoRAOpsError",
    "MIB",
    "MergeOptions",
    "MergeReport",
    "MergeState",
    "ModelMismatchError",
    "ResizeReport",
    "UndoError",
    "UnsafeFileError",
    "VARIANTS",
    "detect_family",
    "parameter_count",
    "shape_from_state_dict",
    "block_counts",
    "blocks_touched",
    "describe_blocks",
    "changes_on_copies",
    "checksum",
    "checksums",
    "check_fits",
    "find_model_file",
    "flux_weight_shapes",
    "load_lora",
    "merge_loras",
    "merged_keys",
    "parse_block_spec",
    "reload_weights",
    "resize_lora",
    "restore",
    "restore_from_file",
    "terms_by_target",
    "text_encoder_modules",
    "text_encoder_tensors",
    "unmerged_saving",
    "with_block_weights",
]
