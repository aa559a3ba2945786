"""Did an in-place merge reach the weights? Cheap bit checksums, and what a merge would change, on copies.

Why: a weight held by a tensor subclass (another library's quantized tensor, a lazy view) may accept an in-place
write and keep its old bits. A tool that then reports "merged" is worse than one that fails, so callers compare
checksums before and after, and for a weight that kept its bits ask whether the same merge changes a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .formats import LoRAFile
from .merge import MergeOptions


def checksum(tensor: torch.Tensor) -> int:
    """The sum (mod 2^64) of the tensor's bytes read as 64-bit words: changes when any element does, barring a
    coincidence no merge produces. One read pass, no copy (a few ms per 100 MB)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    total = int(raw[:whole].view(torch.int64).sum()) if whole else 0
    return total + sum((int(b) + 1) << (8 * i) for i, b in enumerate(raw[whole:].tolist()))


def checksums(
    weights: Mapping[str, torch.Tensor], keys: Iterable[str], scales: Mapping[str, torch.Tensor] | None = None
) -> dict[str, tuple]:
    """Key → checksum of the weight (and of its scale, for scaled fp8 parts)."""
    scales = scales or {}
    return {k: (checksum(weights[k]), float(scales[k]) if k in scales else None) for k in keys}


def changes_on_copies(
    weights: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoRAFile, float]],
    keys: Iterable[str],
    scales: Mapping[str, torch.Tensor] | None = None,
    options: MergeOptions | None = None,
) -> set[str]:
    """Which of `keys` the merge of `loras` changes, computed on copies of those weights (and scales) alone."""
    from .fp8 import merge_loras_fp8

    keys = list(keys)
    copies = {k: weights[k].detach().clone() for k in keys}
    copy_scales = {k: v.detach().clone() for k, v in (scales or {}).items() if k in copies}
    before = checksums(copies, keys, copy_scales)
    merge_loras_fp8(copies, [(lora.only(set(keys)), s) for lora, s in loras], scales=copy_scales, options=options)
    after = checksums(copies, keys, copy_scales)
    return {k for k in keys if after[k] != before[k]}
