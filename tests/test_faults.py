"""Injected faults: out of memory, interrupts and full disks, during merges, strength changes, restores and saves.

Engine policy under test (merge.merge_loras): any failure rolls every touched tile back to its exact previous
bits; an out-of-memory error then retries the whole call with half the tile size, down to
MergeOptions.min_tile_bytes, and raises when that is reached. Offline saves (StreamingWriter) write a hidden
temporary file and rename it only when everything succeeded.

Faults are raised from `MergeOptions.on_tile` (called before each tile is written), from inside the tile
computation (`LoRA.rows`), from the writer's file object (monkeypatched `open`), from `os.fsync` / `os.replace`,
from the offline progress callback, and, for the command line, by a real file-size limit (RLIMIT_FSIZE).
"""

from __future__ import annotations

import errno
import os
import random
import resource
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_factory import TINY, base_state_dict, write_lora
from safetensors.torch import save_file
from tensor_checks import assert_same_bits, differing, sha256, snapshot

import lora_ops.fp8 as fp8
import lora_ops.offline as offline
import lora_ops.safetensors_io as sio
from lora_ops import MergeOptions, MergeReport, load_lora, merge_loras, restore
from lora_ops.adapters import LoRA
from lora_ops.errors import LoRAFormatWarning

REPO = Path(__file__).resolve().parents[1]
BASE_SEED = 3
TILE = 8 * 1024  # a few rows per tile: every weight has several tiles
MIN_TILE = 1024
COUNTS: Counter = Counter()


pytestmark = pytest.mark.usefixtures("one_thread")


class Cancelled(Exception):
    """A custom exception a host application might raise to cancel (not a LoRAOpsError)."""


# ------------------------------------------------------------------------------------------------ helpers


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())  # hidden temporary files included


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


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory (injected)")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return base_state_dict(TINY, BASE_SEED)


@pytest.fixture(scope="module")
def stacks(base, tmp_path_factory):
    """Two stacks over the same LoRAs (LoRA, LoHa, DoRA, control-LoRA set-weights, full diff): A then B."""
    d = tmp_path_factory.mktemp("fault_loras")
    loaded = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAFormatWarning)
        for fmt, seed in (("kohya", 1), ("loha", 2), ("dora", 3), ("bfl_control", 4), ("full_diff", 5)):
            case = write_lora(fmt, d / f"{fmt}.safetensors", TINY, 4, seed, base=base)
            loaded[fmt] = load_lora(case.path)
    a = [(loaded["kohya"], 0.8), (loaded["loha"], -0.6), (loaded["dora"], 0.7), (loaded["bfl_control"], 1.0)]
    b = [(loaded["kohya"], -1.3), (loaded["dora"], 0.2), (loaded["bfl_control"], 0.5), (loaded["full_diff"], 1.7)]
    return {"A": a, "B": b, "files": [lora.path for lora in loaded.values()]}


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


# ------------------------------------------------------------------------------------------------ out of memory


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


# ------------------------------------------------------------------------------------------------ interrupts


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


# ------------------------------------------------------------------------------------------------ offline saves


@pytest.fixture()
def offline_setup(tmp_path, stacks):
    model = tmp_path / "model" / "flux.safetensors"
    model.parent.mkdir()
    save_file(base_state_dict(TINY, BASE_SEED), str(model))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    inputs = {p: sha256(p) for p in [model, *stacks["files"]]}
    stack = [(lora, s) for lora, s in stacks["A"]]
    ref = out_dir.parent / "reference.safetensors"
    offline.merge_checkpoint(model, stack, ref)
    return {"model": model, "out": out_dir, "inputs": inputs, "stack": stack, "ref": ref}


class FailingFile:
    """A real file whose write / flush / close raises OSError(ENOSPC) once `budget` bytes are written."""

    def __init__(self, f, budget: int, on: str) -> None:
        self.f, self.budget, self.on, self.written = f, budget, on, 0

    def _full(self):
        COUNTS["faults injected"] += 1
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.on == "write" and self.written + n > self.budget:
            keep = max(0, self.budget - self.written)
            self.f.write(memoryview(data).cast("B")[:keep])  # a partial write, as a full disk does
            self.written += keep
            raise self._full()
        self.written += n
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
        if self.on == "flush":
            raise self._full()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        if self.on == "close":
            raise self._full()


