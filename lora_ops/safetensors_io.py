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
from safetensors import SafetensorError, safe_open

from .errors import UnsafeFileError
from .units import MIB

#: Largest header we read: a Flux checkpoint's header is ~100 KiB, a LoRA's a few MiB.
MAX_HEADER_BYTES = 64 * MIB

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

#: What to do about a damaged or foreign file (appended to the problem in every refusal).
FIX_CORRUPT = "The file is damaged or not a safetensors file: download or export it again."
FIX_PICKLE = (
    "It is never unpickled, because a pickle can run code. Convert it to .safetensors "
    "(e.g. with a trusted script) and use that file."
)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _refuse(path: Path, problem: str, fix: str = FIX_CORRUPT) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: {problem}. {fix}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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

    def _unreadable(self, key: str | None, e: Exception) -> UnsafeFileError:
        what = f"cannot read tensor {key!r}" if key is not None else "cannot open the file"
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e
        return _refuse(self.path, f"{what}: {detail} (was it changed or truncated after it was opened?)")

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor onto the CPU, at the validated offsets, with plain reads.

        No memory map: the file's pages stay in the page cache instead of this process's resident memory,
        and the read releases the GIL, so a thread can read the next tensor while torch works.
        """
        begin, end = self.header[key]["data_offsets"]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if end > begin else memoryview(b"")
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise OSError(0, f"the file ends {len(view) - done} bytes early")
                    done += n
        except OSError as e:
            raise self._unreadable(key, e) from None
        return tensor

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of one tensor without reading the rest."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_slice(key)[start:stop]
        except (SafetensorError, OSError) as e:
            raise self._unreadable(key, e) from None

    def iter_tensors(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) one at a time, in file order unless `keys` is given."""
        for key in keys if keys is not None else self.keys():
            yield key, self.get(key)


def _read_validated_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """Check everything `safe_open` would (and a size limit) before a tensor is read; never unpickle."""
    raw, header_len, size = _read_header_bytes(path)
    header, metadata = _parse_header(path, raw)
    data_start = 8 + header_len
    data_len = size - data_start
    spans = [_check_entry(path, key, info, data_len) for key, info in header.items()]
    _check_tiling(path, spans, data_len)
    return header, metadata, data_start


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """The raw JSON header, its length and the file size; refuses pickles, truncated files and absurd header lengths."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            # A safetensors header length can start with pickle's magic bytes (640 = 80 02 00 ..), so the
            # pickle test applies only to files whose first 9 bytes are not a plausible safetensors start.
            plausible = len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8
            if not plausible and (
                head.startswith(_PICKLE_MAGIC) or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin")
            ):
                raise _refuse(path, "this is a pickle (PyTorch .pt/.ckpt/.bin) file", FIX_PICKLE)
            if size < 8 or len(head) < 8:
                raise _refuse(path, f"file is {size} bytes, too short to be safetensors (empty or truncated)")
            (header_len,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            if header_len > MAX_HEADER_BYTES:
                raise _refuse(
                    path,
                    f"the first 8 bytes claim a {header_len}-byte header (limit {MAX_HEADER_BYTES}), so this is "
                    "not a safetensors file; if it is a PyTorch .pt/.ckpt pickle that was renamed, it is never "
                    "unpickled",
                    "Convert it to .safetensors (e.g. with a trusted script), or download the file again.",
                )
            if 8 + header_len > size:
                raise _refuse(path, f"header length {header_len} runs past the end of the {size}-byte file (truncated)")
            return f.read(header_len), header_len, size
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot read file: {e.strerror or e}. Check the path and permissions.") from None


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) from the JSON header; duplicate keys and non-string metadata refused."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise _refuse(path, f"header is not valid safetensors JSON ({problem})") from None
    if not isinstance(header, dict):
        raise _refuse(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ must map strings to strings")
    return header, metadata


def _check_entry(path: Path, key: str, info: object, data_len: int) -> tuple[int, int, str]:
    """One tensor's dtype, shape and byte span, checked against each other and the data area."""
    if not isinstance(info, dict):
        raise _refuse(path, f"entry {key!r} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype not in DTYPES:
        raise _refuse(path, f"tensor {key!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _refuse(path, f"tensor {key!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
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
    return offsets[0], offsets[1], key


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Like safetensors itself: the tensors tile the data area exactly, in offset order, no gaps, no overlaps."""
    spans.sort()
    end, previous = 0, None
    for begin, stop, key in spans:
        if begin < end:
            raise _refuse(path, f"tensors {previous!r} and {key!r} overlap in the file")
        if begin > end:
            after = f"after tensor {previous!r}" if previous is not None else "at the start of the data"
            raise _refuse(path, f"tensor {key!r} starts at byte {begin}, leaving a gap {after}")
        end, previous = stop, key
    if end != data_len:
        raise _refuse(path, f"{data_len - end} bytes after the last tensor ({previous!r}) belong to no tensor")


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

    def _write_error(self, e: OSError, key: str | None) -> OSError:
        """The OSError again, naming the output file (not the hidden temporary one) and what to do."""
        what = f"writing tensor {key!r}" if key is not None else "writing the output"
        problem = e.strerror or str(e)
        message = f"{problem} while {what}; no output was left behind (free disk space or write elsewhere)"
        return OSError(e.errno, message, str(self.path))

    def __enter__(self) -> StreamingWriter:
        try:
            self._file = open(self.tmp_path, "wb")
        except OSError as e:
            raise self._write_error(e, None) from e
        try:
            self._file.write(self._header)
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise self._write_error(e, None) from e
            raise
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != key:
            expected = self._order[self._next] if self._next < len(self._order) else "(no more tensors)"
            raise RuntimeError(f"streaming writer expected {expected!r}, got {key!r}")
        dtype, shape = self._expected[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{key!r}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            try:
                self._file.write(data.view(torch.uint8).numpy().data)
            except OSError as e:
                raise self._write_error(e, key) from e
        self._next += 1

    def _discard(self) -> None:
        """Close and delete the temporary file, whatever fails on the way."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            if self._next != len(self._order):
                raise RuntimeError(f"streaming writer closed after {self._next} of {len(self._order)} tensors")
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self.tmp_path, self.path)
            except OSError as e:
                raise self._write_error(e, None) from e
        except BaseException:
            self._discard()
            raise
