"""The canonical form of a LoRA file, its coverage report, and the facts and checks built on it.

`LoRAFile.targets` maps a BFL weight key (`double_blocks.0.img_attn.qkv.weight`, no prefix) to a
list of adapters, each with its row offset inside that weight. The coverage report says, for every
key of the file, which weight it went to or why it did not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import Adapter
from ..errors import ModelMismatchError
from ..flux import FAMILY_NAMES, family_of_lookup, lora_fits_family
from ..units import MIB


@dataclass
class Coverage:
    """Where every key of a LoRA file went."""

    mapped: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    text_encoder_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.mapped) + len(self.unmapped) + len(self.text_encoder_keys)

    def summary(self) -> str:
        lines = [
            f"{len(self.mapped)} of {self.total} keys map to Flux weights; "
            f"{len(self.text_encoder_keys)} text-encoder keys (not part of the diffusion model); "
            f"{len(self.unmapped)} unmapped."
        ]
        for key, reason in list(self.unmapped.items())[:10]:
            lines.append(f"  unmapped {key}: {reason}")
        if len(self.unmapped) > 10:
            lines.append(f"  ... and {len(self.unmapped) - 10} more unmapped keys")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class LoRAFile:
    """The canonical form of one LoRA file."""

    path: Path
    format: str
    targets: dict[str, list[Adapter]]
    coverage: Coverage
    metadata: dict[str, str] = field(default_factory=dict)
    #: strength multiplier per target weight (per-block strengths, see lora_ops.blocks); absent = 1
    target_scales: dict[str, float] = field(default_factory=dict)
    block_spec: str = ""
    #: the family the LoRA was made for (lora_ops.flux.FLUX1 / FLUX2) when its names or shapes tell, and why
    family: str | None = None
    family_evidence: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for adapters in self.targets.values() for a in adapters)

    @property
    def ranks(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for adapters in self.targets.values():
            for a in adapters:
                if a.rank is not None:
                    counts[a.rank] = counts.get(a.rank, 0) + 1
        return counts

    def only(self, targets: set[str]) -> LoRAFile:
        """The same LoRA restricted to some target weights (for merging one tensor at a time)."""
        kept = {k: v for k, v in self.targets.items() if k in targets}
        return dataclasses.replace(self, targets=kept)

    def strength_on(self, target: str, strength: float) -> float:
        """The strength this LoRA applies to one target weight (its block multiplier included)."""
        return float(strength) * self.target_scales.get(target, 1.0)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for adapters in self.targets.values():
            for a in adapters:
                counts[a.kind] = counts.get(a.kind, 0) + 1
        return counts


#: GPU bytes per LoRA parameter when applied unmerged the way kohya's flux_minimal_inference does:
#: fp32 factors (4 B) plus the bf16 copy autocast caches for the whole run (2 B).
UNMERGED_BYTES_PER_PARAM = 6


def describe(lora: LoRAFile) -> dict[str, object]:
    """Facts about a LoRA for `inspect` and the planner."""
    params = sum(t.numel() for adapters in lora.targets.values() for a in adapters for t in a.factors().values())
    alphas = sorted({round(a.scale * a.rank, 4) for ads in lora.targets.values() for a in ads if a.rank})
    return {
        "path": str(lora.path),
        "format": lora.format,
        "family": FAMILY_NAMES.get(lora.family or "", "either (its names and shapes fit Flux.1 and Flux.2)"),
        "targets": len(lora.targets),
        "kinds": lora.kinds(),
        "ranks": lora.ranks,
        "alphas": alphas,
        "params": params,
        "file_mib": lora.nbytes / MIB,
        "unmerged_runtime_mib": params * UNMERGED_BYTES_PER_PARAM / MIB,
        "mapped_keys": len(lora.coverage.mapped),
        "unmapped": lora.coverage.unmapped,
        "text_encoder_keys": len(lora.coverage.text_encoder_keys),
        "notes": lora.coverage.notes,
    }


ShapeLookup = Callable[[str], "tuple[int, ...] | None"]


def check_family(lora: LoRAFile, shape_of: ShapeLookup, model_name: str = "the model") -> None:
    """Refuse a LoRA made for another member of the Flux family (a Flux.1 LoRA on Flux.2 and vice versa)."""
    model_family = family_of_lookup(shape_of)
    if lora.family is None or model_family is None or lora_fits_family(lora.family, model_family):
        return
    width = (shape_of("img_in.weight") or (0,))[0]
    raise ModelMismatchError(
        f"{lora.path}: this LoRA was made for {FAMILY_NAMES[lora.family]} ({lora.family_evidence}), but "
        f"{model_name} is {FAMILY_NAMES[model_family]} (width {width}). Use a LoRA trained for "
        f"{FAMILY_NAMES[model_family]}; nothing was changed."
    )


def check_fits(lora: LoRAFile, shape_of: ShapeLookup, model_name: str = "the model") -> None:
    """Raise ModelMismatchError unless the LoRA is for the model's family and every adapter fits a weight."""
    check_family(lora, shape_of, model_name)
    for target, adapters in lora.targets.items():
        shape = shape_of(target)
        if shape is None:
            raise ModelMismatchError(
                f"{lora.path}: the LoRA changes {target!r} (from {adapters[0].source_keys[0]!r}), which "
                f"{model_name} does not have: the LoRA is for another Flux variant or model. Use a LoRA made "
                "for this model."
            )
        rows = shape[0]
        cols = shape[1] if len(shape) > 1 else 1
        for a in adapters:
            a_rows, a_cols = a.shape
            if a_cols != cols or a.row_offset + a_rows > rows:
                hint = " Use a LoRA made for this model."
                if target == "img_in.weight" and a_cols > cols:
                    hint = (
                        f" This is a Flux control LoRA (Canny/Depth) whose img_in takes {a_cols} input channels; "
                        f"the base model's img_in takes {cols}. Use it with a Flux Canny/Depth base model."
                    )
                raise ModelMismatchError(
                    f"{lora.path}: {a.source_keys[0]!r} makes a {a_rows}x{a_cols} change at row {a.row_offset} of "
                    f"{target!r}, but {model_name} has shape {tuple(shape)}; the LoRA was made for a model of "
                    f"another size.{hint}"
                )
