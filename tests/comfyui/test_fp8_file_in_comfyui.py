"""Our fp8 files, loaded by UNETLoader's loader (`comfy.sd.load_diffusion_model`) in this ComfyUI: the fp8 bits and
scales ComfyUI holds are ours, bit for bit, and so is what it dequantises (merge-then-quantise of the 3072-wide test
checkpoint + a LoRA).

Each tree gets the format it reads natively: comfy_quant where ComfyUI has quantized tensors (0.33.0), scaled_fp8 on
0.3.x (0.3.64). Where comfy_quant is native, the scaled_fp8 file is checked too (ComfyUI translates it on load).
"""

from __future__ import annotations

import torch
from comfy_harness import reads_comfy_quant

from lora_ops import fp8, load_lora
from lora_ops.flux import FluxShape
from lora_ops.synthetic import write_kohya_lora

LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "img_in")


def fp8_formats(root) -> list[str]:
    """The fp8 file formats this ComfyUI reads, its native one first."""
    return ["comfy_quant", "scaled_fp8"] if reads_comfy_quant(root) else ["scaled_fp8"]


def held_parts(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 payload, scale, dequantised weight) of a Linear as ComfyUI holds it: a QuantizedTensor (newer ComfyUI)
    or an fp8 weight with `scale_weight` (0.3.x scaled-fp8 ops)."""
    w = module.weight
    if hasattr(w, "_qdata"):
        return w._qdata, w._params.scale, w.dequantize()
    deq = w.to(torch.bfloat16) * module.scale_weight.to(torch.bfloat16)
    return w.data, module.scale_weight, deq


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_comfyui_loads_our_fp8_file_with_our_exact_values(comfy, comfyui_root, flux_tiny_checkpoint, tmp_path):
    import comfy.sd

    lora = load_lora(write_kohya_lora(tmp_path / "lora.safetensors", FluxShape(depth=1, depth_single=1), rank=8))
    for file_format in fp8_formats(comfyui_root):
        out = tmp_path / f"flux_{file_format}.safetensors"
        fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [(lora, 1.0)], out, policy="all", file_format=file_format)
        ours = fp8.load_fp8_state_dict(out)
        assert ours.kind == file_format
        patcher = comfy.sd.load_diffusion_model(str(out))
        model = patcher.model.diffusion_model
        for name in LAYERS:
            key = name + ".weight"
            payload, scale, deq = held_parts(model.get_submodule(name))
            assert payload.dtype == torch.float8_e4m3fn and torch.equal(bits(payload), bits(ours.tensors[key])), name
            assert float(scale) == float(ours.scales[key]), name
            mine = ours.tensors[key].float() * ours.scales[key]
            assert torch.equal(deq, mine.to(deq.dtype)), (file_format, name)  # ComfyUI's weights are ours
            x = torch.randn(4, deq.shape[1], dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
            m = model.get_submodule(name)
            y, y_ref = m(x).float(), torch.nn.functional.linear(x.float(), mine, ours.weight(name + ".bias"))
            assert float((y - y_ref).norm() / y_ref.norm()) < 1e-2, (file_format, name)
        del patcher, model
