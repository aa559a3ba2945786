"""What exact undo keeps per weight: the sparse journal and a fingerprint of the bits undo must give back.

The journal holds only the elements that `round(merged − ΔW)` misses, so it is exact only when ΔW is
recomputed bit for bit as it was at merge time. The fingerprint is the check that it was: a few int64
sums over the bit pattern, computed on the device tile by tile (no host synchronisation per tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def differing_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat int64 positions where two same-dtype tensors differ bit for bit (-0 vs +0 counts).

    On the CPU numpy's flatnonzero is an order of magnitude faster than torch.nonzero.
    """
    ints = _INT_OF_SIZE[a.element_size()]
    a_bits, b_bits = a.reshape(-1).view(ints), b.reshape(-1).view(ints)
    if a.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(np.not_equal(a_bits.numpy(), b_bits.numpy())))
    return torch.nonzero(a_bits != b_bits).squeeze(1)


@dataclass
class _Segment:
    start: int  # flat range [start, stop) of the weight this segment covers
    stop: int
    index: torch.Tensor | None  # sorted absolute flat int32 indices; None = dense (every element)
    values: torch.Tensor  # original values in the storage dtype


class Journal:
    """Exact values that undo cannot recover by subtraction, for one weight (kept on the CPU).

    Per tile, the journal stores whichever is smaller: the elements that differ (int32 index +
    value) or the whole tile's values. So it never exceeds the weight's own size plus nothing,
    and for realistic LoRAs (ΔW of a few % of W) it is a few % of it.
    """

    def __init__(self) -> None:
        self.segments: list[_Segment] = []

    @property
    def nbytes(self) -> int:
        return sum(
            (0 if s.index is None else s.index.numel() * 4) + s.values.numel() * s.values.element_size()
            for s in self.segments
        )

    @property
    def entries(self) -> int:
        return sum(s.values.numel() for s in self.segments)

    def add(self, start: int, flat: torch.Tensor, truth: torch.Tensor) -> None:
        """Record `truth` (one flat tile starting at flat `start`) at the positions `flat`."""
        count = flat.numel()
        if not count:
            return
        item = truth.element_size()
        if count * (4 + item) >= truth.numel() * item:
            self.segments.append(_Segment(start, start + truth.numel(), None, truth.to("cpu", copy=True)))
        else:
            index = (flat + start).to("cpu", torch.int32)
            self.segments.append(_Segment(start, start + truth.numel(), index, truth[flat].cpu()))

    def lookup(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(local int64 indices, values) of the recorded elements in flat range [lo, hi)."""
        indices, values = [], []
        for seg in self.segments:
            if seg.stop <= lo or seg.start >= hi:
                continue
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if seg.index is None:
                indices.append(torch.arange(a - lo, b - lo))
                values.append(seg.values[a - seg.start : b - seg.start])
            else:
                i0 = int(torch.searchsorted(seg.index, a))
                i1 = int(torch.searchsorted(seg.index, b))
                if i0 < i1:
                    indices.append(seg.index[i0:i1].long() - lo)
                    values.append(seg.values[i0:i1])
        if not indices:
            return None
        return torch.cat(indices), torch.cat(values)


_MIX_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def _mix(start: int, stop: int, salt: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random multipliers in [1, 32749] for positions [start, stop) (cached per device)."""
    key = (stop - start, salt, str(device))
    cached = _MIX_CACHE.get(key) if start == 0 else None
    if cached is not None:
        return cached
    mix = (torch.arange(start, stop, dtype=torch.int64, device=device) * (40503 + 2 * salt) + salt) % 32749 + 1
    if start == 0:
        _MIX_CACHE[key] = mix
    return mix


def fingerprint(rows: torch.Tensor, row0: int) -> torch.Tensor:
    """Two int64 sums over the bits of `rows` (rows row0.. of one weight), on its device; add tiles' results.

    (Σ bits, Σ_r a_r Σ_c b_c bits[r, c]) with fixed multipliers a, b: the plain sum sees any single changed
    element, the bilinear one any pattern of changes short of a deliberate one (no ±1 ulp errors that cancel).
    """
    matrix = rows.reshape(rows.shape[0], -1) if rows.dim() != 2 else rows
    wide = torch.int32 if matrix.element_size() <= 2 else torch.int64
    ints = matrix.view(_INT_OF_SIZE[matrix.element_size()]).to(wide)
    total = ints.sum(dtype=torch.int64)
    ints.mul_(_mix(0, matrix.shape[1], 1, matrix.device))
    weighted = ints.sum(1, dtype=torch.int64).mul_(_mix(row0, row0 + matrix.shape[0], 2, matrix.device)).sum()
    return torch.stack([total, weighted])
