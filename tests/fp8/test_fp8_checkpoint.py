"""Reading fp8 checkpoints: ours, ComfyUI's, plain fp8; broken scales (lora_ops.fp8.checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from fp8_cases import E4M3, QKV, flux_module
from tensor_checks import assert_same_bits, snapshot

from lora_ops import fp8


def test_load_comfyui_style_plain_and_new_formats():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(4)) * 0.02
    q, s = fp8.quantize(w, scale_mode="exact")
    p = "model.diffusion_model."
    comfy = {p + "scaled_fp8": torch.zeros(0, dtype=E4M3), p + "x.weight": q, p + "x.scale_weight": s,
             p + "x.scale_input": torch.tensor(1.0), p + "x.bias": torch.zeros(32, dtype=torch.bfloat16)}
    ck = fp8.load_fp8_state_dict(comfy)
    assert ck.kind == "scaled_fp8" and ck.fp8_matmul is True
    assert set(ck.tensors) == {p + "x.weight", p + "x.bias"}
    assert torch.equal(ck.weight(p + "x.weight"), q.float() * s)
    assert p + "x.scale_input" in ck.input_scales
    # ComfyUI 0.3.x's own saves: biases are fp8 too, with no scale (= 1)
    comfy_saved = {**comfy, p + "x.bias": torch.full((32,), 0.5).to(E4M3)}
    saved = fp8.load_fp8_state_dict(comfy_saved)
    assert float(saved.scales[p + "x.bias"]) == 1.0 and torch.equal(saved.weight(p + "x.bias"), torch.full((32,), 0.5))
    plain = fp8.load_fp8_state_dict({"x.weight": w.to(E4M3), "x.bias": torch.zeros(32)})
    assert plain.kind == "plain_fp8" and float(plain.scales["x.weight"]) == 1.0
    assert torch.equal(plain.weight("x.weight"), w.to(E4M3).float())
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    new = fp8.load_fp8_state_dict({"x.weight": q, "x.weight_scale": s, "x.comfy_quant": conf})
    assert new.kind == "comfy_quant" and torch.equal(new.weight("x.weight"), q.float() * s)
    assert fp8.load_fp8_state_dict({"x.weight": w}).kind == "none"
    deq = fp8.dequantize_state_dict(comfy, torch.float32)
    assert torch.equal(deq[p + "x.weight"], q.float() * s)


@pytest.mark.parametrize("file_format", fp8.FILE_FORMATS)
@pytest.mark.parametrize("bad", ["missing", 0.0, -1.0, float("nan"), float("inf")])
def test_missing_or_bad_scale_is_a_clear_error(base, lora, bad, file_format):
    out = fp8.merge_to_fp8(base, [], "default", file_format=file_format)
    skey = QKV[: -len(".weight")] + (".weight_scale" if file_format == "comfy_quant" else ".scale_weight")
    if bad == "missing":
        del out[skey]
    else:
        out[skey] = torch.tensor(bad)
    before = snapshot(out)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.load_fp8_state_dict(out)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_to_fp8(out, [(lora, 1.0)], "default")
    module = flux_module(fp8.load_fp8_state_dict(fp8.merge_to_fp8(base, [], "default")).dequantized())
    fp8.cast_module_fp8(module, "default")
    layer = module.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    if bad == "missing":
        del layer.scale_weight
    else:
        layer.scale_weight.fill_(bad)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_loras_fp8(module, [(lora, 1.0)])
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_loras_fp8(out, [(lora, 1.0)])
    assert_same_bits(before, snapshot(out))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise"])
def test_comfy_quant_layers_of_other_layouts_are_refused_by_name(base, fmt, tmp_path):
    """A comfy_quant file with one nvfp4 / mxfp8 / int8 layer: a clear error naming that layer and its layout."""
    from safetensors.torch import save_file

    sd = fp8.merge_to_fp8(base, [], "default")
    layer = QKV[: -len(".weight")]
    sd[layer + ".comfy_quant"] = fp8.comfy_quant_tensor({"format": fmt})
    with pytest.raises(fp8.FP8FormatError, match=f"{layer}.*{fmt}"):
        fp8.load_fp8_state_dict(sd)
    # the same layer named only in the file header
    del sd[layer + ".comfy_quant"]
    header = {"format_version": "1.0", "layers": {layer: {"format": fmt}}}
    save_file(sd, str(tmp_path / "q.safetensors"), metadata={fp8.QUANT_METADATA: json.dumps(header)})
    with pytest.raises(fp8.FP8FormatError, match=f"{layer}.*{fmt}"):
        fp8.load_fp8_state_dict(tmp_path / "q.safetensors")
