"""Bit-level checks shared by the tests: "the same" means the same dtype and bits (so -0.0 != 0.0)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that NaN == NaN and -0 != 0)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def snapshot(target: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a state dict's (or a module's) tensors."""
    items = target.state_dict().items() if isinstance(target, torch.nn.Module) else target.items()
    return {k: v.detach().clone() for k, v in items}


def differing(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose dtype or bits differ; the key sets must be equal."""
    assert a.keys() == b.keys(), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]


def assert_same_bits(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str = "") -> None:
    bad = differing(a, b)
    assert not bad, f"{what}{': ' if what else ''}{len(bad)} tensors differ in dtype or bits, e.g. {bad[:3]}"


def sha256(path: Path) -> str:
    """The file's hash, read in chunks (test files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
