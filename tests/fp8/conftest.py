"""Fixtures of the fp8 tests: a tiny Flux state dict, two kohya LoRAs for it, and small files on disk."""

from __future__ import annotations

import pytest
import torch
from fp8_cases import SMALL, TINY

from lora_ops import load_lora
from lora_ops.formats import LoRAFile
from lora_ops.synthetic import flux_state_dict, write_flux_checkpoint, write_kohya_lora


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return flux_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> LoRAFile:
    path = write_kohya_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", TINY, rank=4, seed=3,
                            relative_change=0.1)
    return load_lora(path)


@pytest.fixture(scope="module")
def lora2(tmp_path_factory) -> LoRAFile:
    path = write_kohya_lora(tmp_path_factory.mktemp("lora2") / "l2.safetensors", TINY, rank=8, seed=4,
                            relative_change=0.05)
    return load_lora(path)




@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8files")
    ckpt = write_flux_checkpoint(d / "flux_small.safetensors", SMALL, seed=0)
    lora_path = write_kohya_lora(d / "small_lora.safetensors", SMALL, rank=8, seed=2, relative_change=0.03)
    return d, ckpt, lora_path
