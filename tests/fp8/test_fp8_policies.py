"""Layer policies and the checkpoint sizes they give (lora_ops.fp8.policies)."""

from __future__ import annotations

import math

import pytest
from fp8_cases import (
    QKV,
    TINY,
)

from lora_ops import fp8
from lora_ops.errors import LoRAOpsError
from lora_ops.flux import FLUX_DEV, FluxShape, flux_weight_shapes


def test_policy_membership():
    names = list(flux_weight_shapes(TINY))
    default = set(fp8.fp8_keys(flux_weight_shapes(TINY), "default"))
    quality = set(fp8.fp8_keys(flux_weight_shapes(TINY), "quality"))
    everything = set(fp8.fp8_keys(flux_weight_shapes(TINY), "all"))
    for name in ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin", "txt_attn.qkv",
                 "txt_mod.lin", "txt_mlp.2"):
        assert f"double_blocks.0.{name}.weight" in default
    for name in ("linear1", "linear2", "modulation.lin"):
        assert f"single_blocks.0.{name}.weight" in default
    for key in names:
        if key.endswith((".bias", ".scale")):
            assert key not in everything
        if key.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")):
            assert key not in default and key not in quality
            assert key.endswith(".bias") or key in everything
    assert quality == {k for k in default if "_mod.lin" not in k and "modulation.lin" not in k}
    assert "double_blocks.0.img_mod.lin.weight" not in quality
    assert fp8.get_policy("default").selects("model.diffusion_model." + QKV)
    with pytest.raises(LoRAOpsError):
        fp8.get_policy("nope")


def test_policy_sizes_arithmetic():
    size = fp8.policy_size(FluxShape(depth=1, depth_single=1), "default")
    assert size.ratio <= 0.6
    shapes = flux_weight_shapes(FLUX_DEV)
    fp8_numel = sum(math.prod(s) for k, s in shapes.items() if fp8.PRESETS["default"].selects(k, s))
    other = sum(math.prod(s) * 2 for k, s in shapes.items() if not fp8.PRESETS["default"].selects(k, s))
    dev = fp8.policy_size(FLUX_DEV, "default")
    assert dev.fp8_bytes == fp8_numel and dev.other_bytes == other
    assert dev.total == fp8_numel + other + 4 * dev.fp8_tensors + 2
    assert dev.bf16_bytes == 2 * 11_901_408_320
    sizes = fp8.preset_sizes(FLUX_DEV)
    assert sizes["all"].total < sizes["default"].total < sizes["quality"].total < dev.bf16_bytes
    assert sizes["default"].fp8_tensors == 19 * 10 + 38 * 3
