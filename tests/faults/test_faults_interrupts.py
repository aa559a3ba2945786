"""Injected interrupts (KeyboardInterrupt, a host's own cancel exception) during in-memory merges, strength changes
and restores: never retried, the model's bits unchanged, the state passed in still valid.

Raised from `MergeOptions.on_tile` (called before each tile is written) and from the progress callback; and a
failure with exact_undo=False changes nothing either.
"""

from __future__ import annotations

import random

import pytest
import torch
from fault_kit import COUNTS, MIN_TILE, PHASES, TILE, Cancelled, Fault, count_tiles, oom, setup_phase
from tensor_checks import assert_same_bits

from lora_ops import MergeOptions, merge_loras, restore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, Cancelled], ids=["KeyboardInterrupt", "Cancelled"])
@pytest.mark.parametrize("draw", range(3))
def test_interrupt_at_a_random_tile_changes_nothing(base, stacks, phase, exc, draw):
    total = count_tiles(base, stacks, phase, TILE)
    at = random.Random(f"{phase}{exc.__name__}{draw}").randrange(total)
    sd, state, target, before, ref, _ = setup_phase(base, stacks, phase)
    fault = Fault(exc, lambda call, *_: call == at)
    with pytest.raises(exc):
        merge_loras(sd, target, state=state, options=MergeOptions(tile_bytes=TILE, min_tile_bytes=MIN_TILE,
                                                                  on_tile=fault))
    assert fault.raised == 1, "an interrupt must not be retried"
    assert_same_bits(sd, before, f"{phase}: model after {exc.__name__} at tile call {at}/{total}")
    # the state passed in still describes the model: the same call again gives the reference bits
    again = merge_loras(sd, target, state=state, tile_bytes=TILE)
    assert_same_bits(sd, ref, f"{phase}: the call repeated after the interrupt")
    restore(sd, again, tile_bytes=TILE)
    assert_same_bits(sd, base, f"{phase}: restore after the repeated call")


def test_interrupt_in_the_progress_callback(base, stacks):
    """`progress` runs after a weight is finished; raising there rolls back the finished weights too."""
    sd, state, target, before, _, _ = setup_phase(base, stacks, "change")
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) == 3:
            COUNTS["faults injected"] += 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_loras(sd, target, state=state, options=MergeOptions(tile_bytes=TILE, progress=progress))
    assert_same_bits(sd, before, "model after an interrupt in progress()")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, torch.OutOfMemoryError], ids=["interrupt", "oom"])
def test_failure_with_exact_undo_off_changes_nothing(base, stacks, exc):
    sd, _, target, before, _, _ = setup_phase(base, stacks, "merge")
    fault = Fault(exc if exc is KeyboardInterrupt else oom, lambda call, *_: call >= 4)
    with pytest.raises(exc):
        merge_loras(sd, target, options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, exact_undo=False,
                                                     on_tile=fault))
    assert_same_bits(sd, before, f"model after {exc.__name__} with exact_undo=False")
