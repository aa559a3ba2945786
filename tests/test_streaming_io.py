"""The validated reader's plain reads and the one streamed writer that every offline output goes through."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ops.errors import UnsafeFileError
from lora_ops.offline import write_converted
from lora_ops.safetensors_io import SafetensorsFile


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
