"""The validated reader's plain reads and the one streamed writer that every offline output goes through."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from lora_factory import MERGE_FORMATS, TINY, write_lora
from safetensors.torch import load_file, save_file

from lora_ops import load_lora, merge_loras, offline
from lora_ops.errors import LoRAFormatWarning, UnsafeFileError
from lora_ops.offline import write_converted
from lora_ops.safetensors_io import SafetensorsFile
from lora_ops.synthetic import write_flux_checkpoint


def _every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        f"t.{dt}": torch.randn(5, 7, generator=gen).to(dt)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
    }
    out["t.int64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    out["t.bool"] = torch.tensor([True, False, True])
    out["t.scalar"] = torch.tensor(2.5)
    out["t.empty"] = torch.zeros(0, 4)
    return out


def test_plain_reads_give_what_safetensors_gives(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(_every_dtype(), str(path))
    theirs = load_file(str(path))
    ours = SafetensorsFile(path)
    for key, expected in theirs.items():
        got = ours.get(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key


def test_a_file_truncated_after_opening_is_refused_by_name(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(1024)}, str(path))
    opened = SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    assert torch.equal(opened.get("a"), torch.ones(64))
    with pytest.raises(UnsafeFileError) as caught:
        opened.get("b")
    message = str(caught.value)
    assert str(path) in message and "'b'" in message and "100 bytes early" in message and "download" in message


class _Doubling:
    """A conversion that doubles every tensor and fails on the key named `fail_at`."""

    def __init__(self, model: SafetensorsFile, fail_at: str | None = None) -> None:
        self.model, self.fail_at = model, fail_at

    def plan(self):
        return [("marker", torch.uint8, (1,))] + [(k, self.model.dtype(k), self.model.shape(k)) for k in self.sources()]

    def leading(self):
        return [("marker", torch.ones(1, dtype=torch.uint8))]

    def sources(self):
        return self.model.keys()

    def convert(self, key, tensor, get):
        if key == self.fail_at:
            raise ValueError(f"stop at {key}")
        return [(key, tensor * 2)]


def _model(tmp_path):
    path = tmp_path / "src.safetensors"
    save_file({f"w{i}": torch.full((300, 50), float(i)) for i in range(8)}, str(path))
    return SafetensorsFile(path)


def test_streamed_writer_writes_leading_tensors_then_every_conversion_in_order(tmp_path):
    model = _model(tmp_path)
    out = tmp_path / "out.safetensors"
    seen = []
    write_converted(model, _Doubling(model), out, {"k": "v"}, progress=lambda done, total: seen.append((done, total)))
    written = SafetensorsFile(out)
    assert written.keys() == ["marker", *model.keys()] and written.metadata == {"k": "v"}
    for i in range(8):
        assert torch.equal(written.get(f"w{i}"), torch.full((300, 50), 2.0 * i))
    assert seen == [(i, 8) for i in range(1, 9)]


def test_streamed_writer_failing_midway_leaves_nothing_and_no_threads(tmp_path):
    model = _model(tmp_path)
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="stop at w5"):
        write_converted(model, _Doubling(model, fail_at="w5"), tmp_path / "out.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
    assert set(threading.enumerate()) <= before, "reader or writer threads outlived the failed rewrite"


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    """A tiny Flux file and a stack of every LoRA format the engine merges (LoKr, LoHa, DoRA, diffs included)."""
    tmp = tmp_path_factory.mktemp("kinds")
    model = write_flux_checkpoint(tmp / "flux.safetensors", TINY, seed=3)
    base = dict(SafetensorsFile(model).iter_tensors())
    stack = []
    for i, fmt in enumerate(MERGE_FORMATS):
        case = write_lora(fmt, tmp / f"{fmt}.safetensors", TINY, rank=4, seed=10 + i, base=base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LoRAFormatWarning)  # kohya split_qkv's note about its scaling
            stack.append((load_lora(case.path), (-0.7, 0.45, 1.3)[i % 3]))
    return model, stack


@pytest.mark.parametrize("dtype", ["keep", "fp16", "fp32"])
def test_offline_merge_of_every_kind_equals_the_engine_bit_for_bit(every_kind, tmp_path, dtype):
    """The writer merges into copies without the engine's undo journal; the bits must be the engine's."""
    model, stack = every_kind
    out = tmp_path / "merged.safetensors"
    offline.merge_checkpoint(model, stack, out, dtype=dtype)
    base = SafetensorsFile(model)
    want = {"keep": None, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    work = {k: base.get(k).float() if want not in (None, torch.bfloat16) else base.get(k) for k in base.keys()}
    merge_loras(work, stack, tile_bytes=1 << 16)
    written = SafetensorsFile(out)
    differ = [k for k in base.keys() if not torch.equal(written.get(k), work[k].to(want or work[k].dtype))]
    assert not differ, f"{len(differ)} tensors differ from the in-place merge, e.g. {differ[:3]}"


def test_offline_merge_out_of_memory_retries_from_a_fresh_read(every_kind, tmp_path, monkeypatch):
    """An out-of-memory error in a tile re-reads the weight and merges it again with half the tile: same file."""
    model, stack = every_kind
    reference = tmp_path / "reference.safetensors"
    offline.merge_checkpoint(model, stack, reference)
    raised = []

    def fail_twice(key, index, rows):
        if index == 1 and len(raised) < 2 and key not in raised:  # after the first tile has changed the weight
            raised.append(key)
            raise torch.OutOfMemoryError("injected")

    real = offline.MergeOptions
    monkeypatch.setattr(
        offline, "MergeOptions", lambda **kw: real(on_tile=fail_twice, tile_bytes=1 << 16, min_tile_bytes=1 << 12, **kw)
    )
    out = tmp_path / "retried.safetensors"
    offline.merge_checkpoint(model, stack, out)
    assert len(raised) == 2 and out.read_bytes() == reference.read_bytes()
