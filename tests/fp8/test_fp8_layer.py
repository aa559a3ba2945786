"""FP8Linear, casting and loading a module by policy (lora_ops.fp8.layer)."""

from __future__ import annotations

import json

import pytest
import torch
from fp8_cases import E4M3, QKV, flux_module
from tensor_checks import bits

from lora_ops import fp8
from lora_ops.adapters import Diff, LoRA
from lora_ops.errors import LoRAFormatError, ModelMismatchError
from lora_ops.merge import terms_by_target


def test_fp8_linear_forward_and_comfy_protocol():
    lin = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    f = fp8.FP8Linear.from_linear(lin, key="x.weight")
    assert f.weight.dtype == E4M3 and f.bias.dtype == torch.bfloat16
    assert set(f.state_dict()) == {"weight", "weight_scale", "comfy_quant", "bias"}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, 64, dtype=dtype)
        y = f(x)
        assert y.dtype == dtype and y.shape == (5, 7, 48)
        ref = torch.nn.functional.linear(x.float(), f.weight.float() * f.scale_weight, f.bias.float())
        assert torch.allclose(y.float(), ref, rtol=0.02, atol=1e-3)
    exact = f(torch.eye(64)).t() - f.bias.float()[:, None]
    assert torch.allclose(exact, f.weight.float() * f.scale_weight, atol=1e-6)
    # ComfyUI's convert_weight / set_weight: a round trip keeps the bits and the scale
    w = f.convert_weight(f.weight.float())
    q = f.set_weight(w, return_weight=True)
    assert torch.equal(bits(q), bits(f.weight))
    f.fp8_matmul = True
    y = f(torch.randn(2, 64))  # CPU: the guarded _scaled_mm path is skipped
    assert y.shape == (2, 48)


def test_cast_module_by_policy_matches_merge_to_fp8(base):
    module = flux_module(base)
    report = fp8.cast_module_fp8(module, "quality")
    expected = fp8.merge_to_fp8(base, [], "quality", file_format="scaled_fp8")
    assert sorted(report.converted) == sorted(k for k, v in expected.items() if v.dtype == E4M3 and v.dim() == 2)
    layer = module.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    assert isinstance(layer, fp8.FP8Linear)
    assert torch.equal(bits(layer.weight), bits(expected[QKV]))
    assert torch.equal(layer.scale_weight, expected[QKV.replace(".weight", ".scale_weight")])
    assert isinstance(module.get_submodule("diffusion_model.double_blocks.0.img_mod.lin"), torch.nn.Linear)
    assert not isinstance(module.get_submodule("diffusion_model.img_in"), fp8.FP8Linear)
    assert report.bytes_after < report.bytes_before / 1.9
    # the module's state dict is a ComfyUI scaled-fp8 state dict (plus the marker)
    sd = {k.removeprefix("diffusion_model."): v for k, v in module.state_dict().items()}
    sd["scaled_fp8"] = torch.zeros(2, dtype=E4M3)
    assert fp8.load_fp8_state_dict(sd).kind == "scaled_fp8"


def test_cast_module_validates_before_swapping(base):
    bad = dict(base)
    bad["single_blocks.0.linear2.weight"] = base["single_blocks.0.linear2.weight"].clone()
    bad["single_blocks.0.linear2.weight"][3, 3] = float("nan")
    module = flux_module(bad)
    with pytest.raises(fp8.FP8FormatError, match="NaN"):
        fp8.cast_module_fp8(module)
    assert not any(isinstance(m, fp8.FP8Linear) for m in module.modules())


def test_load_fp8_into_module(base, lora):
    out = fp8.merge_to_fp8(base, [(lora, 1.0)], "default")
    module = flux_module(base)
    report = fp8.load_fp8_into_module(module, out)
    assert len(report.converted) == sum(1 for v in out.values() if v.dtype == E4M3 and v.dim() == 2)
    layer = module.get_submodule("diffusion_model.single_blocks.0.linear1")
    assert torch.equal(bits(layer.weight), bits(out["single_blocks.0.linear1.weight"]))
    assert torch.equal(module.get_submodule("diffusion_model.img_in").weight, out["img_in.weight"])


