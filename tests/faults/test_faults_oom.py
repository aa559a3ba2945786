"""Injected out-of-memory errors during in-memory merges, strength changes and restores (bf16 and fp8).

An OOM raised from `MergeOptions.on_tile` (called before each tile is written) or from inside the tile
computation (`LoRA.rows`) rolls every touched tile back to its exact previous bits, then the whole call is retried
with half the tile size, down to MergeOptions.min_tile_bytes, and raises when that is reached. The CPU allocator's
RuntimeError is retried the same way.
"""

from __future__ import annotations

import random

import pytest
import torch
from fault_kit import COUNTS, MIN_TILE, PHASES, TILE, Cancelled, Fault, count_tiles, oom, setup_phase
from tensor_checks import assert_same_bits, snapshot

import lora_ops.fp8 as fp8
from lora_ops import MergeOptions, MergeReport, merge_loras, restore
from lora_ops.adapters import LoRA

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("draw", range(4))
def test_one_oom_at_a_random_tile_rolls_back_exactly_then_retries(base, stacks, phase, draw):
    total = count_tiles(base, stacks, phase, TILE)
    at = {0: 0, 1: total - 1}.get(draw, random.Random(f"{phase}{draw}").randrange(total))
    sd, state, target, before, ref, _ = setup_phase(base, stacks, phase)
    fault = Fault(oom, lambda call, *_: call == at, sd, before)
    report = MergeReport()
    new_state = merge_loras(sd, target, state=state, report=report,
                            options=MergeOptions(tile_bytes=TILE, min_tile_bytes=MIN_TILE, on_tile=fault))
    assert fault.raised == 1 and report.retries == 1
    assert fault.rollback_checks == [[]], f"rollback after the OOM at call {at}/{total} left {fault.rollback_checks}"
    assert_same_bits(sd, ref, f"{phase}: result after the retry")
    restore(sd, new_state, tile_bytes=TILE)
    assert_same_bits(sd, base, f"{phase}: restore after the retried call")


@pytest.mark.parametrize("phase", PHASES)
def test_oom_only_for_big_tiles_succeeds_with_smaller_tiles(base, stacks, phase):
    limit = 48  # rows: tiles of more rows "do not fit" (1-D weights get 42 rows at the 1 KiB minimum)
    sd, state, target, before, ref, _ = setup_phase(base, stacks, phase)
    fault = Fault(oom, lambda call, key, index, rows: rows > limit, sd, before)
    report = MergeReport()
    new_state = merge_loras(sd, target, state=state, report=report,
                            options=MergeOptions(tile_bytes=1 << 20, min_tile_bytes=MIN_TILE, on_tile=fault))
    assert report.retries == fault.raised >= 1
    assert all(not bad for bad in fault.rollback_checks)
    last_oom = max(i for i, r in enumerate(fault.rows) if r > limit)
    final_attempt = fault.rows[last_oom + 1 :]
    assert final_attempt and max(final_attempt) <= limit
    assert_same_bits(sd, ref, f"{phase}: result with the tile size that fits")
    restore(sd, new_state)
    assert_same_bits(sd, base, f"{phase}: restore")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("tile_bytes, min_tile_bytes, attempts", [(64 * 1024, 1024, 7), (None, None, 7),
                                                                  (3000, 1024, 2), (1024, 1024, 1)])
def test_oom_every_time_raises_after_halving_down_to_min_tile(base, stacks, phase, tile_bytes, min_tile_bytes,
                                                             attempts):
    """64 KiB -> 1 KiB is 7 attempts; the defaults (64 MiB, min 1 MiB) are 7 too; 3000 -> 1500 is 2."""
    sd, state, target, before, _, _ = setup_phase(base, stacks, phase)
    fault = Fault(oom, lambda *a: True, sd, before)
    opts = MergeOptions(tile_bytes=tile_bytes, on_tile=fault)
    if min_tile_bytes is not None:
        opts.min_tile_bytes = min_tile_bytes
    report = MergeReport()
    with pytest.raises(torch.OutOfMemoryError):
        merge_loras(sd, target, state=state, options=opts, report=report)
    assert fault.raised == attempts and report.retries == attempts - 1
    assert_same_bits(sd, before, f"{phase}: model after the final out-of-memory error")
    if state is not None:
        restore(sd, state, tile_bytes=TILE)  # the state passed in is still valid
        assert_same_bits(sd, base, f"{phase}: restore with the old state after the failure")


def test_oom_after_some_weights_are_finished(base, stacks):
    """The fault hits a later weight, after earlier weights were completely merged: all are rolled back."""
    sd, state, target, before, _, _ = setup_phase(base, stacks, "change")
    keys: list[str] = []
    fault = Fault(oom, lambda call, key, index, rows: (keys.append(key) or True) and len(set(keys)) >= 6, sd, before)
    with pytest.raises(torch.OutOfMemoryError):
        merge_loras(sd, target, state=state, options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, on_tile=fault))
    assert len(set(keys)) >= 6
    assert_same_bits(sd, before, "model after an OOM in the 6th weight")


