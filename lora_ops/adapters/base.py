"""The adapter interface, the factor checks every kind shares, and the fixed row block."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..errors import FIX_BROKEN, LoRAFormatError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Rows per matmul when computing a change (see Adapter.add_delta).
ROW_BLOCK = 256


def check_factor(path: object, key: str, t: torch.Tensor) -> None:
    """A factor must be floating point and finite; the error names the file and the key."""
    if t.dtype not in FLOAT_DTYPES:
        raise LoRAFormatError(
            f"{path}: {key!r} has dtype {t.dtype}; LoRA factors must be fp16, bf16 or fp32. {FIX_BROKEN}"
        )
    if not bool(torch.isfinite(t).all()):
        raise LoRAFormatError(
            f"{path}: {key!r} contains NaN or Inf; the LoRA is broken (often a diverged training run) and cannot be "
            "merged. Use another checkpoint of the training run."
        )


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Linear factors may carry trailing 1x1 conv dims; Flux has no convolutions."""
    while t.dim() > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    return t


def file_matrix(path: object, key: str, t: torch.Tensor) -> torch.Tensor:
    """A factor read from a file as a matrix; a real convolution factor is refused with advice."""
    m = as_matrix(t)
    if m.dim() != 2:
        raise LoRAFormatError(
            f"{path}: {key!r} has shape {tuple(t.shape)}; a Flux LoRA factor is a matrix (this looks like a "
            "convolution LoRA for another model; Flux has no convolutions). Use a Flux LoRA."
        )
    return m


class Adapter(ABC):
    """Base: factors on the CPU as read from the file; `on(device)` gives an fp32 copy for compute."""

    kind: ClassVar[str]
    needs_base: ClassVar[bool] = False
    #: Key suffix in a LoRA file -> factor name, for kinds a file stores directly (see FILE_KINDS).
    file_factors: ClassVar[dict[str, str]] = {}
    #: Which tensor of its module the change goes to ("weight" or "bias").
    target: ClassVar[str] = "weight"

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

    @classmethod
    def from_file(
        cls, path: object, module: str, factors: dict[str, torch.Tensor], names: dict[str, str], alpha: float | None
    ) -> Adapter:
        """Build from one module's factors as a file stores them (`names`: factor -> key, for errors).

        Raises LoRAFormatError, naming the file and keys, when the factors are missing or do not fit.
        """
        raise NotImplementedError(f"{cls.__name__} is not read from files")

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


def tucker_rows(a: torch.Tensor, t: torch.Tensor | None, b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a @ b, or of the Tucker form Σ_ij a[i,p] t[i,j] b[j,q] (LyCORIS t1/t2)."""
    if t is None:
        return a[start:stop] @ b
    return (a[:, start:stop].t() @ as_matrix(t)) @ b
