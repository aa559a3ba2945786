"""DoRA: a LoRA (or other kind) whose result is renormalised to a learned magnitude."""

from __future__ import annotations

import torch

from .base import Adapter


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
