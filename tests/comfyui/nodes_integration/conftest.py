"""Fixtures of the node integration tests: the checkpoint's tensors and the test LoRAs, installed in the server.

They replace, for the tests in this folder, the in-process fixtures of the same names (tests/comfyui/inprocess.py).
"""

from __future__ import annotations

import pytest
import torch
from node_server import OTHER, SINGLE_BLOCK, SMALL, write_lora
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def base(flux_tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(flux_tiny_checkpoint))


@pytest.fixture(scope="module")
def loras(comfy_server, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("node_loras")
    specs = {
        "small": (SMALL, 8, 11),
        "other": (OTHER, 4, 12),
        "single": (SINGLE_BLOCK, 32, 13),
        **{f"stack{i}": (OTHER, 16, 20 + i) for i in range(4)},
    }
    out = {}
    for name, (modules, rank, seed) in specs.items():
        out[name] = comfy_server.add_lora(write_lora(folder / f"flo_{name}.safetensors", modules, rank, seed))
    return out
