"""Reading and writing safetensors without trusting the file, and without holding it in memory.

`SafetensorsFile` validates the header (size, JSON, dtypes, shapes, offsets) before any tensor is
read, and never unpickles anything. `StreamingWriter` writes a file tensor by tensor into a
temporary path and renames it at the end, so a failure never leaves a partial output.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UnsafeFileError

#: Largest header we read: a Flux checkpoint's header is ~100 KiB, a LoRA's a few MiB.
MAX_HEADER_BYTES = 64 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _refuse(path: Path, problem: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: {problem}")


class SafetensorsFile:
    """A validated, lazily read safetensors file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.header, self.metadata, self.data_start = _read_validated_header(self.path)

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: str) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.header[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.header}

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor onto the CPU."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of one tensor without reading the rest."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def iter_tensors(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) one at a time, in file order unless `keys` is given."""
        with safe_open(str(self.path), framework="pt") as f:
            for key in keys if keys is not None else self.keys():
                yield key, f.get_tensor(key)


def _read_validated_header(path: Path) -> tuple[dict, dict[str, str], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(_PICKLE_MAGIC) or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
                raise _refuse(
                    path,
                    "this is a pickle (PyTorch .pt/.ckpt/.bin) file; it is never unpickled, because a pickle can "
                    "run code. Convert it to .safetensors (e.g. with a trusted script) and use that file.",
                )
            if size < 8 or len(head) < 8:
                raise _refuse(path, f"file is {size} bytes, too short to be safetensors (empty or truncated)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise _refuse(path, f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES}); not a sane safetensors file")
            if 8 + header_len > size:
                raise _refuse(path, f"header length {header_len} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(header_len)
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot read file: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"header is not valid JSON ({e}); the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise _refuse(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = size - data_start
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _refuse(path, f"entry {key!r} is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPES:
            raise _refuse(path, f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _refuse(path, f"tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _refuse(path, f"tensor {key!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _itemsize(DTYPES[dtype]):
            raise _refuse(path, f"tensor {key!r}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}")
        if offsets[1] > data_len:
            raise _refuse(path, f"tensor {key!r} runs past the end of the file (truncated download?)")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise _refuse(path, f"tensors {key!r} and {other!r} overlap in the file")
    return header, metadata, data_start


class StreamingWriter:
    """Write a safetensors file tensor by tensor; the header is fixed up front from the plan.

    Use as a context manager: on success the temporary file is renamed to `path`; on any error it
    is deleted, so no partial output is ever left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._order: list[str] = []
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for key, dtype, shape in plan:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * _itemsize(dtype)
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append(key)
            self._expected[key] = (dtype, tuple(shape))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._file = None

    def __enter__(self) -> StreamingWriter:
        self._file = open(self.tmp_path, "wb")
        self._file.write(self._header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != key:
            raise RuntimeError(f"streaming writer expected {self._order[self._next]!r}, got {key!r}")
        dtype, shape = self._expected[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{key!r}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self._order):
                exc_type = RuntimeError
                raise RuntimeError(f"streaming writer closed after {self._next} of {len(self._order)} tensors")
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
            if exc_type is None:
                os.replace(self.tmp_path, self.path)
            else:
                self.tmp_path.unlink(missing_ok=True)
