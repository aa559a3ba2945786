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
FP8_MAX = 448.0
ROUNDINGS = ("nearest", "stochastic")
SCALE_MODES = ("pow2", "exact")


class FP8FormatError(LoRAOpsError):
    """An fp8 checkpoint (or fp8 tensor) is unusable: missing, zero or non-finite scales, wrong dtypes."""


def fresh_scale(amax: float, mode: str = "pow2") -> float:
    """The per-tensor scale for a tensor whose largest magnitude is `amax` (values/scale stay within ±448)."""
    if mode not in SCALE_MODES:
        raise LoRAOpsError(f"scale mode {mode!r}: use one of {SCALE_MODES}")
    amax = float(amax)
    if not math.isfinite(amax):
        raise FP8FormatError(f"cannot quantise a tensor whose largest value is {amax}")
    if amax == 0.0:
        return 1.0
    if mode == "exact":
        return amax / FP8_MAX
    scale = 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
    while amax / scale > FP8_MAX:  # guard against log2 rounding
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


def stochastic_e4m3(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Round fp32 `values` (already divided by the scale) to e4m3fn: up with probability = the fraction.

    `noise` is uniform [0, 1), same shape. Values beyond ±448 saturate. E[result] = values inside the range.
    """
    a = values.abs().clamp_(max=FP8_MAX)
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(a), (exp - 1).clamp_(min=-6) - 3)
    lo = torch.floor(a / ulp).mul_(ulp)
    up = noise.reshape(a.shape) < (a - lo).div_(ulp)
    r = lo.add_(ulp * up).clamp_(max=FP8_MAX)
    return torch.copysign(r, values).to(E4M3)


def round_e4m3(
    scaled: torch.Tensor, rounding: str = "nearest", seed: int = 0, offset: int = 0
) -> torch.Tensor:
    """fp32 values (already divided by the scale) → float8_e4m3fn, saturating at ±448."""
    if rounding == "nearest":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    if rounding == "stochastic":
        return stochastic_e4m3(scaled, uniform_noise(seed, offset, scaled.numel(), scaled.device))
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
