"""One small class per adapter kind. Each adds its weight change to a tile of rows, in fp32.

An adapter covers `rows` x `cols` of its target weight, starting at `row_offset` (fused weights such
as `qkv` and `linear1` take several adapters at different offsets). `add_delta(out, start, stop,
coeff, base)` adds `coeff` times rows [start, stop) of its change into `out`; it never builds the
whole-layer change. `scale` holds alpha/rank (or 1); `coeff` is the user's strength.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .errors import FIX_BROKEN, LoRAFormatError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Rows per matmul when computing a change (see Adapter.add_delta).
ROW_BLOCK = 256


def check_factor(path: object, key: str, t: torch.Tensor) -> None:
    """A factor must be floating point and finite; the error names the file and the key."""
    if t.dtype not in _FLOAT_DTYPES:
        raise LoRAFormatError(
            f"{path}: {key!r} has dtype {t.dtype}; LoRA factors must be fp16, bf16 or fp32. {FIX_BROKEN}"
        )
    if not bool(torch.isfinite(t).all()):
        raise LoRAFormatError(
            f"{path}: {key!r} contains NaN or Inf; the LoRA is broken (often a diverged training run) and cannot be "
            "merged. Use another checkpoint of the training run."
        )


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Linear factors may carry trailing 1x1 conv dims; Flux has no convolutions."""
    while t.dim() > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    return t


class Adapter(ABC):
    """Base: factors on the CPU as read from the file; `on(device)` gives an fp32 copy for compute."""

    kind: ClassVar[str]
    needs_base: ClassVar[bool] = False

    def __init__(self, source_keys: tuple[str, ...], scale: float, row_offset: int = 0) -> None:
        self.source_keys = source_keys
        self.scale = float(scale)
        self.row_offset = row_offset

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the change this adapter makes."""

    @abstractmethod
    def factors(self) -> dict[str, torch.Tensor]:
        """Named tensors this adapter holds (for validation, sizes and device moves)."""

    @abstractmethod
    def _with_factors(self, factors: dict[str, torch.Tensor]) -> Adapter:
        """Same adapter over other tensors (used to move/convert)."""

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        """Rows [b0, b1) of the unscaled change, fp32 (kinds that compute by matmul override this)."""
        raise NotImplementedError

    def add_delta(
        self, out: torch.Tensor, start: int, stop: int, coeff: float, base: torch.Tensor | None = None
    ) -> None:
        """out += coeff * scale * change[start:stop]; `base` is the fp32 original rows (base-dependent kinds).

        Rows are computed in fixed blocks of `ROW_BLOCK` (relative to this adapter), whatever the
        tile: a matmul's rounding can depend on how many rows it is given, and the exact undo
        needs the very same fp32 change every time. The last block is kept, so tiles smaller than
        a block (or ending inside one) do not compute it again.
        """
        block = ROW_BLOCK
        b = (start // block) * block
        while b < stop:
            b1 = min(b + block, self.shape[0])
            cached = self.__dict__.get("_last_block")
            if cached is not None and cached[0] == b:
                piece = cached[1]
            else:
                piece = self.rows(b, b1)
                self._last_block = (b, piece)
            lo, hi = max(start, b), min(stop, b1)
            out[lo - start : hi - start].add_(piece[lo - b : hi - b], alpha=coeff * self.scale)
            b = b1

    @property
    def rank(self) -> int | None:
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.factors().values())

    def on(self, device: torch.device | str) -> Adapter:
        return self._with_factors({k: v.to(device=device, dtype=torch.float32) for k, v in self.factors().items()})

    def validate(self, path: object = None) -> None:
        """Refuse factors that cannot be a weight change: non-float dtypes, NaN or Inf, empty."""
        for name, t in self.factors().items():
            key = f"{self.source_keys[0]} ({self.kind} factor {name})"
            check_factor(path, key, t)
            if t.numel() == 0:
                raise LoRAFormatError(f"{path}: {key!r} is empty (rank 0)")
        if not math.isfinite(self.scale):
            raise LoRAFormatError(f"{path}: {self.source_keys[0]}: alpha/scale is {self.scale}, not a finite number")


class LoRA(Adapter):
    """ΔW = scale · up @ down (kohya lora_up/lora_down, PEFT lora_B/lora_A)."""

    kind = "lora"

    def __init__(self, up: torch.Tensor, down: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.up, self.down = _as_matrix(up), _as_matrix(down)

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


def _tucker(a: torch.Tensor, t: torch.Tensor | None, b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a @ b, or of the Tucker form Σ_ij a[i,p] t[i,j] b[j,q] (LyCORIS t1/t2)."""
    if t is None:
        return a[start:stop] @ b
    return (a[:, start:stop].t() @ _as_matrix(t)) @ b


