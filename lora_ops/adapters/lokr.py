"""LoKr (LyCORIS lokr_*): ΔW = scale · kron(w1, w2), each factor full, low-rank or Tucker."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import FIX_BROKEN, LoRAFormatError
from .base import FLOAT_DTYPES, Adapter, as_matrix, tucker_rows


def _lokr_side(factors: dict[str, torch.Tensor], side: str) -> tuple[torch.Tensor, int | None]:
    """One Kronecker factor (fp32) from its full, low-rank or Tucker (w2 only) form, and its rank."""
    f = {k: v.float() for k, v in factors.items() if k.startswith(side) or (side == "w2" and k == "t2")}
    if side in f:
        return f[side], None
    a, b = f[f"{side}_a"], as_matrix(f[f"{side}_b"])
    if side == "w2" and "t2" in f:
        return tucker_rows(a, f["t2"], b, 0, a.shape[1]), b.shape[0]
    return as_matrix(a) @ b, b.shape[0]


class LoKr(Adapter):
    """ΔW = scale · kron(w1, w2), each factor full or low-rank (LyCORIS lokr_*)."""

    kind = "lokr"
    file_factors: ClassVar[dict[str, str]] = {
        f"lokr_{n}": n for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")
    }

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, low_rank: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.w1, self.w2 = as_matrix(w1), as_matrix(w2)
        self.low_rank = low_rank

    @classmethod
    def from_file(cls, path, module, factors, names, alpha) -> LoKr:
        """w1 | w1_a,w1_b; w2 | w2_a,w2_b | w2_a,t2,w2_b. scale = alpha/rank only when a factor is
        low-rank, else 1 (LyCORIS convention)."""
        has_w1 = "w1" in factors or {"w1_a", "w1_b"} <= set(factors)
        has_w2 = "w2" in factors or {"w2_a", "w2_b"} <= set(factors)
        if not (has_w1 and has_w2):
            raise LoRAFormatError(f"{path}: LoKr module {module!r} lacks its w1 or w2 factor. {FIX_BROKEN}")
        for name, t in factors.items():
            if t.dtype not in FLOAT_DTYPES:
                raise LoRAFormatError(f"{path}: LoKr factor {names[name]!r} has dtype {t.dtype}, not floating point")
        try:
            (w1, rank1), (w2, rank2) = _lokr_side(factors, "w1"), _lokr_side(factors, "w2")
        except (RuntimeError, IndexError) as e:
            shapes = ", ".join(f"{names[n]} {tuple(t.shape)}" for n, t in factors.items())
            raise LoRAFormatError(f"{path}: LoKr factors do not fit together ({shapes}): {e}. {FIX_BROKEN}") from None
        rank = rank2 if rank2 is not None else rank1
        scale = (alpha / rank) if (rank is not None and alpha is not None) else 1.0
        return cls(w1, w2, low_rank=rank, scale=scale, source_keys=tuple(names[k] for k in factors))

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    @property
    def rank(self) -> int | None:
        return self.low_rank

    def factors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2}

    def _with_factors(self, f) -> LoKr:
        return LoKr(
            f["w1"], f["w2"], self.low_rank, source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset
        )

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        b = self.w2.shape[0]
        row = start
        while row < stop:
            block, inner = divmod(row, b)
            end = min(stop, (block + 1) * b)
            piece = torch.kron(self.w1[block : block + 1], self.w2[inner : inner + end - row])
            out[row - start : end - start].add_(piece, alpha=coeff * self.scale)
            row = end
