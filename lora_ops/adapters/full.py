"""Changes given in full: a weight or bias difference, or a replacement value (control LoRAs)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Adapter


class Diff(Adapter):
    """ΔW given in full (`.diff`, `.diff_b`, control-LoRA `lora_B.bias`)."""

    kind = "diff"
    file_factors: ClassVar[dict[str, str]] = {"diff": "diff"}

    def __init__(self, diff: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.diff = diff if diff.dim() == 2 else diff.reshape(-1, 1)

    @classmethod
    def from_file(cls, path, module, factors, names, alpha) -> Diff:
        return cls(factors["diff"], source_keys=tuple(names[k] for k in factors), scale=1.0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"diff": self.diff}

    def _with_factors(self, f) -> Diff:
        return type(self)(f["diff"], source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset)

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        out.add_(self.diff[start:stop], alpha=coeff * self.scale)


class BiasDiff(Diff):
    """ΔB of a module's bias, given in full (`.diff_b`, control-LoRA `lora_B.bias`)."""

    file_factors: ClassVar[dict[str, str]] = {"diff_b": "diff", "lora_B.bias": "diff"}
    target = "bias"


class SetWeight(Adapter):
    """Replace the weight (control-LoRA norm scales): W + s·(value − W), so strength 1 replaces it."""

    kind = "set"
    needs_base = True

    def __init__(self, value: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.value = value if value.dim() == 2 else value.reshape(-1, 1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.value.shape)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"value": self.value}

    def _with_factors(self, f) -> SetWeight:
        return SetWeight(f["value"], source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset)

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        out.add_(self.value[start:stop] - base, alpha=coeff)