class LoHa(Adapter):
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b) (LyCORIS hada_*)."""

    kind = "loha"

    def __init__(self, w1a, w1b, w2a, w2b, t1=None, t2=None, **kw) -> None:
        super().__init__(**kw)
        self.w1a, self.w1b, self.w2a, self.w2b = (_as_matrix(x) for x in (w1a, w1b, w2a, w2b))
        self.t1, self.t2 = t1, t2

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
            f["w1a"], f["w1b"], f["w2a"], f["w2b"], f.get("t1"), f.get("t2"),
            source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset,
        )

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        return _tucker(self.w1a, self.t1, self.w1b, b0, b1).mul_(_tucker(self.w2a, self.t2, self.w2b, b0, b1))


class LoKr(Adapter):
    """ΔW = scale · kron(w1, w2), each factor full or low-rank (LyCORIS lokr_*)."""

    kind = "lokr"

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, low_rank: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.w1, self.w2 = _as_matrix(w1), _as_matrix(w2)
        self.low_rank = low_rank

    @classmethod
    def from_factors(cls, f: dict[str, torch.Tensor], alpha: float | None, **kw) -> LoKr:
        """Build from the file's factors (w1 | w1_a,w1_b; w2 | w2_a,w2_b | w2_a,t2,w2_b).

        scale = alpha/rank only when a factor is low-rank, else 1 (LyCORIS convention).
        """
        f = {k: v.float() for k, v in f.items()}
        rank = None
        if "w1" in f:
            w1 = f["w1"]
        else:
            w1, rank = _as_matrix(f["w1_a"]) @ _as_matrix(f["w1_b"]), f["w1_b"].shape[0]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2, rank = _tucker(f["w2_a"], f["t2"], _as_matrix(f["w2_b"]), 0, f["w2_a"].shape[1]), f["w2_b"].shape[0]
        else:
            w2, rank = _as_matrix(f["w2_a"]) @ _as_matrix(f["w2_b"]), f["w2_b"].shape[0]
        scale = (alpha / rank) if (rank is not None and alpha is not None) else 1.0
        return cls(w1, w2, low_rank=rank, scale=scale, **kw)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    @property
    def rank(self) -> int | None:
        return self.low_rank

    def factors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2}

    def _with_factors(self, f) -> LoKr:
        return LoKr(f["w1"], f["w2"], self.low_rank, source_keys=self.source_keys, scale=self.scale,
                    row_offset=self.row_offset)

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        b = self.w2.shape[0]
        row = start
        while row < stop:
            block, inner = divmod(row, b)
            end = min(stop, (block + 1) * b)
            piece = torch.kron(self.w1[block : block + 1], self.w2[inner : inner + end - row])
            out[row - start : end - start].add_(piece, alpha=coeff * self.scale)
            row = end


class Diff(Adapter):
    """ΔW given in full (`.diff`, `.diff_b`, control-LoRA `lora_B.bias`)."""

    kind = "diff"

    def __init__(self, diff: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.diff = diff if diff.dim() == 2 else diff.reshape(-1, 1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"diff": self.diff}

    def _with_factors(self, f) -> Diff:
        return Diff(f["diff"], source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset)

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        out.add_(self.diff[start:stop], alpha=coeff * self.scale)


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


class DoRA(Adapter):
    """Weight-decomposed LoRA: W' = W + s·((W + ΔW)·m/‖W + ΔW‖ − W).

    `magnitude` of shape (1, in) normalises per input column (ComfyUI / LyCORIS wd_on_out=False);
    shape (out, 1) normalises per output row (PEFT). ‖·‖ is taken over the base weights plus this
    adapter's own change, not the other LoRAs of a stack. Per-column norms need the whole weight,
    so the engine first calls `accumulate_norms` over every tile, then `add_delta`.
    """

    kind = "dora"
    needs_base = True

    def __init__(self, inner: Adapter, magnitude: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.inner = inner
        self.magnitude = magnitude.reshape(1, -1) if magnitude.shape[0] == 1 else magnitude.reshape(-1, 1)
        self.per_column = self.magnitude.shape[0] == 1 and self.inner.shape[0] != 1
        self._sumsq: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    def factors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.factors(), "magnitude": self.magnitude}

    def _with_factors(self, f) -> DoRA:
        inner = self.inner._with_factors({k: v for k, v in f.items() if k != "magnitude"})
        return DoRA(inner, f["magnitude"], source_keys=self.source_keys, scale=self.scale, row_offset=self.row_offset)

    def _combined(self, start: int, stop: int, base: torch.Tensor) -> torch.Tensor:
        combined = base.clone()
        self.inner.add_delta(combined, start, stop, 1.0)
        return combined

    def accumulate_norms(self, start: int, stop: int, base: torch.Tensor) -> None:
        if not self.per_column:
            return
        # float64 so the sum does not depend on how the rows were tiled
        sq = self._combined(start, stop, base).double().square_().sum(dim=0, keepdim=True)
        self._sumsq = sq if self._sumsq is None else self._sumsq.add_(sq)

    def add_delta(self, out, start, stop, coeff, base=None) -> None:
        combined = self._combined(start, stop, base)
        eps = torch.finfo(torch.float32).eps
        if self.per_column:
            norm = self._sumsq.sqrt().float() + eps
            factor = self.magnitude / norm
        else:
            norm = combined.norm(dim=1, keepdim=True) + eps
            factor = self.magnitude[start:stop] / norm
        combined.mul_(factor).sub_(base)
        out.add_(combined, alpha=coeff)
