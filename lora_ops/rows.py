"""The row kernel shared by the in-place merge engine and the fp8 writers: tiles of rows, one rule for their
size, "add these terms to these rows" in fp32, and the DoRA norm pass that must see every row first.

A term is (adapter, coefficient): the adapter's change over rows [row_offset, row_offset + rows) of its
weight, times the user's strength. Adapters compute their change in fixed row blocks (adapters.ROW_BLOCK)
whatever the tile, so the fp32 result never depends on the tile size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .adapters import ROW_BLOCK, Adapter, DoRA
from .units import GIB, MIB

DEFAULT_TILE_BYTES = 64 * MIB
MIN_TILE_ROWS = 32
#: fp32 buffers alive per tile row in the merge engine: stored→fp32, base, sum of deltas, two adapter scratch,
#: recovery. The fp8 quantiser keeps more (scaled values and stochastic-rounding temporaries): FP8_BUFFERS.
MERGE_BUFFERS = 6
FP8_BUFFERS = 12
#: With a GPU's free memory known, the tile budget is this fraction of it (never above MAX_TILE_BYTES).
FREE_MEMORY_SHARE = 8
MAX_TILE_BYTES = GIB

Term = tuple[Adapter, float]


class Codec:
    """How a weight is stored: decode rows to fp32, encode fp32 rows back (round once).

    The default stores in the tensor's own float dtype with round-to-nearest. fp8 codecs with
    scales plug in here (see lora_ops.fp8).

    `role` names the encoding meant, for codecs whose encoding changes during a merge (an fp8 weight
    that gets a fresh scale): "current" = the bits stored before this call writes them, "new" = what
    this call writes, "base" = the original, LoRA-free weight (the journal's truth). Hooks, once per
    weight: `begin` after DoRA norms and before the first tile is written, `commit` after its last tile,
    `rollback` after its tiles were undone.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def decode(self, stored: torch.Tensor, role: str = "current") -> torch.Tensor:
        return stored.float()

    def encode(self, values: torch.Tensor, key: str, row0: int, role: str = "new") -> torch.Tensor:
        return values.to(self.dtype)

    def begin(self, merged: Callable[[], Iterator[tuple[int, torch.Tensor]]] | None, had_terms: bool,
              kept: dict[str, object]) -> None:
        """`merged()` yields (first row, fp32 rows as this call will write them) per tile (None: the weight is
        being restored); `had_terms`: the weight holds LoRA terms now; `kept`: what codecs keep between calls."""

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def tiles(rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges of at most `tile_rows` rows covering `rows`."""
    for r0 in range(0, rows, tile_rows):
        yield r0, min(rows, r0 + tile_rows)


def working_bytes(rows: int, cols: int, blocks: int, buffers: int = MERGE_BUFFERS) -> int:
    """fp32 working memory of one tile: its buffers plus one cached row block per adapter term."""
    return (rows * buffers + blocks * ROW_BLOCK) * cols * 4


def tile_rows_for(cols: int, tile_bytes: int, blocks: int = 1, buffers: int = MERGE_BUFFERS) -> int:
    """Rows per tile so that `working_bytes` fits in `tile_bytes` (the one tile-size rule).

    Whole multiples of the adapters' row block where the budget allows, so no block's change is
    computed twice at a tile boundary. Never fewer than MIN_TILE_ROWS: below that the per-tile
    overhead dominates and the row blocks (which cannot shrink) dominate the memory anyway.
    """
    rows = max(MIN_TILE_ROWS, (tile_bytes // (4 * max(cols, 1)) - blocks * ROW_BLOCK) // buffers)
    return rows - rows % ROW_BLOCK if rows >= ROW_BLOCK else rows


def tile_budget(device: torch.device, requested: int | None) -> int:
    """Bytes of working memory per tile: the caller's figure, else the 64 MiB default on the CPU (cache-sized
    tiles are as fast as any there), and on a GPU a share of its free memory, so that a big card merges a
    whole weight in one or two tiles; the 64 MiB default bounds it only when free memory is short."""
    if requested:
        return requested
    if device.type != "cuda":
        return DEFAULT_TILE_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    share = min(MAX_TILE_BYTES, free // FREE_MEMORY_SHARE)
    return share if share >= DEFAULT_TILE_BYTES else min(DEFAULT_TILE_BYTES, max(free // 2, MIB))


class Workspace:
    """Tile buffers reused by every tile of a call: no fresh pages per tile (costly on the CPU), no allocator
    round trip, and the memory of one tile of each kind rather than one per operation."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised (rows, cols) view of the buffer named `slot`; valid until the next take of it."""
        numel = shape[0] * shape[1]
        flat = self._flat.get((slot, dtype, device))
        if flat is None or flat.numel() < numel:
            flat = self._flat[(slot, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


def add_terms(out: torch.Tensor, terms: Sequence[Term], r0: int, r1: int, base: torch.Tensor | None) -> None:
    """out (rows [r0, r1) of a weight, fp32) += Σ coeff·ΔW of `terms` over those rows, in the terms' order.

    `base` (the original rows, fp32) matters only for base-dependent kinds (DoRA, set-weight).
    """
    for adapter, coeff in terms:
        a0 = max(r0, adapter.row_offset)
        a1 = min(r1, adapter.row_offset + adapter.shape[0])
        if a0 >= a1:
            continue
        b = base[a0 - r0 : a1 - r0] if base is not None else None
        adapter.add_delta(out[a0 - r0 : a1 - r0], a0 - adapter.row_offset, a1 - adapter.row_offset, coeff, b)


def accumulate_dora_norms(terms: Sequence[Term], rows: int, tile_rows: int,
                          base_rows: Callable[[int, int], torch.Tensor]) -> list[DoRA]:
    """Column norms of every per-column DoRA among `terms`, over the base rows `base_rows(r0, r1)` (fp32).

    Per-column DoRA normalises by ‖W + ΔW‖ over the whole weight, so this pass must run before any tile is
    written. Returns the DoRA adapters whose norms it computed.
    """
    doras = [a for a, _ in terms if isinstance(a, DoRA) and a.per_column]
    if not doras:
        return doras
    for d in doras:
        d.reset_norms()
    for r0, r1 in tiles(rows, tile_rows):
        base = base_rows(r0, r1)
        for d in doras:
            a0, a1 = max(r0, d.row_offset), min(r1, d.row_offset + d.shape[0])
            if a0 < a1:
                d.accumulate_norms(a0 - d.row_offset, a1 - d.row_offset, base[a0 - r0 : a1 - r0])
    return doras
