"""Undo that never lies: every merge, switch and restore leaves exactly the promised bits, or raises a clear
error (UndoError / LoRAOpsError) naming the weights, leaving the bits it found where it says so.

Covers the four ways of issue #11: an out-of-memory error inside the rollback (at every step of it), undo
computed with other arithmetic (other thread count, a simulated "other device" ΔW), restore after
exact_undo=False, and nothing checking any of it (fingerprint mismatches).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lora_factory import TINY, base_state_dict, write_lora
from safetensors.torch import save_file
from tensor_checks import differing, snapshot
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora_ops import (
    LoRAOpsError,
    MergeOptions,
    MergeReport,
    MergeState,
    load_lora,
    merge_loras,
    restore,
    restore_from_file,
)
from lora_ops.adapters import LoRA
from lora_ops.errors import LoRAFormatWarning, UndoError
from lora_ops.journal import Arithmetic, fingerprint
from lora_ops.reload import weight_fingerprint
from lora_ops.synthetic import write_kohya_lora
from lora_ops.transition import KeyJob, RollbackReserve

TILE = 8 * 1024  # several tiles per weight

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("undo_loras")
    base = base_state_dict(TINY, 3)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAFormatWarning)
        for fmt, seed in (("kohya", 1), ("loha", 2), ("dora", 3), ("bfl_control", 4)):
            out[fmt] = load_lora(write_lora(fmt, d / f"{fmt}.safetensors", TINY, 4, seed, base=base).path)
    return out


@pytest.fixture(scope="module")
def stack(loras):
    return [(loras["kohya"], 0.8), (loras["loha"], -0.6), (loras["dora"], 0.7), (loras["bfl_control"], 1.0)]


def base_of(dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    return base_state_dict(TINY, 3, dtype)


# ------------------------------------------------------------------------------------------------ 1: OOM in rollback


class RollbackFaults:
    """Counts (or fails) the steps of a rollback: re-uploading a weight's adapters and undoing each tile."""

    def __init__(self, fail_at: int | None = None, always: bool = False) -> None:
        self.fail_at, self.always, self.steps, self.active = fail_at, always, 0, False

    def step(self) -> None:
        if not self.active:
            return
        self.steps += 1
        if self.always or self.steps - 1 == self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (injected inside the rollback)")

    def install(self, monkeypatch) -> None:
        undo_tile, load_terms, rollback = KeyJob.undo_tile, KeyJob.load_terms, KeyJob.rollback

        def faulty_undo(job, r0, r1):
            self.step()
            undo_tile(job, r0, r1)

        def faulty_load(job):
            self.step()
            load_terms(job)

        def tracked(job):
            self.active = True
            try:
                rollback(job)
            finally:
                self.active = False

        monkeypatch.setattr(KeyJob, "undo_tile", faulty_undo)
        monkeypatch.setattr(KeyJob, "load_terms", faulty_load)
        monkeypatch.setattr(KeyJob, "rollback", tracked)


def fail_once_in_fourth_weight():
    """Out of memory once, at the second tile of the first weight from the 4th on that has several tiles."""
    keys: list[str] = []

    def on_tile(key, index, rows):
        if key not in keys:
            keys.append(key)
        if len(keys) >= 4 and index == 1 and not getattr(on_tile, "fired", False):
            on_tile.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected in the merge)")

    return on_tile


@pytest.mark.parametrize("phase", ["merge", "change", "restore"])
def test_oom_at_every_step_of_the_rollback_still_rolls_back_exactly(stack, phase, monkeypatch):
    """The merge fails in its 4th weight; the rollback then fails once at step k, for every k: the rollback retries
    that step in smaller pieces, the bits are checked, and only then the merge is retried: same bits as a clean run."""
    start = snapshot(base_of())
    kohya, dora = stack[0], stack[2]
    state = merge_loras(start, [kohya, dora], tile_bytes=TILE) if phase != "merge" else None
    target = {"merge": [kohya, dora], "change": [(dora[0], -0.4)], "restore": []}[phase]
    ref = snapshot(start)
    merge_loras(ref, target, state=state, tile_bytes=TILE)
    probe = RollbackFaults()
    probe.install(monkeypatch)
    merge_loras(
        snapshot(start),
        target,
        state=state,
        options=MergeOptions(tile_bytes=TILE, min_tile_bytes=1024, on_tile=fail_once_in_fourth_weight()),
    )
    assert probe.steps > 4, "the rollback had fewer steps than expected"
    for k in range(probe.steps):
        monkeypatch.undo()
        RollbackFaults(fail_at=k).install(monkeypatch)
        sd, report = snapshot(start), MergeReport()
        new_state = merge_loras(
            sd,
            target,
            state=state,
            report=report,
            options=MergeOptions(tile_bytes=TILE, min_tile_bytes=1024, on_tile=fail_once_in_fourth_weight()),
        )
        assert report.retries == 1
        assert not differing(sd, ref), f"rollback step {k} of {probe.steps} failed once: wrong bits after the retry"
        monkeypatch.undo()
        restore(sd, new_state)
        assert not differing(sd, base_of()), f"restore after a rollback with a fault at step {k}"


