"""Injected faults during offline saves and on the command line: full disks, interrupts and out of memory.

Offline saves (StreamingWriter) write a hidden temporary file and rename it only when everything succeeded: after
any fault no file is left in the output folder, an existing output file is unchanged, and the inputs are
byte-identical. Faults are raised from the writer's file object (monkeypatched `open`), from `os.fsync` /
`os.replace`, from the offline progress callback and the merge's on_tile hook, and, for the command line, by a
real file-size limit (RLIMIT_FSIZE).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_kit import BASE_SEED, COUNTS, MIN_TILE, TILE, Cancelled, oom, raise_at
from lora_factory import TINY, base_state_dict
from safetensors.torch import save_file
from tensor_checks import sha256

import lora_ops.fp8 as fp8
import lora_ops.offline as offline
import lora_ops.safetensors_io as sio

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())  # hidden temporary files included


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
        with pytest.raises(KeyboardInterrupt):
            offline.merge_checkpoint(s["model"], s["stack"], out, progress=raise_at(at, KeyboardInterrupt))
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
    with pytest.raises(Cancelled):
        fp8.merge_checkpoint_fp8(s["model"], s["stack"], out, progress=raise_at(7, Cancelled))
    assert listing(s["out"]) == []
    assert {p: sha256(p) for p in s["inputs"]} == s["inputs"]
