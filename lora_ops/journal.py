"""What exact undo keeps per weight: the sparse journal, a fingerprint of the bits undo must give back, and the
arithmetic (device, CPU threads) the change was computed with.

The journal holds only the elements that `round(merged − ΔW)` misses, so it is exact only when ΔW is
recomputed bit for bit as it was at merge time. The fingerprint is the check that it was: a few int64
sums over the bit pattern, computed on the device tile by tile (no host synchronisation per tile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def _gather(values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """values[flat] (1-D); on the CPU numpy's take, several times faster than torch's index kernel."""
    if values.device.type != "cpu" or flat.device.type != "cpu":
        return values[flat]
    ints = _INT_OF_SIZE[values.element_size()]
    return torch.from_numpy(np.take(values.view(ints).numpy(), flat.numpy())).view(values.dtype)


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
    and for realistic LoRAs (ΔW of a few % of W) it is a few % of it. Tiles are recorded where they
    were computed; `settle` moves them to the CPU together, once per weight (no transfer per tile).
    """

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self._settled = 0  # segments before this index are on the CPU

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
        if count * (4 + item) >= truth.numel() * item:  # `truth` may be a view of the weight: copy it
            self.segments.append(_Segment(start, start + truth.numel(), None, truth.reshape(-1).clone()))
        else:
            index = (flat.to(truth.device) + start).to(torch.int32)
            self.segments.append(_Segment(start, start + truth.numel(), index, _gather(truth, flat)))

    def settle(self) -> None:
        """Move the segments recorded since the last call to the CPU: one transfer of indices, one of values."""
        fresh = self.segments[self._settled :]
        self._settled = len(self.segments)
        if not fresh:
            return
        values = torch.cat([s.values for s in fresh]).cpu().split([s.values.numel() for s in fresh])
        indexed = [s for s in fresh if s.index is not None]
        if indexed:
            indices = torch.cat([s.index for s in indexed]).cpu().split([s.index.numel() for s in indexed])
            for seg, index in zip(indexed, indices):
                seg.index = index
        for seg, value in zip(fresh, values):
            seg.values = value

    def lookup(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(local int64 indices, values) of the recorded elements in flat range [lo, hi)."""
        indices, values = [], []
        for seg in self.segments:
            if seg.stop <= lo or seg.start >= hi:
                continue
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if seg.index is None:
                indices.append(torch.arange(a - lo, b - lo, device=seg.values.device))
                values.append(seg.values[a - seg.start : b - seg.start])
            else:
                i0 = int(torch.searchsorted(seg.index, a))
                i1 = int(torch.searchsorted(seg.index, b))
                if i0 < i1:
                    indices.append(seg.index[i0:i1].long() - lo)
                    values.append(seg.values[i0:i1])
        if not indices:
            return None
        if len(indices) == 1:  # the usual case: the tile lies in one segment
            return indices[0], values[0]
        device = indices[0].device
        return torch.cat([i.to(device) for i in indices]), torch.cat([v.to(device) for v in values])


@dataclass(frozen=True)
class Arithmetic:
    """Where a weight's change was computed, and with how many CPU threads: undo must compute it the same way."""

    device: str
    threads: int | None = None  # CPU intra-op threads (None on an accelerator)

    @classmethod
    def on(cls, device: torch.device) -> Arithmetic:
        return cls(str(device), torch.get_num_threads() if device.type == "cpu" else None)

    def available(self) -> bool:
        device = torch.device(self.device)
        if device.type == "cpu":
            return True
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            return False
        return device.index is None or device.index < backend.device_count()


@contextmanager
def threads_of(arithmetic: Arithmetic) -> Iterator[None]:
    """Run with the CPU thread count the arithmetic records (a matmul's blocking can depend on it)."""
    previous = torch.get_num_threads()
    change = arithmetic.threads is not None and arithmetic.threads != previous
    if change:
        torch.set_num_threads(arithmetic.threads)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(previous)


_MIX_CACHE: dict[tuple, torch.Tensor] = {}


def _mix(start: int, stop: int, salt: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Fixed pseudo-random multipliers in [1, 32749] for positions [start, stop) (cached from 0, per device)."""
    key = (stop - start, salt, str(device), dtype)
    cached = _MIX_CACHE.get(key) if start == 0 else None
    if cached is not None:
        return cached
    mix = (torch.arange(start, stop, dtype=torch.int64, device=device) * (40503 + 2 * salt) + salt) % 32749 + 1
    mix = mix.to(dtype)
    if start == 0:
        _MIX_CACHE[key] = mix
    return mix


def fingerprint(rows: torch.Tensor, row0: int) -> torch.Tensor:
    """Σ_r a_r Σ_c b_c bits[r, c] (int64, wrapping) over `rows` (rows row0.. of one weight), on its device.

    Fixed multipliers a (per row) and b (per 16-bit column) in [1, 32749]: any single changed element
    changes the sum, and so does any pattern of changes short of a deliberate one (±1 ulp errors do not
    cancel as they can in plain row and column sums). Tiles' results add up to the whole weight's. The
    per-row sums are integers below 2^53, taken modulo 2^32: numpy's wrapping int32 einsum on the CPU (a
    sixth of one fp32 conversion pass) and an exact float64 matrix-vector product elsewhere agree.
    """
    matrix = rows.reshape(rows.shape[0], -1) if rows.dim() != 2 else rows
    bits = matrix.view(torch.uint8 if matrix.element_size() == 1 else torch.int16)  # 32-bit: two halves
    if bits.device.type == "cpu":  # int32 arithmetic wraps: the low 32 bits of each exact row sum
        columns = _mix(0, bits.shape[1], 1, bits.device, torch.int32).numpy()
        per_row = torch.from_numpy(np.einsum("ij,j->i", bits.contiguous().numpy(), columns)).to(torch.int64)
    else:
        per_row = torch.mv(bits.to(torch.float64), _mix(0, bits.shape[1], 1, bits.device, torch.float64))
        per_row = per_row.to(torch.int64)
    per_row = per_row.bitwise_and_(0xFFFFFFFF)
    return per_row.mul_(_mix(row0, row0 + bits.shape[0], 2, bits.device)).sum().reshape(1)
