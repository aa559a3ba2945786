"""Per-tensor scales and rounding to float8_e4m3fn (what every fp8 path here shares).

Scales are powers of two by default so that dequantising in any compute dtype is exact; rounding is
nearest-even, or stochastic from a counter hash so a tile size or device never changes the result.
"""

from __future__ import annotations

import math
import zlib

import torch

from ..errors import LoRAOpsError
from ..flux import strip_model_prefix

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = 448.0
#: per fp8 dtype: (largest finite value, mantissa bits, exponent of the smallest normal)
_FP8_GRID = {E4M3: (FP8_MAX, 3, -6), E5M2: (57344.0, 2, -14)}
ROUNDINGS = ("nearest", "stochastic")
SCALE_MODES = ("pow2", "exact")


class FP8FormatError(LoRAOpsError):
    """An fp8 checkpoint (or fp8 tensor) is unusable: missing, zero or non-finite scales, wrong dtypes."""


def fp8_max(dtype: torch.dtype = E4M3) -> float:
    """The largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    if dtype not in _FP8_GRID:
        raise FP8FormatError(f"{dtype} is not an fp8 dtype this pack writes; use float8_e4m3fn or float8_e5m2")
    return _FP8_GRID[dtype][0]


def fresh_scale(amax: float, mode: str = "pow2", dtype: torch.dtype = E4M3) -> float:
    """The per-tensor scale for a tensor whose largest magnitude is `amax` (values/scale stay within ±max of
    `dtype`: 448 for e4m3fn)."""
    top = fp8_max(dtype)
    if mode not in SCALE_MODES:
        raise LoRAOpsError(f"scale mode {mode!r}: use one of {SCALE_MODES}")
    amax = float(amax)
    if not math.isfinite(amax):
        raise FP8FormatError(f"cannot quantise a tensor whose largest value is {amax}")
    if amax == 0.0:
        return 1.0
    if mode == "exact":
        return amax / top
    scale = 2.0 ** math.ceil(math.log2(amax / top))
    while amax / scale > top:  # guard against log2 rounding
        scale *= 2.0
    return scale


def key_seed(key: str, seed: int = 0) -> int:
    """A 32-bit seed from a weight's name (prefix ignored) and the user's seed."""
    name = strip_model_prefix(key)[1]
    return (zlib.crc32(name.encode()) ^ _mul32_int(int(seed) & 0xFFFFFFFF, 0x9E3779B9)) & 0xFFFFFFFF


def _mul32_int(x: int, c: int) -> int:
    return (x * c) & 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & 0xFFFFFFFF


def uniform_noise(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) fp32 values for flat element indices offset..offset+numel (murmur3 finaliser).

    A pure function of (seed, index): the same element gets the same number whatever the tiling or device.
    """
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = (_mul32(idx & 0xFFFFFFFF, 0x9E3779B1) ^ (idx >> 32) ^ (seed & 0xFFFFFFFF)) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32).mul_(2.0**-24)


def stochastic_fp8(values: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Round fp32 `values` (already divided by the scale) to `dtype`: up with probability = the fraction.

    `noise` is uniform [0, 1), same shape. Values beyond the dtype's max saturate. E[result] = values inside
    the range.
    """
    fp8_max(dtype)  # a clear error for other dtypes
    top, mantissa, min_exp = _FP8_GRID[dtype]
    a = values.abs().clamp_(max=top)
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(a), (exp - 1).clamp_(min=min_exp) - mantissa)
    lo = torch.floor(a / ulp).mul_(ulp)
    up = noise.reshape(a.shape) < (a - lo).div_(ulp)
    r = lo.add_(ulp * up).clamp_(max=top)
    return torch.copysign(r, values).to(dtype)


def round_fp8(
    scaled: torch.Tensor, rounding: str = "nearest", seed: int = 0, offset: int = 0, dtype: torch.dtype = E4M3
) -> torch.Tensor:
    """fp32 values (already divided by the scale) → `dtype` (e4m3fn or e5m2), saturating at its max."""
    top = fp8_max(dtype)
    if rounding == "nearest":
        return scaled.clamp(-top, top).to(dtype)
    if rounding == "stochastic":
        return stochastic_fp8(scaled, uniform_noise(seed, offset, scaled.numel(), scaled.device), dtype)
    raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")


def dequantize(q: torch.Tensor, scale: torch.Tensor | float | None = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """`q.float() * scale` (per tensor, or per row for an (out, 1)/(out,) scale), in `dtype`."""
    out = q.to(torch.float32)
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
        if s.numel() > 1 and q.dim() >= 1:
            s = s.reshape(-1, *([1] * (q.dim() - 1)))
        out = out * s
    return out.to(dtype)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")


def check_scale(value: torch.Tensor, key: str, rows: int | None = None, path: object = None) -> torch.Tensor:
    """A scale tensor as fp32; raise FP8FormatError unless every entry is finite and > 0."""
    where = f"{path}: " if path is not None else ""
    s = value.detach().to(torch.float32)
    if s.numel() != 1 and (rows is None or s.numel() != rows):
        raise FP8FormatError(f"{where}scale {key!r} has shape {tuple(value.shape)}; expected one value per tensor")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        bad = s.reshape(-1)[~(torch.isfinite(s.reshape(-1)) & (s.reshape(-1) > 0))][0].item()
        raise FP8FormatError(
            f"{where}scale {key!r} is {bad}: scales must be positive and finite (a zero scale turns the layer "
            "into zeros). The file is broken; re-export it from the bf16 model."
        )
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1)