def test_slot_empty_fill_release(base, lora):
    """A node-owned slot: empty (no rows), filled = merge_to_fp8 of the same weight bit for bit, released."""
    name = QKV[: -len(".weight")]
    weight, bias = base[QKV], base[name + ".bias"]
    slot = fp8.FP8Linear.empty(weight.shape[1])
    assert slot.is_empty and slot.weight.numel() == 0 and slot.bias is None
    bias_diff = torch.linspace(-0.01, 0.01, bias.shape[0])
    bias_terms = [(Diff(bias_diff, source_keys=("test.diff_b",), scale=1.0), 0.5)]
    terms = terms_by_target([(lora, 0.8)])
    slot.fill(weight, bias, terms=terms[QKV], bias_terms=bias_terms, name=name, rounding="stochastic", seed=3)
    expected = fp8.merge_to_fp8({QKV: weight}, [(lora.only({QKV}), 0.8)], "default", rounding="stochastic", seed=3,
                                 file_format="scaled_fp8")
    assert not slot.is_empty and slot.out_features == weight.shape[0]
    assert torch.equal(bits(slot.weight), bits(expected[QKV]))
    assert torch.equal(slot.scale_weight, expected[name + ".scale_weight"])
    assert slot.bias.dtype == bias.dtype
    assert torch.equal(slot.bias, (bias.float() + 0.5 * bias_diff).to(bias.dtype))
    x = torch.randn(3, weight.shape[1])
    ref = torch.nn.functional.linear(x, slot.weight.float() * slot.scale_weight, slot.bias.float())
    assert torch.allclose(slot(x), ref, atol=1e-6)
    slot.release()
    assert slot.is_empty and slot.weight.numel() == 0 and slot.bias is None and slot.in_features == weight.shape[1]


def test_slot_fill_failure_leaves_the_slot_unchanged(base):
    name = QKV[: -len(".weight")]
    weight, bias = base[QKV], base[name + ".bias"]
    slot = fp8.FP8Linear.empty(weight.shape[1])
    slot.fill(weight, bias, name=name)
    before = {k: v.clone() for k, v in slot.state_dict().items()}
    up = torch.randn(weight.shape[0], 2)
    up[5, 0] = float("inf")
    bad = [(LoRA(up, torch.randn(2, weight.shape[1]), source_keys=("bad.lora_up.weight",), scale=1.0), 1.0)]
    with pytest.raises(LoRAFormatError, match="NaN or Inf"):
        slot.fill(weight, bias, terms=bad, name=name)
    with pytest.raises(ModelMismatchError, match="input features"):
        slot.fill(weight[:, :-1], bias, name=name)
    after = slot.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(bits(before[k]), bits(after[k])) for k in before)


@pytest.mark.parametrize("file_format", fp8.FILE_FORMATS)
def test_fp8_linear_state_dict_in_either_file_format_reads_back(file_format):
    """What ModelSave writes of a cast layer: comfy_quant names (default) or 0.3.x's scaled_fp8 names."""
    lin = torch.nn.Linear(32, 16, dtype=torch.bfloat16)
    f = fp8.FP8Linear.from_linear(lin, key="x.weight")
    f.file_format = file_format
    sd = f.state_dict()
    if file_format == "comfy_quant":
        assert set(sd) == {"weight", "weight_scale", "comfy_quant", "bias"}
        assert json.loads(bytes(sd["comfy_quant"].tolist())) == fp8.comfy_quant_layer(False)
        assert fp8.load_fp8_state_dict({f"x.{k}": v for k, v in sd.items()}).kind == "comfy_quant"
    else:
        assert set(sd) == {"weight", "scale_weight", "bias"}
    back = fp8.FP8Linear(32, 16)
    back.load_state_dict(sd)
    assert torch.equal(back.weight.view(torch.uint8), f.weight.view(torch.uint8))
    assert torch.equal(back.scale_weight, f.scale_weight) and torch.equal(back.bias, f.bias)