def _full_fsync(fd):
    """os.fsync on a full disk."""
    COUNTS["faults injected"] += 1
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _patch_writer_open(monkeypatch, budget: int, on: str) -> None:
    def fake_open(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return FailingFile(f, budget, on) if "w" in mode else f

    monkeypatch.setattr(sio, "open", fake_open, raising=False)


@pytest.mark.parametrize("where", ["header", "data-early", "data-middle", "data-last", "flush", "fsync", "close",
                                   "rename"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_disk_full_during_offline_save_leaves_nothing(offline_setup, monkeypatch, where, existing):
    s = offline_setup
    out = s["out"] / "merged.safetensors"
    if existing:
        out.write_bytes(b"an older file that must survive")
    before_listing, before_out = listing(s["out"]), (sha256(out) if existing else None)
    size = s["ref"].stat().st_size
    budget = {"header": 3, "data-early": 2000, "data-middle": size // 2, "data-last": size - 5}.get(where, 10**12)
    if where in ("header", "data-early", "data-middle", "data-last", "flush", "close"):
        _patch_writer_open(monkeypatch, budget, "write" if where.startswith(("header", "data")) else where)
    elif where == "fsync":
        monkeypatch.setattr(sio.os, "fsync", _full_fsync)
    else:
        def failing_replace(a, b):
            COUNTS["faults injected"] += 1
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(sio.os, "replace", failing_replace)
    with pytest.raises(OSError) as caught:
        offline.merge_checkpoint(s["model"], s["stack"], out)
    monkeypatch.undo()
    err = caught.value
    assert err.errno == (errno.EXDEV if where == "rename" else errno.ENOSPC)
    assert err.filename == str(out), f"the error names {err.filename!r}, not the output file"
    assert "no output was left behind" in str(err)
    assert listing(s["out"]) == before_listing, f"left behind: {set(listing(s['out'])) - set(before_listing)}"
    if existing:
        assert sha256(out) == before_out, "the existing output file was changed"
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


def test_interrupt_during_offline_save(offline_setup):
    s = offline_setup
    out = s["out"] / "merged.safetensors"
    for at in (1, 20, 60):
        def progress(done, total, at=at):
            if done == at:
                COUNTS["faults injected"] += 1
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            offline.merge_checkpoint(s["model"], s["stack"], out, progress=progress)
        assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


def _options_with(on_tile):
    real = offline.MergeOptions

    def make(**kw):
        return real(on_tile=on_tile, min_tile_bytes=MIN_TILE, tile_bytes=TILE, **kw)

    return make


def test_offline_oom_retry_gives_the_same_file(offline_setup, monkeypatch):
    s = offline_setup
    out = s["out"] / "merged.safetensors"
    calls = {"n": 0}

    def once(key, index, rows):
        calls["n"] += 1
        if calls["n"] == 40:
            COUNTS["faults injected"] += 1
            raise oom()

    monkeypatch.setattr(offline, "MergeOptions", _options_with(once))
    offline.merge_checkpoint(s["model"], s["stack"], out)
    assert calls["n"] > 40
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]
    assert sha256(out) == sha256(s["ref"]), "the file written after an OOM retry differs"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, torch.OutOfMemoryError], ids=["interrupt", "oom"])
def test_failure_with_exact_undo_off_changes_nothing(base, stacks, exc):
    sd, _, target, before, _, _ = setup_phase(base, stacks, "merge")
    fault = Fault(exc if exc is KeyboardInterrupt else oom, lambda call, *_: call >= 4)
    with pytest.raises(exc):
        merge_loras(sd, target, options=MergeOptions(tile_bytes=TILE, min_tile_bytes=TILE, exact_undo=False,
                                                     on_tile=fault))
    assert_same_bits(sd, before, f"model after {exc.__name__} with exact_undo=False")


def test_offline_final_oom_leaves_nothing(offline_setup, monkeypatch):
    s = offline_setup
    out = s["out"] / "merged.safetensors"

    def always(key, index, rows):
        COUNTS["faults injected"] += 1
        raise oom()

    monkeypatch.setattr(offline, "MergeOptions", _options_with(always))
    with pytest.raises(torch.OutOfMemoryError):
        offline.merge_checkpoint(s["model"], s["stack"], out)
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


def test_cli_disk_full_is_one_line_and_leaves_nothing(offline_setup):
    """A real write failure: the command line under a file-size limit (EFBIG, as a full disk gives ENOSPC)."""
    s = offline_setup
    out = s["out"] / "merged.safetensors"
    limit = s["ref"].stat().st_size // 2
    lora_paths = [str(lora.path) + f":{strength}" for lora, strength in s["stack"]]
    args = [sys.executable, "-m", "lora_ops", "merge", str(s["model"]), "--out", str(out), "--device", "cpu"]
    for spec in lora_paths:
        args += ["--lora", spec]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    COUNTS["faults injected"] += 1
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], run.stderr
    assert "too large" in lines[0].lower() and "free disk space" in lines[0]
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_cli_out_of_memory_is_one_line_and_leaves_nothing(offline_setup, monkeypatch, capsys, kind):
    """The command line's main() with an OOM that survives the retries: CUDA's torch.OutOfMemoryError, or the CPU
    allocator's RuntimeError ("can't allocate memory", which the engine does not retry)."""
    from lora_ops import cli

    s = offline_setup
    out = s["out"] / "merged.safetensors"

    def fail(*args, **kw):
        COUNTS["faults injected"] += 1
        if kind == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0; 23.6 GiB total)")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(offline, "merge_loras", fail)
    args = ["merge", str(s["model"]), "--out", str(out), "--device", "cpu"]
    for lora, strength in s["stack"]:
        args += ["--lora", f"{lora.path}:{strength}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory") and "Free memory" in lines[0], err
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


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


@pytest.mark.parametrize("where", ["data-middle", "fsync"])
def test_fp8_offline_save_disk_full_leaves_nothing(offline_setup, monkeypatch, where):
    s = offline_setup
    out = s["out"] / "merged_fp8.safetensors"
    if where == "fsync":
        monkeypatch.setattr(sio.os, "fsync", _full_fsync)
    else:
        _patch_writer_open(monkeypatch, s["ref"].stat().st_size // 4, "write")
    with pytest.raises(OSError) as caught:
        fp8.merge_checkpoint_fp8(s["model"], s["stack"], out)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


def test_fp8_offline_interrupt_leaves_nothing(offline_setup):
    s = offline_setup
    out = s["out"] / "merged_fp8.safetensors"

    def progress(done, total):
        if done == 7:
            COUNTS["faults injected"] += 1
            raise Cancelled

    with pytest.raises(Cancelled):
        fp8.merge_checkpoint_fp8(s["model"], s["stack"], out, progress=progress)
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\n[test_faults] counts: {dict(COUNTS)}")
