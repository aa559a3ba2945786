"""What a MODEL wants merged at load (the plan, a patcher attachment) and what a shared module holds now (the record).

`clone()` copies patcher attachments, so every clone of a MODEL carries its plan; the record lives on the shared
BaseModel, so every clone sees what is merged into the weights they share.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from ..lora_ops import BlockWeights, LoRAFile, MergeState, with_block_weights

#: Patcher attachment holding the wanted MergePlan.
ATTACHMENT = "flux_lora_ops"
#: Attribute of the shared BaseModel holding the Record of what is merged now.
RECORD_ATTR = "flux_lora_ops_record"


@dataclass(frozen=True, eq=False)
class StackEntry:
    """One LoRA of a FLUX_LORA_STACK: the parsed file, its strength and its per-block strengths.

    `block_spec` is the text from the node; `block_weights` is that spec read against the model's block counts
    (set when the stack is attached to a MODEL; None = every block at 1).
    """

    name: str
    strength: float
    lora: LoRAFile
    block_spec: str = ""
    block_weights: BlockWeights | None = None

    def weighted(self) -> LoRAFile:
        """The LoRA with its block multipliers (the same adapters, so strength/spec switches stay one pass)."""
        return self.lora if self.block_weights is None else with_block_weights(self.lora, self.block_weights)

    @property
    def token(self) -> tuple:
        # LoRAFile objects come from the pack's file cache; the record keeps them alive, so ids are stable.
        blocks = None if self.block_weights is None or self.block_weights.is_identity else self.block_weights.key
        return (id(self.lora), float(self.strength), blocks)

    def describe(self) -> str:
        spec = f" [blocks {self.block_spec}]" if self.block_spec else ""
        return f"{self.name} @ {self.strength:g}{spec}"


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
        return [(e.weighted(), float(e.strength)) for e in self.entries]

    @property
    def token(self) -> tuple:
        """Identity of what this plan merges: files, strengths, block multipliers, fp8 step."""
        return (tuple(e.token for e in self.entries), id(self.fp8) if self.fp8 is not None else None)

    def fp8_keys(self) -> set[str]:
        """Weights (and biases) the fp8 step produces itself; the in-place merge leaves these alone."""
        if self.fp8 is None:
            return set()
        return {f"{name}.{p}" for name, _ in self.fp8.slots for p in ("weight", "bias")}

    def describe(self) -> str:
        parts = [", ".join(e.describe() for e in self.entries)] if self.entries else []
        if self.fp8 is not None:
            parts.append(self.fp8.describe())
        return "; ".join(parts) or "(nothing)"


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
    source: str | None = None  # the model file the weights were loaded from, where known (see model_file.py)


def record_of(model) -> Record | None:
    """The Record on a shared BaseModel, or None when nothing of this pack is merged into it."""
    return model.__dict__.get(RECORD_ATTR)