def test_a_rollback_that_cannot_run_is_never_retried_over(stack, monkeypatch):
    """Out of memory at every step of the rollback: UndoError names the weights it could not put back, and the
    merge is not retried (the issue's case 1 returned normally with retries=1 and 29,922 wrong elements)."""
    RollbackFaults(always=True).install(monkeypatch)
    sd, report = base_of(), MergeReport()
    with pytest.raises(UndoError) as caught:
        merge_loras(
            sd,
            stack,
            report=report,
            options=MergeOptions(tile_bytes=TILE, min_tile_bytes=1024, on_tile=fail_once_in_fourth_weight()),
        )
    assert report.retries == 0
    assert not caught.value.unchanged and len(caught.value.keys) >= 4
    assert "out of memory" in str(caught.value) and "Reload the model" in str(caught.value)


@pytest.mark.parametrize("phase", ["merge", "change"])
def test_a_failed_rollback_says_what_the_original_bits_were_so_the_file_can_repair_them(stack, phase, tmp_path,
                                                                                        monkeypatch):
    """The rollback cannot run at all: the UndoError carries, for every weight it names, the fingerprint of the
    original bits (those of the model file), and the file reloaded against them gives back exactly the original."""
    original = base_of()
    save_file(original, tmp_path / "model.safetensors")
    kohya, dora = stack[0], stack[2]
    sd = snapshot(original)
    state = merge_loras(sd, [kohya, dora], tile_bytes=TILE) if phase == "change" else None
    target = [kohya, dora] if phase == "merge" else [(dora[0], -0.4), (kohya[0], 0.2)]
    before = snapshot(sd)
    RollbackFaults(always=True).install(monkeypatch)
    with pytest.raises(UndoError) as caught:
        merge_loras(sd, target, state=state,
                    options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, on_tile=fail_once_in_fourth_weight()))
    error = caught.value
    assert not error.unchanged and len(error.keys) >= 4 and sorted(error.originals) == sorted(error.keys)
    for key, recorded in error.originals.items():
        assert torch.equal(recorded, weight_fingerprint(original[key])), key
    changed = set(differing(sd, before))
    assert changed and changed <= set(error.keys)  # the rollback did not run: only these were changed
    monkeypatch.undo()
    restore_from_file(sd, tmp_path / "model.safetensors", MergeState(fingerprints=error.originals))
    assert not differing({k: sd[k] for k in error.keys}, {k: original[k] for k in error.keys})
    assert not differing({k: v for k, v in sd.items() if k not in error.keys},
                         {k: v for k, v in before.items() if k not in error.keys})


