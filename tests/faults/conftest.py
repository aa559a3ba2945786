"""Fixtures of the fault tests: the model and two stacks over the same LoRAs, and the per-module count of the faults
injected (printed at the end of each module)."""

from __future__ import annotations

import warnings

import pytest
import torch
from fault_kit import BASE_SEED, COUNTS
from lora_factory import TINY, base_state_dict, write_lora

from lora_ops import load_lora
from lora_ops.errors import LoRAFormatWarning


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


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    COUNTS.clear()
    yield
    print(f"\n[{request.module.__name__}] counts: {dict(COUNTS)}")
