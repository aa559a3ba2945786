"""One small class per adapter kind. Each adds its weight change to a tile of rows, in fp32.

An adapter covers `rows` x `cols` of its target weight, starting at `row_offset` (fused weights such
as `qkv` and `linear1` take several adapters at different offsets). `add_delta(out, start, stop,
coeff, base)` adds `coeff` times rows [start, stop) of its change into `out`; it never builds the
whole-layer change. `scale` holds alpha/rank (or 1); `coeff` is the user's strength.

Each kind that a file stores directly names its factor keys (`file_factors`) and builds itself
from them (`from_file`, which checks they fit together); `FILE_KINDS` lists those kinds, so a new
kind is one module here (as ComfyUI's comfy/weight_adapter/) plus one entry in FILE_KINDS.
"""

from .base import ROW_BLOCK, Adapter, check_factor
from .dora import DoRA
from .full import BiasDiff, Diff, SetWeight
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

#: The kinds a LoRA file stores directly, each built by its `from_file` (DoRA wraps one of them;
#: SetWeight comes from control-LoRA norm scales).
FILE_KINDS: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, Diff, BiasDiff)

__all__ = [
    "FILE_KINDS",
    "ROW_BLOCK",
    "Adapter",
    "BiasDiff",
    "Diff",
    "DoRA",
    "LoHa",
    "LoKr",
    "LoRA",
    "SetWeight",
    "check_factor",
]
