"""Offline merge of LoRAs into a Flux checkpoint file, streamed tensor by tensor.

Peak memory is one tensor (plus the LoRA files), whatever the model size: each tensor is read,
merged with the engine, and written out at once by `StreamingWriter`, which writes a temporary
file and renames it only when everything succeeded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import LoRAOpsError
from .flux import strip_model_prefix
from .formats import LoRAFile, check_fits
from .merge import MergeOptions, merge_loras
from .model_files import open_flux_checkpoint, refuse_overwriting_inputs
from .safetensors_io import StreamingWriter

OUTPUT_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _check_finite(tensor: torch.Tensor, source_finite: bool, key: str, loras, model_path) -> None:
    """A merge must not turn finite weights into Inf/NaN (strengths too large for the output dtype)."""
    if source_finite and not bool(torch.isfinite(tensor).all()):
        stack = ", ".join(f"{lora.path}:{s:g}" for lora, s in loras)
        raise LoRAOpsError(
            f"{model_path}: merging {stack} makes {key!r} overflow to Inf/NaN in {tensor.dtype}; nothing was "
            "written. Lower the strengths, or write a wider dtype (--dtype fp32)."
        )


def merged_stack_metadata(loras: Sequence[tuple[LoRAFile, float]]) -> str:
    """The `lora_ops.merged` header entry of a merged file: each LoRA, its strength and its block spec."""
    return json.dumps(
        [
            {"file": lora.path.name, "format": lora.format, "strength": s}
            | ({"blocks": lora.block_spec} if lora.block_spec else {})
            for lora, s in loras
        ]
    )


def merge_checkpoint(
    model_path: str | Path,
    loras: Sequence[tuple[LoRAFile, float]],
    out_path: str | Path,
    *,
    dtype: str = "keep",
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Write `out_path` = the checkpoint with the LoRAs merged; returns a summary for the caller."""
    out_path = Path(out_path)
    if dtype not in OUTPUT_DTYPES:
        raise LoRAOpsError(f"unknown --dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)} (or fp8)")
    refuse_overwriting_inputs(out_path, [Path(model_path), *(lora.path for lora, _ in loras)])
    for lora, strength in loras:
        if not math.isfinite(strength):
            raise LoRAOpsError(f"{lora.path}: strength {strength} is not a finite number; give one such as 0.8")
    model = open_flux_checkpoint(model_path)
    shapes = {strip_model_prefix(k)[1]: model.shape(k) for k in model.keys()}
    for lora, _ in loras:
        check_fits(lora, shapes.get, model_name=str(model_path))
    out_dtype = OUTPUT_DTYPES[dtype]
    targets = {t for lora, _ in loras for t in lora.targets}

    def stored_dtype(key: str) -> torch.dtype:
        own = model.dtype(key)
        return out_dtype if (out_dtype is not None and own.is_floating_point) else own

    plan = [(key, stored_dtype(key), model.shape(key)) for key in model.keys()]
    metadata = dict(model.metadata)
    metadata["lora_ops.merged"] = merged_stack_metadata(loras)
    if out_dtype is not None:
        metadata["lora_ops.dtype"] = dtype
    total = len(plan)
    merged = 0
    options = MergeOptions(exact_undo=False, compute_device=device)
    with StreamingWriter(out_path, plan, metadata) as writer:
        for i, (key, want, _) in enumerate(plan):
            tensor = model.get(key)
            name = strip_model_prefix(key)[1]
            if name in targets:
                source_finite = bool(torch.isfinite(tensor).all())
                work = tensor.float() if want != tensor.dtype else tensor
                merge_loras({name: work}, [(lora.only({name}), s) for lora, s in loras], options=options)
                tensor = work.to(want)
                merged += 1
                _check_finite(tensor, source_finite, key, loras, model_path)
            writer.write(key, tensor.to(want))
            if progress is not None:
                progress(i + 1, total)
    return {"out": str(out_path), "tensors": total, "merged": merged, "dtype": dtype}
