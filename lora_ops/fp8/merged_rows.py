"""The fp8 tile loop: fp32 rows of base + Σ coeff·ΔW for one weight, and quantising them once.

Merge-then-quantise without a full fp32 copy: pass 1 computes each merged tile for the amax (the fresh
scale), pass 2 recomputes each tile and rounds it once. Extra memory is a few fp32 tiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ..adapters import Adapter, DoRA
from ..errors import LoRAFormatError, ModelMismatchError
from .quantize import E4M3, FP8FormatError, check_rounding, fresh_scale, key_seed, round_fp8

DEFAULT_TILE_BYTES = 64 * 1024 * 1024
#: fp32-sized buffers alive per tile element (base, merged, scaled, stochastic-rounding temporaries).
_TILE_BUFFERS = 12

Term = tuple[Adapter, float]


def _tile_rows(cols: int, tile_bytes: int | None) -> int:
    return max(1, (tile_bytes or DEFAULT_TILE_BYTES) // (_TILE_BUFFERS * 4 * max(cols, 1)))


class _Rows:
    """fp32 rows of base + Σ coeff·ΔW for one weight, computed tile by tile (no full fp32 copy)."""

    def __init__(self, weight: torch.Tensor, terms: Sequence[Term], key: str, device, in_scale, tile_rows: int):
        self.key = key
        self.matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        self.device = torch.device(device) if device is not None else weight.device
        self.in_scale = None if in_scale is None else torch.as_tensor(in_scale, dtype=torch.float32).to(self.device)
        self.terms = [(a.on(self.device), float(c)) for a, c in terms if c != 0.0]
        cols = self.matrix.shape[1]
        for a, _ in self.terms:
            if a.shape[1] != cols or a.row_offset + a.shape[0] > self.matrix.shape[0]:
                raise ModelMismatchError(
                    f"{a.source_keys[0]!r} makes a {a.shape[0]}x{a.shape[1]} change at row {a.row_offset} of "
                    f"{key!r}, which has shape {tuple(weight.shape)}"
                )
        doras = [a for a, _ in self.terms if isinstance(a, DoRA) and a.per_column]
        if doras:
            for r0, r1 in _tiles(self.matrix.shape[0], tile_rows):
                base = self.base(r0, r1)
                for d in doras:
                    a0, a1 = max(r0, d.row_offset), min(r1, d.row_offset + d.shape[0])
                    if a0 < a1:
                        d.accumulate_norms(a0 - d.row_offset, a1 - d.row_offset, base[a0 - r0 : a1 - r0])

    def base(self, r0: int, r1: int) -> torch.Tensor:
        rows = self.matrix[r0:r1].to(self.device).to(torch.float32)
        if self.in_scale is not None:
            s = self.in_scale
            rows = rows * (s if s.numel() == 1 else s.reshape(-1, 1)[r0:r1])
        return rows

    def merged(self, r0: int, r1: int) -> torch.Tensor:
        base = self.base(r0, r1)
        out = base.clone() if self.terms else base
        for adapter, coeff in self.terms:
            a0, a1 = max(r0, adapter.row_offset), min(r1, adapter.row_offset + adapter.shape[0])
            if a0 < a1:
                adapter.add_delta(out[a0 - r0 : a1 - r0], a0 - adapter.row_offset, a1 - adapter.row_offset, coeff,
                                  base[a0 - r0 : a1 - r0])
        return out


def _tiles(rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, tile_rows):
        yield r0, min(rows, r0 + tile_rows)


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
    cols = weight.reshape(weight.shape[0], -1).shape[1] if weight.dim() else 1
    tile_rows = _tile_rows(cols, tile_bytes)
    rows = _Rows(weight if weight.dim() else weight.reshape(1), terms, key, device, weight_scale, tile_rows)
    n = rows.matrix.shape[0]
    cached = None
    checked = scale is None  # pass 1 checks finiteness; with a given scale pass 2 does
    if scale is None:
        amax = 0.0
        for r0, r1 in _tiles(n, tile_rows):
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
    for r0, r1 in _tiles(n, tile_rows):
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
    cols = weight.reshape(weight.shape[0], -1).shape[1]
    tile_rows = _tile_rows(cols, tile_bytes)
    rows = _Rows(weight, terms, key, device, weight_scale, tile_rows)
    out = torch.empty(rows.matrix.shape, dtype=dtype, device=rows.device)
    for r0, r1 in _tiles(rows.matrix.shape[0], tile_rows):
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
