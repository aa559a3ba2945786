"""What the fault tests share: the tile sizes, the on_tile hook that injects a fault and checks the rollback, and
the model / stack before and after each phase (merge, change of strengths, restore).

Engine policy under test (merge.merge_loras): any failure rolls every touched tile back to its exact previous
bits; an out-of-memory error then retries the whole call with half the tile size, down to
MergeOptions.min_tile_bytes, and raises when that is reached.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from tensor_checks import differing, snapshot

from lora_ops import MergeOptions, merge_loras

BASE_SEED = 3
TILE = 8 * 1024  # a few rows per tile: every weight has several tiles
MIN_TILE = 1024
COUNTS: Counter = Counter()


class Cancelled(Exception):
    """A custom exception a host application might raise to cancel (not a LoRAOpsError)."""


class Fault:
    """An on_tile hook: raise `make()` on the calls `fire(call, key, index, rows)` selects.

    After raising, the next call (the start of the retry, before it writes anything) compares the model with
    `expect` (the bits before the call): the rollback must have restored them exactly.
    """

    def __init__(self, make: Callable[[], BaseException], fire: Callable[[int, str, int, int], bool],
                 sd: dict[str, torch.Tensor] | None = None, expect: dict[str, torch.Tensor] | None = None) -> None:
        self.make, self.fire, self.sd, self.expect = make, fire, sd, expect
        self.calls = 0
        self.raised = 0
        self.rows: list[int] = []
        self.rollback_checks: list[list[str]] = []
        self._check_next = False

    def __call__(self, key: str, index: int, rows: int) -> None:
        if self._check_next and self.sd is not None:
            self.rollback_checks.append(differing(self.sd, self.expect))
            self._check_next = False
        call = self.calls
        self.calls += 1
        self.rows.append(rows)
        if self.fire(call, key, index, rows):
            self.raised += 1
            self._check_next = True
            COUNTS["faults injected"] += 1
            raise self.make()


def raise_at(done_at: int, exc: type[BaseException]):
    """An offline progress callback that raises `exc` when `done` reaches `done_at` (counted as an injected fault)."""

    def progress(done: int, total: int) -> None:
        if done == done_at:
            COUNTS["faults injected"] += 1
            raise exc

    return progress


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory (injected)")


PHASES = ("merge", "change", "restore")


def setup_phase(base, stacks, phase: str):
    """(model, state to pass, stack to merge, the model's bits before the call, reference result after it)."""
    sd = snapshot(base)
    state = None
    if phase in ("change", "restore"):
        state = merge_loras(sd, stacks["A"], tile_bytes=TILE)
    target = {"merge": stacks["A"], "change": stacks["B"], "restore": []}[phase]
    before = snapshot(sd)
    ref = snapshot(before)
    ref_state = merge_loras(ref, target, state=state, tile_bytes=TILE)
    return sd, state, target, before, ref, ref_state


def count_tiles(base, stacks, phase: str, tile_bytes: int) -> int:
    sd, state, target, *_ = setup_phase(base, stacks, phase)
    counter = Fault(RuntimeError, lambda *a: False)
    merge_loras(sd, target, state=state, options=MergeOptions(tile_bytes=tile_bytes, on_tile=counter))
    return counter.calls
