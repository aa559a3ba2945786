"""Files broken at the byte level for the hostile-file cases (tests/hostile_files.py): safetensors-like files with
a hand-written header, valid files cut short, and pickles whose payload proves it if they are ever unpickled.

Each `make` here is a `Callable[[Path], Path]` that writes one file. Pickle files carry a `__reduce__` payload
that creates `SENTINEL` next to the file if it is ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from hostile_loras import DOWN, write_model, write_valid_lora

#: What every pickle refusal says.
PICKLE = r"pickle.*convert it to \.safetensors"
#: Name of the file a pickle payload creates when unpickled.
SENTINEL = "UNPICKLED-SENTINEL"


# ------------------------------------------------------------------------------------------------ raw bytes


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-like file: 8-byte little-endian header length, header bytes, data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)
    return path


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def f32(key: str, shape: list[int], begin: int) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {key: {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}}


def sparse_huge_header(path: Path) -> Path:
    """A 300 MB sparse file whose header length claims (nearly) all of it."""
    size = 300 * 2**20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size - 8))
        f.truncate(size)
    return path


def two_tensors(path: Path, a: list[int], b: list[int], size: int = 8, data_len: int = 16) -> Path:
    header = {"a": {"dtype": "F32", "shape": [size // 4], "data_offsets": a},
              "b": {"dtype": "F32", "shape": [size // 4], "data_offsets": b}}
    return raw_file(path, header, b"\0" * data_len)


# ------------------------------------------------------------------------------------------------ valid files cut short


def cut(fraction_or_bytes: float | int, where: str) -> Callable[[Path], Path]:
    """The valid LoRA, truncated inside its header or inside its data."""

    def make(path: Path) -> Path:
        write_valid_lora(path)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        keep = 8 + int(n * fraction_or_bytes) if where == "header" else len(raw) - int(fraction_or_bytes)
        path.write_bytes(raw[:keep])
        return path

    return make


def last_tensor_key(path: Path) -> str:
    header = header_of(path)
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def truncated_model(path: Path) -> Path:
    write_model(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    return path


# ------------------------------------------------------------------------------------------------ pickles


class Payload:
    """Unpickling this creates a directory: proof that a loader ran pickle code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def pickle_bytes(path: Path, protocol: int) -> bytes:
    return pickle.dumps({"state_dict": {"w": [0.0] * 4}, "x": Payload(str(path.parent / SENTINEL))},
                        protocol=protocol)


def pickled(protocol: int) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(pickle_bytes(path, protocol))
        return path

    return make


def torch_saved(zip_format: bool) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        obj = {DOWN: torch.zeros(4, 32), "payload": Payload(str(path.parent / SENTINEL))}
        torch.save(obj, str(path), _use_new_zipfile_serialization=zip_format)
        return path

    return make
