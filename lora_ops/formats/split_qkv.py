"""kohya's split_qkv layout: q, k, v(, mlp) trained as separate LoRAs but stored as one block-diagonal LoRA."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..adapters import Adapter, LoRA
from ..errors import LoRAFormatWarning
from .lora_file import Coverage
from .schemes import Resolved


def uses_split_qkv(metadata: dict[str, str]) -> bool | None:
    """kohya's split_qkv flag from `ss_network_args`; None when absent or unreadable (then the layout decides)."""
    args = metadata.get("ss_network_args")
    if not args:
        return None
    try:
        parsed = json.loads(args)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return str(parsed.get("split_qkv", "false")).lower() == "true"


def _block_diagonal_parts(up: torch.Tensor, down: torch.Tensor, module: str) -> list[tuple[int, int, int, int]] | None:
    """(row0, rows, col0, cols) of the blocks if `up` is block-diagonal over q,k,v(,mlp) splits."""
    out_features, stacked = up.shape
    hidden = down.shape[1]
    if module.endswith("attn.qkv"):
        row_sizes = [out_features // 3] * 3
    elif module.endswith("linear1"):
        row_sizes = [hidden, hidden, hidden, out_features - 3 * hidden]
    else:
        return None
    k = len(row_sizes)
    if stacked % k or stacked == k or min(row_sizes) <= 0:
        return None
    r = stacked // k
    parts, row0 = [], 0
    for i, rows in enumerate(row_sizes):
        parts.append((row0, rows, i * r, r))
        row0 += rows
    for row0, rows, col0, cols in parts:
        block = up[row0 : row0 + rows]
        outside = torch.cat([block[:, :col0], block[:, col0 + cols :]], dim=1)
        if bool(outside.any()):
            return None
    return parts


def fix_split_qkv(
    lora: LoRA,
    module: str,
    resolved: Resolved,
    alpha: float | None,
    split_flag: bool | None,
    path: Path,
    coverage: Coverage,
) -> list[Adapter]:
    """kohya split_qkv files store q,k,v(,mlp) as one block-diagonal LoRA but keep the per-split alpha.

    Read naively (alpha / stacked rank) they are 3-4x too weak (sd-scripts issue #2204). Each split
    becomes its own LoRA with scale alpha / split rank. Files converted by convert_flux_lora.py set
    alpha = stacked rank, so (without kohya metadata) those are left as they are.
    """
    if alpha is None:
        return [lora]
    parts = _block_diagonal_parts(lora.up, lora.down, resolved.module)
    if parts is None:
        return [lora]
    stacked = lora.down.shape[0]
    if split_flag is None and abs(alpha - stacked) < 1e-6:
        return [lora]
    out: list[Adapter] = []
    for row0, rows, col0, cols in parts:
        out.append(
            LoRA(
                lora.up[row0 : row0 + rows, col0 : col0 + cols],
                lora.down[col0 : col0 + cols],
                source_keys=lora.source_keys,
                scale=alpha / cols,
                row_offset=lora.row_offset + row0,
            )
        )
    note = (
        f"{module}: kohya split_qkv layout (block-diagonal, {len(parts)} splits, alpha {alpha:g}); "
        f"scaled each split by alpha/{cols} instead of alpha/{stacked} (sd-scripts issue #2204). "
        "Pass legacy_split_qkv=True for the old, 3-4x weaker reading."
    )
    coverage.notes.append(note)
    warnings.warn(f"{path}: {note}", LoRAFormatWarning, stacklevel=5)  # the caller of load_lora
    return out
