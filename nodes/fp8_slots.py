"""The fp8 step's slots: empty `FP8Linear`s swapped in by ComfyUI object patches, filled at load with
quantise(untouched 16-bit original + the plan's LoRA terms) and released again at unpatch.

The arithmetic is `lora_ops.fp8.FP8Linear.empty()/fill()/release()`; this module only finds the originals in
ComfyUI's `object_patches_backup` and keeps ComfyUI's interrupt and progress going.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import torch

from ..lora_ops import LoRAOpsError, terms_by_target
from ..lora_ops.fp8 import ROUNDINGS, FP8Linear, get_policy
from .model_view import original_modules, original_params
from .plan import FP8Step, MergePlan
from .quantized import is_quantized, native_fp8_format


def _original(patcher, name: str) -> torch.nn.Module | None:
    return patcher.object_patches_backup.get("diffusion_model." + name)


def slot_numel(patcher, plan: MergePlan) -> int:
    """Elements the fp8 step quantises at load (for the progress bar)."""
    if plan.fp8 is None:
        return 0
    total = 0
    for name, _ in plan.fp8.slots:
        original = _original(patcher, name)
        total += original.weight.numel() if original is not None else 0
    return total


def fill_slots(patcher, plan: MergePlan, device, tile_bytes: int, advance: Callable[[int], None]) -> None:
    """Each slot := quantise(original 16-bit weight + the plan's LoRA terms), rounded once, fresh scale."""
    step = plan.fp8
    terms = terms_by_target(plan.pairs())
    for name, slot in step.slots:
        comfy.model_management.throw_exception_if_processing_interrupted()
        original = _original(patcher, name)
        if original is None:  # ComfyUI applies object patches before load(), keeping what they replaced
            raise LoRAOpsError(f"fp8 cast: the original layer diffusion_model.{name} is not in the patcher's backup")
        with torch.inference_mode():
            slot.fill(
                original.weight.data,
                None if original.bias is None else original.bias.data,
                terms=terms.get(f"{name}.weight", ()),
                bias_terms=terms.get(f"{name}.bias", ()),
                name=name,
                rounding=step.rounding,
                tile_bytes=tile_bytes,
                device=device,
            )
        advance(original.weight.numel())


def release_slots(step: FP8Step) -> None:
    """Free the fp8 copies (ComfyUI swaps the originals back in right after)."""
    for _, slot in step.slots:
        slot.release()


def make_step(model, policy: str, rounding: str, fp8_matmul: bool) -> tuple[FP8Step, int]:
    """Empty FP8Linear slots for the Linears `policy` selects, and the bytes the cast saves."""
    pol = get_policy(policy)
    if rounding not in ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    slots, saved = [], 0
    for name, module in original_modules(model).items():
        if isinstance(module, torch.nn.Linear) and pol.selects(f"{name}.weight", module.weight.shape):
            slot = FP8Linear.empty(module.in_features, fp8_matmul=fp8_matmul)
            slot.file_format = native_fp8_format()  # what ModelSave writes of it
            slots.append((name, slot))
            w = module.weight
            # the fp8 copy: one byte per element, plus what the empty slot holds (its scale, comfy_quant entry)
            extras = sum(t.nbytes for t in slot.state_dict().values())
            saved += w.numel() * w.element_size() - w.numel() - extras
    if not slots:
        quantized = next((n for n, p in original_params(model).items() if is_quantized(p.data)), None)
        if quantized is not None:
            raise LoRAOpsError(
                f"this model is already quantized ({quantized!r} is a QuantizedTensor); CastFluxFP8 casts bf16 "
                "models. Use the model as it is (MergeLoRAIntoModel merges into its fp8 layers)."
            )
        raise LoRAOpsError(f"fp8 policy {policy!r} selects no Linear of this model; is it a Flux model?")
    return FP8Step(pol.name, rounding, bool(fp8_matmul), tuple(slots)), saved