@pytest.mark.parametrize("phase", PHASES)
def test_oom_inside_the_tile_computation(base, stacks, phase, monkeypatch):
    """An OOM from the matmul of a LoRA (not from the hook), once, at a random call: rollback, retry, same bits."""
    sd, state, target, before, ref, _ = setup_phase(base, stacks, phase)
    calls = {"n": 0}
    original = LoRA.rows
    counter_total = {"n": 0}

    def counting(self, b0, b1):
        counter_total["n"] += 1
        return original(self, b0, b1)

    probe = snapshot(before)
    monkeypatch.setattr(LoRA, "rows", counting)
    merge_loras(probe, target, state=state, tile_bytes=TILE)
    total = counter_total["n"]
    at = random.Random(phase).randrange(total)

    def failing(self, b0, b1):
        calls["n"] += 1
        if calls["n"] - 1 == at:
            COUNTS["faults injected"] += 1
            raise oom()
        return original(self, b0, b1)

    monkeypatch.setattr(LoRA, "rows", failing)
    report = MergeReport()
    new_state = merge_loras(sd, target, state=state, report=report,
                            options=MergeOptions(tile_bytes=TILE, min_tile_bytes=MIN_TILE))
    monkeypatch.setattr(LoRA, "rows", original)
    assert report.retries == 1
    assert_same_bits(sd, ref, f"{phase}: result after an OOM inside LoRA.rows (call {at} of {total})")
    restore(sd, new_state, tile_bytes=TILE)
    assert_same_bits(sd, base, f"{phase}: restore")


def test_cpu_allocator_failure_is_retried_with_smaller_tiles(base, stacks):
    sd, state, target, before, ref, _ = setup_phase(base, stacks, "merge")

    def cpu_oom():
        return RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes")

    fault = Fault(cpu_oom, lambda call, key, index, rows: rows > 48, sd, before)
    merge_loras(sd, target, options=MergeOptions(tile_bytes=1 << 20, min_tile_bytes=MIN_TILE, on_tile=fault))
    assert_same_bits(sd, ref, "result after CPU out-of-memory retries")


# ------------------------------------------------------------------------------------------------ fp8


@pytest.fixture(scope="module")
def fp8_model(base):
    return fp8.merge_to_fp8(base, [], "all")


def _fp8_phase(fp8_model, stacks, phase: str):
    sd = snapshot(fp8_model)
    state = None
    if phase in ("change", "restore"):
        state = fp8.merge_loras_fp8(sd, stacks["A"], options=MergeOptions(tile_bytes=TILE))
    target = {"merge": stacks["A"], "change": stacks["B"], "restore": []}[phase]
    before = snapshot(sd)
    ref = snapshot(before)
    fp8.merge_loras_fp8(ref, target, state=state, options=MergeOptions(tile_bytes=TILE))
    return sd, state, target, before, ref


@pytest.mark.parametrize("phase", PHASES)
def test_fp8_faults_roll_back_weights_and_scales(fp8_model, stacks, phase):
    """In-place fp8 merges (fresh scales): OOM once -> same bits as a clean run; OOM always and interrupts ->
    weights and scale tensors bit-identical."""
    assert any(v.dtype == torch.float8_e4m3fn for v in fp8_model.values())
    sd, state, target, before, ref = _fp8_phase(fp8_model, stacks, phase)
    counter = Fault(RuntimeError, lambda *a: False)
    fp8.merge_loras_fp8(snapshot(before), target, state=state, options=MergeOptions(tile_bytes=TILE, on_tile=counter))
    rng = random.Random(f"fp8{phase}")
    at = rng.randrange(counter.calls)
    fault = Fault(oom, lambda call, *_: call == at, sd, before)
    report = MergeReport()
    new_state = fp8.merge_loras_fp8(sd, target, state=state, report=report,
                                    options=MergeOptions(tile_bytes=TILE, min_tile_bytes=MIN_TILE, on_tile=fault))
    assert report.retries == 1 and fault.rollback_checks == [[]], fault.rollback_checks
    assert_same_bits(sd, ref, f"fp8 {phase}: result after a retried OOM")
    fp8.merge_loras_fp8(sd, [], state=new_state)
    assert_same_bits(sd, fp8_model, f"fp8 {phase}: restore")
    for make, kind in ((oom, torch.OutOfMemoryError), (KeyboardInterrupt, KeyboardInterrupt),
                       (Cancelled, Cancelled)):
        sd, state, target, before, _ = _fp8_phase(fp8_model, stacks, phase)
        at = rng.randrange(counter.calls)
        always = make is oom
        fault = Fault(make, (lambda *a: True) if always else (lambda call, *_, at=at: call == at))
        with pytest.raises(kind):
            fp8.merge_loras_fp8(sd, target, state=state, options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE,
                                                                              on_tile=fault))
        assert_same_bits(sd, before, f"fp8 {phase}: after {kind.__name__}")
