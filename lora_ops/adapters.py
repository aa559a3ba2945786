"""One small class per adapter kind. Each adds its weight change to a tile of rows, in fp32.

An adapter covers `rows` x `cols` of its target weight, starting at `row_offset` (fused weights such
as `qkv` and `linear1` take several adapters at different offsets). `add_delta(out, start, stop,
coeff, base)` adds `coeff` times rows [start, stop) of its change into `out`; it never builds the
whole-layer change. `scale` holds alpha/rank (or 1); `coeff` is the user's strength.

Each kind that a file stores directly names its factor keys (`file_factors`) and builds itself
from them (`from_file`, which checks they fit together); `FILE_KINDS` lists those kinds, so a new
kind is one class here plus one entry there.
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


def _file_matrix(path: object, key: str, t: torch.Tensor) -> torch.Tensor:
    """A factor read from a file as a matrix; a real convolution factor is refused with advice."""
    m = _as_matrix(t)
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
        self.up, self.down = _as_matrix(up), _as_matrix(down)

    @classmethod
    def from_file(cls, path, module, factors, names, alpha) -> LoRA:
        keys = tuple(names[k] for k in factors)
        if set(factors) != {"up", "down"}:
            missing = {"up", "down"} - set(factors)
            raise LoRAFormatError(
                f"{path}: {keys[0]!r} has no matching {' / '.join(sorted(missing))} factor in the file "
                f"(module {module!r}). {FIX_BROKEN}"
            )
        up, down = _file_matrix(path, names["up"], factors["up"]), _file_matrix(path, names["down"], factors["down"])
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


def _tucker(a: torch.Tensor, t: torch.Tensor | None, b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a @ b, or of the Tucker form Σ_ij a[i,p] t[i,j] b[j,q] (LyCORIS t1/t2)."""
    if t is None:
        return a[start:stop] @ b
    return (a[:, start:stop].t() @ _as_matrix(t)) @ b


class LoHa(Adapter):
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b) (LyCORIS hada_*)."""

    kind = "loha"
    file_factors: ClassVar[dict[str, str]] = {f"hada_{n}": n for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}

    def __init__(self, w1a, w1b, w2a, w2b, t1=None, t2=None, **kw) -> None:
        super().__init__(**kw)
        self.w1a, self.w1b, self.w2a, self.w2b = (_as_matrix(x) for x in (w1a, w1b, w2a, w2b))
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
            w1a, w1b, w2a, w2b = (_file_matrix(path, names[n], factors[n]) for n in plain)
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
        return _tucker(self.w1a, self.t1, self.w1b, b0, b1).mul_(_tucker(self.w2a, self.t2, self.w2b, b0, b1))


def _lokr_side(factors: dict[str, torch.Tensor], side: str) -> tuple[torch.Tensor, int | None]:
    """One Kronecker factor (fp32) from its full, low-rank or Tucker (w2 only) form, and its rank."""
    f = {k: v.float() for k, v in factors.items() if k.startswith(side) or (side == "w2" and k == "t2")}
    if side in f:
        return f[side], None
    a, b = f[f"{side}_a"], _as_matrix(f[f"{side}_b"])
    if side == "w2" and "t2" in f:
        return _tucker(a, f["t2"], b, 0, a.shape[1]), b.shape[0]
    return _as_matrix(a) @ b, b.shape[0]


class LoKr(Adapter):
    """ΔW = scale · kron(w1, w2), each factor full or low-rank (LyCORIS lokr_*)."""

    kind = "lokr"
    file_factors: ClassVar[dict[str, str]] = {
        f"lokr_{n}": n for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")
    }

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, low_rank: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.w1, self.w2 = _as_matrix(w1), _as_matrix(w2)
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
            if t.dtype not in _FLOAT_DTYPES:
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

    @property
    def norms(self) -> torch.Tensor | None:
        """Σ (W + ΔW)² per column (float64) once accumulated; the merge state keeps it for undo."""
        return self._sumsq

    def use_norms(self, sumsq: torch.Tensor | None) -> None:
        """Take column norms accumulated earlier (undo must normalise exactly as the merge did)."""
        self._sumsq = sumsq

    def reset_norms(self) -> None:
        self._sumsq = None

    def accumulate_norms(self, start: int, stop: int, base: torch.Tensor) -> None:
        """Add rows [start, stop) of W + ΔW (W = `base`, fp32) to the per-column norms."""
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


#: The kinds a LoRA file stores directly, each built by its `from_file` (DoRA wraps one of them;
#: SetWeight comes from control-LoRA norm scales).
FILE_KINDS: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, Diff, BiasDiff)
