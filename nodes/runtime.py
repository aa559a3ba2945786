"""What the nodes ask of a MODEL: attach a LoRA stack or an fp8 cast to be applied at load, describe what is merged.

The work happens when ComfyUI loads the model (lifecycle.py); here the request is checked against the model
(model_view.py) and recorded as a plan (plan.py) on a clone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..lora_ops import MIB, LoRAOpsError, block_counts, parse_block_spec
from .compat import require_supported
from .lifecycle import apply_plan
from .model_view import check_model, original_params
from .plan import ATTACHMENT, FP8Step, MergePlan, StackEntry, record_of

__all__ = ["ATTACHMENT", "StackEntry", "attach_fp8", "attach_plan", "describe_model_state"]


def attach_plan(model, entries: Iterable[StackEntry], compute: str = "auto", tile_mb: int = 64):
    """A clone of `model` that merges `entries` (after any stack it already has) whenever ComfyUI loads it."""
    entries = tuple(entries)
    if not entries:
        return model
    require_supported()
    check_model(model, entries)
    entries = with_model_block_weights(model, entries)
    previous = model.attachments.get(ATTACHMENT)
    plan = MergePlan(
        (previous.entries if previous is not None else ()) + entries,
        compute=compute,
        tile_mb=int(tile_mb),
        fp8=previous.fp8 if previous is not None else None,
    )
    return apply_plan(model, plan)


def with_model_block_weights(model, entries: tuple[StackEntry, ...]) -> tuple[StackEntry, ...]:
    """Read each entry's block spec against this model's block counts (an out-of-range block fails here)."""
    if not any(e.block_spec for e in entries):
        return entries
    counts = block_counts(original_params(model))
    out = []
    for e in entries:
        if not e.block_spec:
            out.append(e)
            continue
        try:
            weights = parse_block_spec(e.block_spec, counts)
        except LoRAOpsError as error:
            raise LoRAOpsError(f"{e.name}: {error}") from None
        out.append(dataclasses.replace(e, block_weights=None if weights.is_identity else weights))
    return tuple(out)


def attach_fp8(model, policy: str = "default", rounding: str = "nearest", fp8_matmul: bool = False):
    """A clone of `model` whose selected Linears are cast to fp8 at load, after merging its LoRA stack."""
    require_supported()
    check_model(model, ())
    previous = model.attachments.get(ATTACHMENT)
    step = FP8Step(policy, rounding, bool(fp8_matmul), ())
    if previous is None:
        plan = MergePlan((), fp8=step)
    else:
        plan = dataclasses.replace(previous, fp8=step)
    return apply_plan(model, plan)


def describe_model_state(model) -> str:
    """One line about what is merged into a shared module now (for the VRAM report)."""
    rec = record_of(model)
    if rec is None:
        return "no LoRA merged"
    return f"merged {rec.names}; undo journal {rec.state.journal_bytes / MIB:.1f} MiB"
