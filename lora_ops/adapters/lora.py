"""LoRA: ΔW = scale · up @ down."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import FIX_BROKEN, LoRAFormatError
from .base import Adapter, as_matrix, file_matrix


class LoRA(Adapter):
    """ΔW = scale · up @ down (kohya lora_up/lora_down, PEFT lora_B/lora_A)."""

    kind = "lora"
    file_factors: ClassVar[dict[str, str]] = {
        "lora_down.weight": "down",
        "lora_up.weight": "up",
        "lora_A.weight": "down",
        "lora_B.weight": "up",
        "lora_A.default.weight": "down",
        "lora_B.default.weight": "up",
        "down.weight": "down",
        "up.weight": "up",
    }

    def __init__(self, up: torch.Tensor, down: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.up, self.down = as_matrix(up), as_matrix(down)

    @classmethod
    def from_file(cls, path, module, factors, names, alpha) -> LoRA:
        keys = tuple(names[k] for k in factors)
        if set(factors) != {"up", "down"}:
            missing = {"up", "down"} - set(factors)
            raise LoRAFormatError(
                f"{path}: {keys[0]!r} has no matching {' / '.join(sorted(missing))} factor in the file "
                f"(module {module!r}). {FIX_BROKEN}"
            )
        up, down = file_matrix(path, names["up"], factors["up"]), file_matrix(path, names["down"], factors["down"])
        if up.shape[1] != down.shape[0]:
            raise LoRAFormatError(
                f"{path}: {names['up']!r} is {tuple(up.shape)} but {names['down']!r} is {tuple(down.shape)}; their "
                f"ranks ({up.shape[1]} vs {down.shape[0]}) disagree. {FIX_BROKEN}"
            )
        rank = down.shape[0]
        if rank == 0:
            raise LoRAFormatError(
                f"{path}: {names['down']!r} and {names['up']!r} have rank 0 (shapes {tuple(down.shape)}, "
                f"{tuple(up.shape)}), so the LoRA changes nothing. {FIX_BROKEN}"
            )
        return cls(up, down, source_keys=keys, scale=(alpha / rank) if alpha is not None else 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factors(self) -> dict[str, torch.Tensor]:
        return {"up": self.up, "down": self.down}

    def _with_factors(self, f: dict[str, torch.Tensor]) -> LoRA:
        return LoRA(f["up"], f["down"], source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset)

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        return self.up[b0:b1] @ self.down
