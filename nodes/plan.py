"""What a MODEL wants merged at load (the plan, a patcher attachment) and what a shared module holds now (the record).

`clone()` copies patcher attachments, so every clone of a MODEL carries its plan; the record lives on the shared
BaseModel, so every clone sees what is merged into the weights they share.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..lora_ops import LoRAFile, MergeState

#: Patcher attachment holding the wanted MergePlan.
ATTACHMENT = "flux_lora_ops"
#: Attribute of the shared BaseModel holding the Record of what is merged now.
RECORD_ATTR = "flux_lora_ops_record"


@dataclass(frozen=True, eq=False)
class StackEntry:
    """One LoRA of a FLUX_LORA_STACK: the parsed file and its strength."""

    name: str
    strength: float
    lora: LoRAFile


@dataclass(frozen=True, eq=False)
class FP8Step:
    """Cast the Linears a policy selects to fp8 at load: FP8Linear slots swapped in by ComfyUI object patches.

    Each slot is filled from the untouched 16-bit original plus the plan's LoRA terms (merge-then-quantise,
    rounded once, fresh scale), so the originals are never modified and ComfyUI swaps them back itself.
    Slots belong to one plan (a new plan gets new slots) and are emptied when ComfyUI unpatches.
    """

    policy: str
    rounding: str
    fp8_matmul: bool
    slots: tuple[tuple[str, torch.nn.Module], ...]  # (module name under diffusion_model, FP8Linear slot)

    def describe(self) -> str:
        return f"fp8 ({self.policy}, {self.rounding} rounding, {len(self.slots)} Linears)"


@dataclass(frozen=True, eq=False)
class MergePlan:
    """What a MODEL wants at load: the LoRA stack, merge options, optionally an fp8 cast (a patcher attachment)."""

    entries: tuple[StackEntry, ...]
    compute: str = "auto"  # "auto" (the model's load device), "weight" (where each weight lives), "cpu"
    tile_mb: int = 64
    fp8: FP8Step | None = None

    def pairs(self) -> list[tuple[LoRAFile, float]]:
        return [(e.lora, float(e.strength)) for e in self.entries]

    @property
    def token(self) -> tuple:
        return (stack_token(self.pairs()), id(self.fp8) if self.fp8 is not None else None)

    def fp8_keys(self) -> set[str]:
        """Weights (and biases) the fp8 step produces itself; the in-place merge leaves these alone."""
        if self.fp8 is None:
            return set()
        return {f"{name}.{p}" for name, _ in self.fp8.slots for p in ("weight", "bias")}

    def describe(self) -> str:
        parts = [", ".join(f"{e.name} @ {e.strength:g}" for e in self.entries)] if self.entries else []
        if self.fp8 is not None:
            parts.append(self.fp8.describe())
        return "; ".join(parts) or "(nothing)"


def stack_token(pairs: Iterable[tuple[LoRAFile, float]]) -> tuple:
    """Identity of a stack: which parsed files at which strengths."""
    # LoRAFile objects come from the pack's file cache; the record keeps them alive, so ids are stable.
    return tuple((id(lora), float(s)) for lora, s in pairs)


@dataclass(eq=False)
class Record:
    """What is merged into one shared module now (lives on the BaseModel)."""

    state: MergeState
    token: tuple = ()  # MergePlan.token of the plan merged
    owner: uuid.UUID | None = None  # patches_uuid of the patcher whose weights these are
    clean: bool = True  # the owner had no ComfyUI weight patches / wrappers / hooks / fp8 step
    compute_device: torch.device | None = None
    tile_bytes: int = 64 << 20
    names: str = ""
    fp8: FP8Step | None = None  # whose slots are filled now


def record_of(model) -> Record | None:
    """The Record on a shared BaseModel, or None when nothing of this pack is merged into it."""
    return model.__dict__.get(RECORD_ATTR)
