"""The fp8 tile loop: fp32 rows of base + Σ coeff·ΔW for one weight, and quantising them once.

Merge-then-quantise without a full fp32 copy: pass 1 computes each merged tile for the amax (the fresh
scale), pass 2 recomputes each tile and rounds it once. Extra memory is a few fp32 tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LoRAFormatError, ModelMismatchError
from ..rows import DEFAULT_TILE_BYTES, FP8_BUFFERS, Term, accumulate_dora_norms, add_terms, tile_rows_for, tiles
from .quantize import E4M3, FP8FormatError, check_rounding, fresh_scale, key_seed, round_fp8

__all__ = ["DEFAULT_TILE_BYTES", "Term", "merge_rows_to", "quantize", "quantize_merged"]


class _Rows:
    """fp32 rows of base + Σ coeff·ΔW for one weight, computed tile by tile (no full fp32 copy)."""

    def __init__(self, weight: torch.Tensor, terms: Sequence[Term], key: str, device, in_scale,
                 tile_bytes: int | None):
        self.key = key
        self.matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        self.device = torch.device(device) if device is not None else weight.device
        self.in_scale = None if in_scale is None else torch.as_tensor(in_scale, dtype=torch.float32).to(self.device)
        self.terms = [(a.on(self.device), float(c)) for a, c in terms if c != 0.0]
        rows, cols = self.matrix.shape
        for a, _ in self.terms:
            if a.shape[1] != cols or a.row_offset + a.shape[0] > rows:
                raise ModelMismatchError(
                    f"{a.source_keys[0]!r} makes a {a.shape[0]}x{a.shape[1]} change at row {a.row_offset} of "
                    f"{key!r}, which has shape {tuple(weight.shape)}"
                )
        self.tile_rows = tile_rows_for(cols, tile_bytes or DEFAULT_TILE_BYTES, len(self.terms), FP8_BUFFERS)
        accumulate_dora_norms(self.terms, rows, self.tile_rows, self.base)

    def tiles(self):
        return tiles(self.matrix.shape[0], self.tile_rows)

    def base(self, r0: int, r1: int) -> torch.Tensor:
        rows = self.matrix[r0:r1].to(self.device).to(torch.float32)
        if self.in_scale is not None:
            s = self.in_scale
            rows = rows * (s if s.numel() == 1 else s.reshape(-1, 1)[r0:r1])
        return rows

    def merged(self, r0: int, r1: int) -> torch.Tensor:
        base = self.base(r0, r1)
        out = base.clone() if self.terms else base
        add_terms(out, self.terms, r0, r1, base)
        return out


def _check_finite_tile(tile: torch.Tensor, key: str, r0: int, has_terms: bool) -> float:
    amax = float(tile.abs().amax()) if tile.numel() else 0.0
    if not math.isfinite(amax):
        if has_terms:
            raise LoRAFormatError(
                f"merging into {key!r} gives NaN or Inf (rows from {r0}): a LoRA factor or strength is too large or "
                "not finite. Nothing was written."
            )
        raise FP8FormatError(f"{key!r} contains NaN or Inf (rows from {r0}); the checkpoint is broken")
    return amax


def quantize_merged(
    weight: torch.Tensor,
    terms: Sequence[Term] = (),
    *,
    key: str = "",
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    weight_scale: torch.Tensor | float | None = None,
    scale: float | None = None,
    tile_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [· weight_scale] + Σ coeff·ΔW) → (float8_e4m3fn tensor, 0-dim fp32 scale), tile by tile.

    `weight` may be bf16/fp16/fp32 or fp8 (then `weight_scale` dequantises it). Pass 1 finds the merged
    tensor's amax, giving a fresh scale (unless `scale` is given: then values beyond 448·scale clip); pass 2
    recomputes each tile and rounds it once. The result lives on `device` (default: the weight's device).
    Stochastic rounding is seeded by `key` and `seed` (see `key_seed`).
    """
    check_rounding(rounding)
    for a, _ in terms:
        a.validate(key or None)
    rows = _Rows(weight if weight.dim() else weight.reshape(1), terms, key, device, weight_scale, tile_bytes)
    n, cols = rows.matrix.shape
    cached = None
    checked = scale is None  # pass 1 checks finiteness; with a given scale pass 2 does
    if scale is None:
        amax = 0.0
        for r0, r1 in rows.tiles():
            tile = rows.merged(r0, r1)
            amax = max(amax, _check_finite_tile(tile, key, r0, bool(rows.terms)))
            if r1 - r0 == n:
                cached = tile  # one tile: no second computation
        scale = fresh_scale(amax, scale_mode)
    elif not (math.isfinite(scale) and scale > 0):
        raise FP8FormatError(f"{key!r}: scale {scale} must be a positive finite number")
    out = torch.empty(rows.matrix.shape, dtype=E4M3, device=rows.device)
    s = torch.tensor(scale, dtype=torch.float32)
    inv_exact = math.log2(scale).is_integer()  # multiplying by 1/scale is exact only for powers of two
    seed32 = key_seed(key, seed)
    for r0, r1 in rows.tiles():
        tile = cached if cached is not None else rows.merged(r0, r1)
        if not checked:
            _check_finite_tile(tile, key, r0, bool(rows.terms))
        scaled = tile * (1.0 / scale) if inv_exact else tile / scale
        out[r0:r1] = round_fp8(scaled, rounding, seed32, r0 * cols)
    return out.reshape(weight.shape), s


def merge_rows_to(weight: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype, *, key: str = "",
                  weight_scale=None, tile_bytes: int | None = None, device=None) -> torch.Tensor:
    """base + Σ coeff·ΔW in `dtype` (round to nearest), tile by tile; for tensors a policy keeps 16-bit."""
    for a, _ in terms:
        a.validate(key or None)
    if weight.dim() == 0:
        weight = weight.reshape(1)
    rows = _Rows(weight, terms, key, device, weight_scale, tile_bytes)
    out = torch.empty(rows.matrix.shape, dtype=dtype, device=rows.device)
    for r0, r1 in rows.tiles():
        tile = rows.merged(r0, r1)
        if rows.terms:
            _check_finite_tile(tile, key, r0, True)
        out[r0:r1] = tile.to(dtype)
    return out.reshape(weight.shape)

def quantize(
    weight: torch.Tensor, scale: float | None = None, *, rounding: str = "nearest", key: str = "", seed: int = 0,
    scale_mode: str = "pow2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole tensor → (float8_e4m3fn tensor, 0-dim fp32 scale). Fresh scale unless `scale` is given."""
    q, s = quantize_merged(weight, (), key=key, rounding=rounding, seed=seed, scale_mode=scale_mode, scale=scale)
    return q, s
