"""A LoRA file's keys as (module, factor): which adapter kind each suffix belongs to, and alphas."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import FILE_KINDS, Adapter
from ..errors import FIX_BROKEN, LoRAFormatError

#: factor suffix -> (adapter kind, factor name); kind None = metadata of the module (alpha, DoRA magnitude).
SUFFIXES: dict[str, tuple[type[Adapter] | None, str]] = {
    **{suffix: (kind, name) for kind in FILE_KINDS for suffix, name in kind.file_factors.items()},
    "alpha": (None, "alpha"),
    "dora_scale": (None, "dora_scale"),
}

#: Suffixes of adapters this pack does not apply, and why (reported in the coverage).
UNSUPPORTED_SUFFIXES = {
    "lora_mid.weight": "LoRA with a mid (Tucker) factor is for convolutions; Flux has none",
    "w_norm": "norm-layer patches (w_norm/b_norm) are not supported",
    "b_norm": "norm-layer patches (w_norm/b_norm) are not supported",
    "oft_blocks": "OFT adapters are not supported",
    "oft_diag": "OFT adapters are not supported",
    "a1.weight": "GLoRA adapters are not supported",
    "reshape_weight": "control LoRA img_in reshape marker (handled by the img_in width check)",
}


_LONGEST_FIRST = sorted([*SUFFIXES, *UNSUPPORTED_SUFFIXES], key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) for a factor key, longest suffix first."""
    for suffix in _LONGEST_FIRST:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def read_alpha(t: torch.Tensor, path: Path, key: str) -> float:
    """A module's alpha: one finite, positive number (else the LoRA's scale would be nonsense)."""
    if t.numel() != 1 or t.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int32,
        torch.int64,
    ):
        raise LoRAFormatError(
            f"{path}: {key!r} should be a single number (alpha), got shape {tuple(t.shape)} {t.dtype}. {FIX_BROKEN}"
        )
    value = float(t.reshape(()).item())
    if not value == value or value in (float("inf"), float("-inf")):
        raise LoRAFormatError(f"{path}: alpha {key!r} is {value}, not a finite number. {FIX_BROKEN}")
    if value <= 0:
        raise LoRAFormatError(
            f"{path}: alpha {key!r} is {value}; a LoRA alpha must be positive (0 would make the LoRA do nothing). "
            f"{FIX_BROKEN}"
        )
    return value


def peft_alphas(metadata: dict[str, str], path: Path | None = None) -> tuple[float | None, dict[str, float]]:
    """Default alpha/r and per-module alphas from PEFT's `lora_adapter_metadata` header entry.

    Refuses an entry it cannot read: the LoRA's scale would be unknown.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    where = f"{path}: metadata entry 'lora_adapter_metadata'"
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise LoRAFormatError(f"{where} is not a JSON object, so the LoRA's alpha is unknown. {FIX_BROKEN}")

    def positive(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise LoRAFormatError(
                f"{where}: {name} is {value!r}; it must be a positive number (it sets the LoRA's scale). {FIX_BROKEN}"
            )
        return float(value)

    alpha = config.get("lora_alpha")
    rank = config.get("r")
    alpha = None if alpha is None else positive("lora_alpha", alpha)
    rank = None if rank is None else positive("r", rank)
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoRAFormatError(f"{where}: alpha_pattern is not a JSON object. {FIX_BROKEN}")
    return (alpha / rank if alpha is not None and rank is not None else None), {
        k: positive(f"alpha_pattern[{k!r}]", v) for k, v in pattern.items()
    }
