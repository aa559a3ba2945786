"""LoHa (LyCORIS hada_*): ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b), optionally in Tucker form."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import FIX_BROKEN, LoRAFormatError
from .base import Adapter, as_matrix, file_matrix, tucker_rows


class LoHa(Adapter):
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b) (LyCORIS hada_*)."""

    kind = "loha"
    file_factors: ClassVar[dict[str, str]] = {f"hada_{n}": n for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}

    def __init__(self, w1a, w1b, w2a, w2b, t1=None, t2=None, **kw) -> None:
        super().__init__(**kw)
        self.w1a, self.w1b, self.w2a, self.w2b = (as_matrix(x) for x in (w1a, w1b, w2a, w2b))
        self.t1, self.t2 = t1, t2

    @classmethod
    def from_file(cls, path, module, factors, names, alpha) -> LoHa:
        plain = ("w1_a", "w1_b", "w2_a", "w2_b")
        rank = factors["w1_b"].shape[0] if "w1_b" in factors and factors["w1_b"].dim() else 0
        if not set(plain) <= set(factors) or rank == 0:
            raise LoRAFormatError(
                f"{path}: LoHa module {module!r} lacks hada_w1_a/w1_b/w2_a/w2_b or has rank 0. {FIX_BROKEN}"
            )
        if "t1" not in factors and "t2" not in factors:
            w1a, w1b, w2a, w2b = (file_matrix(path, names[n], factors[n]) for n in plain)
            if (
                w1a.shape[1] != w1b.shape[0]
                or w2a.shape[1] != w2b.shape[0]
                or w1a.shape[0] != w2a.shape[0]
                or (w1b.shape[1] != w2b.shape[1])
            ):
                shapes = ", ".join(f"{names[n]} {tuple(factors[n].shape)}" for n in plain)
                raise LoRAFormatError(f"{path}: LoHa factors do not fit together ({shapes}). {FIX_BROKEN}")
        return cls(
            *(factors[n] for n in plain),
            factors.get("t1"),
            factors.get("t2"),
            source_keys=tuple(names[k] for k in factors),
            scale=(alpha / rank) if alpha is not None else 1.0,
        )

    @property
    def shape(self) -> tuple[int, int]:
        rows = self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0]
        return rows, self.w1b.shape[1]

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def factors(self) -> dict[str, torch.Tensor]:
        f = {"w1a": self.w1a, "w1b": self.w1b, "w2a": self.w2a, "w2b": self.w2b}
        f.update({k: v for k, v in (("t1", self.t1), ("t2", self.t2)) if v is not None})
        return f

    def _with_factors(self, f) -> LoHa:
        return LoHa(
            f["w1a"],
            f["w1b"],
            f["w2a"],
            f["w2b"],
            f.get("t1"),
            f.get("t2"),
            source_keys=self.source_keys,
            scale=self.scale,
            row_offset=self.row_offset,
        )

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        return tucker_rows(self.w1a, self.t1, self.w1b, b0, b1).mul_(tucker_rows(self.w2a, self.t2, self.w2b, b0, b1))