class MemoryCap(TorchDispatchMode):
    """A device with only `cap` bytes free: counts the bytes of every tensor an op creates (not a view or an in-place
    result of its inputs) and raises out of memory past the cap. Adapters re-uploaded for a weight stay counted for
    that weight's rollback; everything else is counted per undo piece (its temporaries are freed in between)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.kept, self.piece, self.peak, self.refused = cap, 0, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.piece += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        self.peak = max(self.peak, self.kept + self.piece)
        if self.kept + self.piece > self.cap:
            self.refused += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (cap of {self.cap} bytes)")
        return out

    def install(self, monkeypatch) -> None:
        undo_tile, load_terms, rollback = KeyJob.undo_tile, KeyJob.load_terms, KeyJob.rollback

        def capped_rollback(job):
            self.kept = self.piece = 0
            with self:
                rollback(job)

        def counted_load(job):
            load_terms(job)
            self.kept, self.piece = self.kept + self.piece, 0

        def piece(job, r0, r1):
            self.piece = 0
            undo_tile(job, r0, r1)

        monkeypatch.setattr(KeyJob, "rollback", capped_rollback)
        monkeypatch.setattr(KeyJob, "load_terms", counted_load)
        monkeypatch.setattr(KeyJob, "undo_tile", piece)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("phase", ["merge", "change", "restore"])
def test_the_reserve_is_all_a_rollback_needs(loras, phase, dtype, monkeypatch):
    """Out of memory in the 4th weight, then only the call's rollback reserve is free: every weight (LoRA, LoHa, DoRA,
    full) rolls back inside it, without a single allocation refused, to exactly the bits found."""
    stack = [(loras["kohya"], 0.8), (loras["loha"], -0.6), (loras["dora"], 0.7), (loras["bfl_control"], 1.0)]
    start = base_of(dtype)
    state = merge_loras(start, stack, tile_bytes=TILE) if phase != "merge" else None
    target = {"merge": stack, "change": [(loras["dora"], -0.4), (loras["kohya"], 0.3)], "restore": []}[phase]
    found = snapshot(start)
    report = MergeReport()
    cap = MemoryCap(cap=0)
    cap.install(monkeypatch)
    hold = RollbackReserve.hold

    def cap_at_reserve(reserve, needs):
        hold(reserve, needs)
        cap.cap = reserve.nbytes

    monkeypatch.setattr(RollbackReserve, "hold", cap_at_reserve)
    with pytest.raises(torch.OutOfMemoryError, match="injected in the merge"):
        merge_loras(start, target, state=state, report=report,
                    options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, on_tile=fail_once_in_fourth_weight()))
    assert report.reserve_bytes == cap.cap > 0
    assert cap.refused == 0 and cap.peak > 0, f"the rollback needed {cap.peak} bytes, the reserve held {cap.cap}"
    assert not differing(start, found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: measures the GPU caching allocator")
@pytest.mark.parametrize("phase", ["merge", "change", "restore"])
def test_on_a_gpu_the_rollback_fits_in_what_the_reserve_frees(loras, phase, monkeypatch):
    """On CUDA: the peak memory of the rollback never exceeds what was allocated when it started (reserve still
    held), so a card filled up to the failure can always roll back; the bits are exactly those found."""
    stack = [(loras["kohya"], 0.8), (loras["loha"], -0.6), (loras["dora"], 0.7), (loras["bfl_control"], 1.0)]
    start = {k: v.cuda() for k, v in base_of().items()}
    state = merge_loras(start, stack, tile_bytes=TILE) if phase != "merge" else None
    target = {"merge": stack, "change": [(loras["dora"], -0.4), (loras["kohya"], 0.3)], "restore": []}[phase]
    found = snapshot(start)
    at_failure = []
    release = RollbackReserve.release

    def measured_release(reserve):
        torch.cuda.synchronize()
        at_failure.append(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        release(reserve)

    monkeypatch.setattr(RollbackReserve, "release", measured_release)
    with pytest.raises(torch.OutOfMemoryError, match="injected in the merge"):
        merge_loras(start, target, state=state,
                    options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, on_tile=fail_once_in_fourth_weight()))
    torch.cuda.synchronize()
    assert at_failure and torch.cuda.max_memory_allocated() <= at_failure[0]
    assert not differing(start, found)


# ------------------------------------------------------------------------------------------------ 2: other arithmetic


def rows_in_float64(self, b0, b1):
    """A ΔW computed another way (float64, rounded to fp32): stands in for another device or BLAS."""
    return (self.up[b0:b1].double() @ self.down.double()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_undo_with_other_arithmetic_is_detected_and_changes_nothing(loras, dtype, monkeypatch):
    sd = base_of(dtype)
    state = merge_loras(sd, [(loras["kohya"], 1.3)], tile_bytes=TILE)
    merged = snapshot(sd)
    monkeypatch.setattr(LoRA, "rows", rows_in_float64)
    try:
        restore(sd, state, tile_bytes=TILE)
    except UndoError as error:
        assert error.unchanged and error.keys[0] in loras["kohya"].targets
        assert error.keys[0] in str(error) and "fingerprint" in str(error)
        assert not differing(sd, merged), "a refused undo changed the weights"
        monkeypatch.undo()
        restore(sd, state, tile_bytes=TILE)  # the state is still valid: the same arithmetic undoes exactly
    else:
        # fp32 rounds ~4 % of the elements differently: the check must fire there (bf16/fp16: rarely, tiny model)
        assert dtype != torch.float32, "an fp32 undo with other arithmetic passed the fingerprint check"
    assert not differing(sd, base_of(dtype)), "an undo with other arithmetic returned wrong bits silently"


def test_fp32_undo_with_other_arithmetic_raises(loras, monkeypatch):
    sd = base_of(torch.float32)
    state = merge_loras(sd, [(loras["kohya"], 1.3)])
    monkeypatch.setattr(LoRA, "rows", rows_in_float64)
    with pytest.raises(UndoError):
        merge_loras(sd, [(loras["kohya"], 0.5)], state=state)  # a strength switch undoes too


@pytest.mark.parametrize("threads", [(2, 1), (1, 2)])
def test_undo_reuses_the_thread_count_of_the_merge(stack, threads):
    merge_threads, undo_threads = threads
    previous = torch.get_num_threads()
    seen: list[int] = []
    try:
        torch.set_num_threads(merge_threads)
        sd = base_of(torch.float32)
        state = merge_loras(sd, stack, tile_bytes=TILE)
        assert {a.threads for a in state.arithmetic.values()} == {merge_threads}
        torch.set_num_threads(undo_threads)
        original = LoRA.rows
        LoRA.rows = lambda self, b0, b1: seen.append(torch.get_num_threads()) or original(self, b0, b1)
        try:
            restore(sd, state, tile_bytes=TILE)
        finally:
            LoRA.rows = original
        assert torch.get_num_threads() == undo_threads
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {merge_threads}
    assert not differing(sd, base_of(torch.float32))


def test_undo_when_the_merge_device_is_gone_says_so_and_checks(stack):
    sd = base_of()
    state = merge_loras(sd, stack, tile_bytes=TILE)
    state.arithmetic = {k: Arithmetic("cuda:7") for k in state.arithmetic}  # merged on a GPU this machine lacks
    with pytest.warns(UserWarning, match="not available now"):
        restore(sd, state, tile_bytes=TILE)
    assert not differing(sd, base_of())  # the CPU gives the same bits here, and the fingerprint confirmed it


# ------------------------------------------------------------------------------------------------ 3: no journal


@pytest.mark.parametrize("then", ["restore", "switch"])
def test_restore_or_switch_after_exact_undo_false_refuses(stack, then):
    sd = base_of()
    state = merge_loras(sd, stack, options=MergeOptions(exact_undo=False))
    merged = snapshot(sd)
    with pytest.raises(LoRAOpsError, match="exact_undo=False") as caught:
        if then == "restore":
            restore(sd, state)
        else:
            merge_loras(sd, [(lora, s * 0.5) for lora, s in stack], state=state)
    assert "Reload the model" in str(caught.value)
    assert not differing(sd, merged)


# ------------------------------------------------------------------------------------------------ 4: fingerprints


def test_a_weight_changed_behind_the_engines_back_is_named(tmp_path):
    """One element changed by 1 ulp after the merge (where the journal does not hold the original): restore
    raises, naming the weight, and leaves the bits as it found them."""
    realistic = load_lora(write_kohya_lora(tmp_path / "r.safetensors", TINY, rank=4, relative_change=0.02))
    sd = base_of()
    state = merge_loras(sd, [(realistic, 1.0)], tile_bytes=TILE)
    key = sorted(state.fingerprints)[3]
    numel = sd[key].numel()
    journaled = set(state.journals[key].lookup(0, numel)[0].tolist()) if state.journals[key].entries else set()
    at = next(i for i in range(numel) if i not in journaled)
    sd[key].view(torch.int16).reshape(-1)[at] += 1  # one ulp, as a stray in-place op would
    tampered = snapshot(sd)
    with pytest.raises(UndoError) as caught:
        restore(sd, state, tile_bytes=TILE)
    assert caught.value.keys == [key] and caught.value.unchanged and key in str(caught.value)
    assert not differing(sd, tampered)


def test_fingerprint_sees_changes_that_cancel_in_plain_sums():
    w = torch.randn(64, 48).bfloat16()
    a = fingerprint(w, 0)
    assert torch.equal(fingerprint(w[:20], 0) + fingerprint(w[20:], 20), a)  # tiles add up
    changed = w.clone()
    ints = changed.view(torch.int16)
    ints[3, 4] += 1
    ints[3, 9] -= 1
    ints[40, 4] -= 1
    ints[40, 9] += 1  # row sums, column sums and the total all unchanged
    assert not torch.equal(fingerprint(changed, 0), a)
    assert not torch.equal(fingerprint(w, 1), a)  # the rows' position counts
    minus_zero = torch.zeros(4, 4)
    assert not torch.equal(fingerprint(-minus_zero, 0), fingerprint(minus_zero, 0))
