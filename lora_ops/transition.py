"""One weight's move from one LoRA stack to another, tile by tile, with what undoing it needs: the journal, the
fingerprints, and the memory a rollback allocates, set aside for the whole call.

See merge.py for the engine that runs these jobs and for why undo is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from . import rows
from .adapters import ROW_BLOCK, DoRA
from .errors import UndoError, is_out_of_memory
from .journal import Arithmetic, Journal, differing_bits, fingerprint
from .rows import Codec, Term

if TYPE_CHECKING:
    from .merge import MergeState


#: Rows per rollback piece: few, so that a piece's journal entries and temporaries stay small.
ROLLBACK_ROWS = 32
#: Bytes per element of a rollback piece beyond the call's tile buffers: the journal's fix (int64 index + value),
#: a read from another device, and the fp32 temporaries of base-dependent kinds (DoRA).
ROLLBACK_BYTES_PER_ELEMENT = 32


class RollbackReserve:
    """Memory set aside, per compute device, for the whole of a merge call and given back when a rollback starts.

    A rollback undoes pieces of ROLLBACK_ROWS rows in the call's reused tile buffers, so beyond them it needs one
    weight's adapters (fp32, on the compute device), one cached row block per adapter, and one piece's
    temporaries: `rollback_bytes`. Holding that much from the start means that after a failure (an out-of-memory
    error above all) the rollback allocates into what the reserve frees. On a GPU the freed blocks stay in torch's
    caching allocator, so no other process can take them in between.
    """

    def __init__(self) -> None:
        self._held: dict[torch.device, torch.Tensor] = {}

    def hold(self, needs: dict[torch.device, int]) -> None:
        """Allocate the given bytes per device (an out-of-memory error here comes before anything is written)."""
        for device, nbytes in needs.items():
            self._held[device] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._held.values())

    def release(self) -> None:
        self._held.clear()


def rollback_bytes(cols: int, factor_elements: int, terms: int, codec_buffers: int = 0) -> int:
    """What rolling back one weight may allocate beyond the call's tile buffers: its `terms` adapters' factors in
    fp32, one cached row block per adapter, and one piece's temporaries (`codec_buffers` more fp32 ones for codecs
    that make their own, such as fp8)."""
    blocks = terms * ROW_BLOCK * cols * 4
    return factor_elements * 4 + blocks + ROLLBACK_ROWS * cols * (ROLLBACK_BYTES_PER_ELEMENT + 4 * codec_buffers)


class KeyJob:
    """One weight's transition from `old` terms to `new` terms, tile by tile."""

    def __init__(self, key: str, weight: torch.Tensor, old: list[Term], new: list[Term], journal: Journal | None,
                 codec: Codec, arithmetic: Arithmetic, state: MergeState, exact_undo: bool = True,
                 workspace: rows.Workspace | None = None) -> None:
        self.key = key
        self.arithmetic = arithmetic
        device = torch.device(arithmetic.device)
        self.exact_undo = exact_undo
        self.weight = weight
        self.matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        self.codec = codec
        self.device = device
        self._sources = (old, new)
        self.old_linear = not any(a.needs_base for a, _ in old)
        self.new_linear = not any(a.needs_base for a, _ in new)
        self.journal = journal
        self.state = state
        self.new_journal = Journal()
        self.undo_journal = Journal()
        self.written: list[tuple[int, int]] = []
        self.extent = 0
        zeros = torch.zeros(1, dtype=torch.int64, device=device)
        self.base_print, self.before_print = zeros, zeros.clone()  # fingerprints of the written rows
        self.workspace = workspace or rows.Workspace()
        # DoRA norms the old stack was merged with (this call's own norms replace them in the state as it runs)
        self._old_norms = [state.dora_norms.get((key, id(a))) for a, _ in old]
        self.load_terms()

    def load_terms(self) -> None:
        """fp32 copies of this weight's adapters on the compute device (with known DoRA norms)."""
        copies: dict[int, object] = {}

        def on_device(adapter):
            if adapter.needs_base:  # DoRA carries the norms of its own stack: never shared
                return adapter.on(self.device)
            if id(adapter) not in copies:  # one copy for an adapter in both stacks (a strength change)
                copies[id(adapter)] = adapter.on(self.device)
            return copies[id(adapter)]

        self.old, self.new = ([(on_device(a), c) for a, c in terms] for terms in self._sources)
        self.shared = len(copies) < sum(1 for terms in self._sources for a, _ in terms if not a.needs_base)
        new_norms = [self.state.dora_norms.get((self.key, id(a))) for a, _ in self._sources[1]]
        for (dev_adapter, _), norms in zip(self.old + self.new, self._old_norms + new_norms):
            if isinstance(dev_adapter, DoRA):
                dev_adapter.use_norms(norms)

    @property
    def keeps_terms(self) -> bool:
        """Whether the weight holds LoRA terms after this call (False: it is restored)."""
        return bool(self._sources[1])

    def release_terms(self) -> None:
        """Drop the device copies once the weight is done; `rollback` loads them again."""
        self.old = self.new = None

    # --- deltas -------------------------------------------------------------------------------
    def _zeros(self, slot: str | None, n_rows: int) -> torch.Tensor:
        """A zeroed fp32 tile: the reused buffer `slot` where there is one, else a fresh tensor."""
        out = self._scratch(slot, n_rows, torch.float32)
        if out is None:
            return torch.zeros((n_rows, self.matrix.shape[1]), dtype=torch.float32, device=self.device)
        return out.zero_()

    def _delta(self, terms, r0: int, r1: int, base: torch.Tensor | None, slot: str | None = None) -> torch.Tensor:
        out = self._zeros(slot, r1 - r0)
        rows.add_terms(out, terms, r0, r1, base)
        return out

    def _old_and_new_deltas(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stacks' changes over rows [r0, r1) (linear kinds), a row block at a time, so that an adapter in both
        (a strength change) computes each block's matmul once: the second use finds it as its cached last block.
        Per element the additions are those of `_delta`, in the same order: the same bits."""
        old, new = self._zeros("old_delta", r1 - r0), self._zeros("delta", r1 - r0)
        for b0 in range(r0, r1, ROW_BLOCK):
            b1 = min(r1, b0 + ROW_BLOCK)
            rows.add_terms(old[b0 - r0 : b1 - r0], self.old, b0, b1, None)
            rows.add_terms(new[b0 - r0 : b1 - r0], self.new, b0, b1, None)
        return old, new

    def _scratch(self, slot: str | None, n_rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A reused tile buffer for the default codec (others make their own tensors)."""
        if slot is None or type(self.codec) is not Codec:
            return None
        return self.workspace.take(slot, (n_rows, self.matrix.shape[1]), dtype, self.device)

    def _decode(self, stored: torch.Tensor, role: str, slot: str | None = None) -> torch.Tensor:
        out = self._scratch(slot, stored.shape[0], torch.float32)
        return self.codec.decode(stored, role) if out is None else out.copy_(stored)

    def _encode(self, values: torch.Tensor, r0: int, role: str, slot: str | None = None) -> torch.Tensor:
        out = self._scratch(slot, values.shape[0], self.codec.dtype)
        return self.codec.encode(values, self.key, r0, role) if out is None else out.copy_(values)

    def _before(self, stored: torch.Tensor, terms, linear: bool, r0: int, r1: int,
                delta: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic estimate of rows before `terms` were added (fp32, not yet rounded).

        Linear kinds: stored − Δ. Base-dependent kinds (DoRA, set): two fixed-point steps. The
        journal records where the rounded estimate misses, so the estimate need not be perfect.
        """
        if linear and delta is not None:
            return stored.sub_(delta)  # `stored` is this tile's scratch copy
        if linear:
            return stored - self._delta(terms, r0, r1, None)
        estimate = stored - self._delta(terms, r0, r1, stored)
        return stored - self._delta(terms, r0, r1, estimate)

    # --- tiles --------------------------------------------------------------------------------
    def _read(self, r0: int, r1: int, role: str = "current", slot: str | None = None) -> torch.Tensor:
        return self._decode(self.matrix[r0:r1].to(self.device), role, slot)

    def _fix(self, stored: torch.Tensor, fix) -> torch.Tensor:
        if fix is not None:
            stored.view(-1)[fix[0].to(self.device, torch.int64)] = fix[1].to(self.device)
        return stored

    def base_rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact original rows (fp32, stored form), recovered from the current weights."""
        base, stored, _, _ = self._recover(r0, r1)
        return base, stored

    def _recover(self, r0: int, r1: int, new_too: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None, torch.Tensor | None]:
        """`base_rows`, plus the old terms' change over these rows when it does not depend on the base (`run_tile`
        reuses it for the undo journal instead of computing it twice) and, with `new_too` when both stacks share
        adapters, the new terms' change computed in the same pass (None where not computed)."""
        current = self._read(r0, r1, slot="base")
        if not self.old:
            return current, self.matrix[r0:r1].to(self.device), None, None
        old_delta = new_delta = None
        if new_too and self.shared and self.old_linear and self.new_linear:
            old_delta, new_delta = self._old_and_new_deltas(r0, r1)
        elif self.old_linear:
            old_delta = self._delta(self.old, r0, r1, None, slot="old_delta")
        estimate = self._before(current, self.old, self.old_linear, r0, r1, old_delta)
        stored = self._encode(estimate, r0, "base", slot="base_stored")
        cols = self.matrix.shape[1]
        stored = self._fix(stored, self.journal.lookup(r0 * cols, r1 * cols) if self.journal else None)
        return self._decode(stored, "base", slot="base"), stored, old_delta, new_delta

    def merged_tiles(self, tile_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, fp32 rows as this call will write them, before rounding) per tile; writes nothing."""
        for r0, r1 in rows.tiles(self.matrix.shape[0], tile_rows):
            base, _ = self.base_rows(r0, r1)
            yield r0, base + self._delta(self.new, r0, r1, base)

    def prepare_norms(self, tile_rows: int) -> None:
        """Per-column DoRA norms over this weight's original rows, kept in the state for undo."""
        doras = rows.accumulate_dora_norms(self.new, self.matrix.shape[0], tile_rows,
                                           lambda r0, r1: self.base_rows(r0, r1)[0])
        for (dev_adapter, _), (original, _) in zip(self.new, self._sources[1]):
            if dev_adapter in doras:
                self.state.dora_norms[(self.key, id(original))] = dev_adapter.norms

    def run_tile(self, r0: int, r1: int) -> None:
        """Write rows [r0, r1) of the new stack; journal what undo and a rollback need, then write."""
        current_stored = self.matrix[r0:r1].to(self.device) if self.old else None  # read before the write below
        base, base_stored, old_delta, new_delta = self._recover(r0, r1, new_too=True)
        base_print = fingerprint(base_stored, r0)
        before_print = fingerprint(current_stored, r0) if self.old else base_print
        if self.old:  # a rollback merges the old stack into the exact original rows again: journal where that misses
            self._record(self.undo_journal, self._old_merged(base, r0, r1, old_delta), current_stored, r0, "current")
        delta = new_delta if new_delta is not None else self._delta(self.new, r0, r1, base, slot="delta")
        if self.new:  # base is not needed once the change is computed: merge into it
            out_stored = self._encode(base.add_(delta) if base is not base_stored else base + delta, r0, "new", "out")
        else:  # write the recovered original bits themselves (base + 0 would turn -0 into +0)
            out_stored = base_stored
        if self.new:  # recorded even without exact_undo: a failure must roll back exactly
            out = self._decode(out_stored, "new", slot="base")
            before = self._before(out, self.new, self.new_linear, r0, r1, delta if self.new_linear else None)
            self._record(self.new_journal, before, base_stored, r0, "base")
        self.matrix[r0:r1].copy_(out_stored)
        self.written.append((r0, r1))
        self.extent = r1  # tiles are written in order: rows from here on still hold what the call found
        self.base_print += base_print  # only for rows written: a rollback checks exactly those
        self.before_print += before_print

    def _old_merged(self, base: torch.Tensor, r0: int, r1: int, old_delta: torch.Tensor | None = None) -> torch.Tensor:
        """The old stack merged into the exact original rows `base` (fp32, before rounding), as its own merge computed
        it: what a rollback writes and what `run_tile` journals it against. `old_delta`: the old change if already
        computed (it is added to in place; `base` is left as it is)."""
        if old_delta is None:
            old_delta = self._delta(self.old, r0, r1, base, slot="old_delta")
        return old_delta.add_(base)

    def _record(self, journal: Journal, estimate: torch.Tensor, truth: torch.Tensor, r0: int, role: str) -> None:
        recovered = self._encode(estimate, r0, role, slot="recovered")
        journal.add(r0 * self.matrix.shape[1], differing_bits(recovered, truth), truth.reshape(-1))

    def undo_tile(self, r0: int, r1: int) -> None:
        """Put back the bits this call replaced in rows [r0, r1), in the call's tile buffers where it can."""
        out = self._read(r0, r1, "new", slot="base")
        if self.new_linear:
            estimate = out.sub_(self._delta(self.new, r0, r1, None, slot="delta"))
        else:
            estimate = self._before(out, self.new, False, r0, r1)
        lo, hi = r0 * self.matrix.shape[1], r1 * self.matrix.shape[1]
        stored = self._fix(self._encode(estimate, r0, "base", slot="out"), self.new_journal.lookup(lo, hi))
        if self.old:  # the old stack merged again into the exact original rows, as `run_tile` journaled it
            merged = self._old_merged(self._decode(stored, "base", slot="base"), r0, r1)
            stored = self._fix(self._encode(merged, r0, "current", slot="out"), self.undo_journal.lookup(lo, hi))
        self.matrix[r0:r1].copy_(stored)

    def check_base(self, expected: torch.Tensor | None) -> None:
        """After the last tile: the original bits this call recovered must match the merge's fingerprint."""
        if expected is not None and self.old and not torch.equal(self.base_print.cpu(), expected):
            raise UndoError(
                f"{self.key!r}: taking the merged LoRAs out would not give back the original weight (its "
                "fingerprint differs): the change was computed differently than at merge time, or the weight was "
                "changed outside this pack. The weights were left as they were; reload the model from its file.",
                [self.key], unchanged=True,
            )

    def rollback(self) -> None:
        """Put back the bits this call replaced, in pieces of ROLLBACK_ROWS rows (what the reserve covers);
        a piece that still runs out of memory is retried in halves. The result is checked against the
        fingerprint of the bits found (UndoError if it differs)."""
        if self.old is None:
            _retry_out_of_memory(self.load_terms, self.device)
        while self.written:
            r0, r1 = self.written[-1]
            for p0 in reversed(range(r0, r1, ROLLBACK_ROWS)):
                self._undo_range(p0, min(r1, p0 + ROLLBACK_ROWS))
            self.written.pop()
        self.codec.rollback()
        if not torch.equal(self._print_of_rows(0, self.extent), self.before_print.cpu()):
            raise UndoError(f"{self.key!r}: rolling back did not give back its previous bits", [self.key], False)

    def _undo_range(self, r0: int, r1: int) -> None:
        try:
            self.undo_tile(r0, r1)
            return
        except BaseException as error:
            if not is_out_of_memory(error) or r1 - r0 == 1:
                raise
        _free_cache(self.device)
        mid = (r0 + r1) // 2
        self._undo_range(mid, r1)
        self._undo_range(r0, mid)

    def _print_of_rows(self, start: int, stop: int) -> torch.Tensor:
        """Fingerprint of rows [start, stop) as stored now, 256 rows at a time on the CPU (cannot run out of VRAM)."""
        total = torch.zeros(1, dtype=torch.int64)
        for r0, r1 in rows.tiles(stop - start, ROW_BLOCK):
            total += fingerprint(self.matrix[start + r0 : start + r1].cpu(), start + r0)
        return total

    def original_print(self) -> torch.Tensor | None:
        """Fingerprint of this weight's original bits (those of the model file), for a reload after a failed rollback.

        A weight that held a stack before this call: the one its merge recorded. Otherwise the weight held its
        original bits: those of the rows this call wrote (recorded as it wrote them) plus the rows it never
        reached, as they still are."""
        if self._sources[0]:
            return self.state.fingerprints.get(self.key)
        return self.base_print.cpu() + self._print_of_rows(self.extent, self.matrix.shape[0])

    def finished_journal(self) -> Journal | None:
        return self.new_journal if self.exact_undo else None


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _retry_out_of_memory(step: Callable[[], None], device: torch.device) -> None:
    """Run `step`; after an out-of-memory error free the allocator's cache and run it once more."""
    try:
        step()
    except BaseException as error:
        if not is_out_of_memory(error):
            raise
        _free_cache(device)
        step()
