"""fp8 Flux: scaled float8_e4m3fn weights with fresh per-tensor scales, layer policies, merge-then-quantise.

- `quantize`: scales (power of two by default) and rounding (nearest, or stochastic and tile-independent).
- `policies`: which Linears a preset stores in fp8, and the checkpoint size that gives.
- `merged_rows`: the tile loop, base + Σ coeff·ΔW in fp32, quantised once (`quantize_merged`).
- `checkpoint`: reading our files, ComfyUI's (`scaled_fp8`, `comfy_quant`) and plain fp8 ones; the names of both.
- `writer`: streaming a checkpoint (+ LoRAs) into an fp8 file, `comfy_quant` (ComfyUI 0.33+) or `scaled_fp8`
  (ComfyUI 0.3.x) (`merge_checkpoint_fp8`, `merge_to_fp8`).
- `layer`: FP8Linear, and casting or loading a module by policy.
- `codecs`: in-place merges into fp8 weights with the merge engine (fresh scales, exact undo).

Measurements behind these choices are in BENCHMARKS.md ("fp8").
"""

from .checkpoint import (
    INPUT_SCALE_SUFFIX,
    MARKER,
    NEW_INPUT_SCALE_SUFFIX,
    NEW_QUANT_SUFFIX,
    NEW_SCALE_SUFFIX,
    PER_TENSOR_FP8_FORMATS,
    QUANT_METADATA,
    SCALE_SUFFIX,
    FP8Checkpoint,
    ScaleTable,
    comfy_quant_layer,
    comfy_quant_layers,
    comfy_quant_tensor,
    dequantize_state_dict,
    load_fp8_state_dict,
    refuse_other_layouts,
    scale_table,
)
from .codecs import PlainFP8Codec, ScaledFP8Codec, fp8_merge_options, merge_loras_fp8
from .layer import CastReport, FP8Linear, cast_module_fp8, load_fp8_into_module
from .merged_rows import DEFAULT_TILE_BYTES, Term, merge_rows_to, quantize, quantize_merged
from .policies import OUTSIDE_LINEARS, PRESETS, FP8Policy, FP8Size, fp8_keys, get_policy, policy_size, preset_sizes
from .quantize import (
    E4M3,
    E5M2,
    FP8_MAX,
    ROUNDINGS,
    SCALE_MODES,
    FP8FormatError,
    check_rounding,
    check_scale,
    dequantize,
    fp8_max,
    fresh_scale,
    is_fp8,
    key_seed,
    round_fp8,
    stochastic_fp8,
    uniform_noise,
)
from .writer import FILE_FORMATS, FP8Conversion, check_file_format, fp8_conversion, merge_checkpoint_fp8, merge_to_fp8

__all__ = [
    "DEFAULT_TILE_BYTES",
    "E4M3",
    "E5M2",
    "FILE_FORMATS",
    "FP8_MAX",
    "INPUT_SCALE_SUFFIX",
    "MARKER",
    "NEW_INPUT_SCALE_SUFFIX",
    "NEW_QUANT_SUFFIX",
    "NEW_SCALE_SUFFIX",
    "OUTSIDE_LINEARS",
    "PER_TENSOR_FP8_FORMATS",
    "PRESETS",
    "QUANT_METADATA",
    "ROUNDINGS",
    "SCALE_MODES",
    "SCALE_SUFFIX",
    "CastReport",
    "FP8Checkpoint",
    "FP8Conversion",
    "FP8FormatError",
    "FP8Linear",
    "FP8Policy",
    "FP8Size",
    "PlainFP8Codec",
    "ScaleTable",
    "ScaledFP8Codec",
    "Term",
    "cast_module_fp8",
    "check_file_format",
    "check_rounding",
    "check_scale",
    "comfy_quant_layer",
    "comfy_quant_layers",
    "comfy_quant_tensor",
    "dequantize",
    "dequantize_state_dict",
    "fp8_conversion",
    "fp8_max",
    "fp8_keys",
    "fp8_merge_options",
    "fresh_scale",
    "get_policy",
    "is_fp8",
    "key_seed",
    "load_fp8_into_module",
    "load_fp8_state_dict",
    "merge_checkpoint_fp8",
    "merge_loras_fp8",
    "merge_rows_to",
    "merge_to_fp8",
    "policy_size",
    "preset_sizes",
    "quantize",
    "quantize_merged",
    "refuse_other_layouts",
    "round_fp8",
    "scale_table",
    "stochastic_fp8",
    "uniform_noise",
]
