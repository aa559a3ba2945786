"""A real ComfyUI server, an fp8 Flux checkpoint loaded by UNETLoader, and LoadFluxLoRA + MergeLoRAIntoModel on it.

Where ComfyUI has quantized tensors (0.33.0) the file is comfy_quant, UNETLoader gives Linears holding
`QuantizedTensor`s, and the merged branch's ModelSave must equal our library's fresh-scale merge of the same file
(bit for bit, scales included) while a plain branch of the same loader saves the file's own tensors; a layer in
another layout (int8_tensorwise, built by hand) is refused by name and leaves the model untouched. On 0.3.x the
file is scaled_fp8 and the pack refuses the merge with its clear error, model untouched.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_harness import read_saved_model, reads_comfy_quant
from node_server import SMALL, load_node, merge_node, save_node, saved_file, unet, unique
from node_server import write_lora as write_node_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_ops import fp8, load_lora

FP8_NAME = "flux_tiny_fp8.safetensors"
INT8_NAME = "flux_tiny_fp8_int8_layer.safetensors"
INT8_LAYER = "double_blocks.0.img_attn.proj"  # one of the LoRA's targets


def _assert_saved(path, expected: dict[str, torch.Tensor]) -> None:
    saved, _ = read_saved_model(path)
    missing = [k for k in expected if k not in saved]
    assert not missing, missing[:4]
    bad = [k for k, v in expected.items() if not _same_bits(saved[k], v)]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:4]}"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal; a 16-bit tensor ComfyUI saved in its (wider) compute dtype must convert back exactly."""
    if a.dtype != b.dtype and b.dtype in (torch.bfloat16, torch.float16) and a.dtype == torch.float32:
        a = a.to(b.dtype) if torch.equal(a.to(b.dtype).float(), a) else a
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _model_tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.endswith((".comfy_quant", "scaled_fp8"))}


def _int8_file(fp8_path, out) -> None:
    """The fp8 file with one LoRA target stored as int8_tensorwise (a layout ComfyUI loads on the CPU)."""
    tensors = load_file(str(fp8_path))
    with safe_open(str(fp8_path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors[INT8_LAYER + ".weight"] = torch.randint(-100, 100, tensors[INT8_LAYER + ".weight"].shape, dtype=torch.int8)
    tensors[INT8_LAYER + ".comfy_quant"] = fp8.comfy_quant_tensor({"format": "int8_tensorwise"})
    header = json.loads(metadata[fp8.QUANT_METADATA])
    header["layers"][INT8_LAYER] = {"format": "int8_tensorwise"}
    metadata[fp8.QUANT_METADATA] = json.dumps(header)
    save_file(tensors, str(out), metadata=metadata)


def test_merge_into_an_fp8_checkpoint_loaded_by_unetloader(comfy_server, flux_tiny_checkpoint, tmp_path):
    native = reads_comfy_quant(comfy_server.comfyui_root)
    fp8_path = comfy_server.diffusion_models_dir / FP8_NAME
    if not fp8_path.exists():
        fmt = "comfy_quant" if native else "scaled_fp8"
        fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [], fp8_path, policy="default", file_format=fmt)
    lora_name = comfy_server.add_lora(write_node_lora(tmp_path / "fp8_small.safetensors", SMALL, 8, 11))
    merged_prefix, plain_prefix = unique("fp8_merged"), unique("fp8_plain")
    prompt = {
        "unet": unet(FP8_NAME),
        "lora": load_node(lora_name, 1.0),
        "merge": merge_node("unet", "lora"),
        "save_merged": save_node("merge", merged_prefix),
        "save_plain": save_node("unet", plain_prefix),
    }
    entry = comfy_server.run(prompt, timeout=1800, check=False)
    untouched = _model_tensors(fp8_path)
    if not native:  # 0.3.x: scaled-fp8 Linears are refused with the pack's message
        assert entry["status"]["status_str"] == "error"
        assert "stores scaled fp8 weights" in comfy_server.error_summary(entry)
        comfy_server.run({"unet": unet(FP8_NAME), "save": save_node("unet", plain_prefix)}, timeout=1800)
        # 0.3.x saves the biases of scaled-fp8 Linears in fp8 too: compare the fp8 weights and their scales
        fp8_part = {k: v for k, v in untouched.items() if v.dtype == torch.float8_e4m3fn or k.endswith("scale_weight")}
        _assert_saved(saved_file(comfy_server, plain_prefix), fp8_part)
        return
    assert entry["status"]["status_str"] == "success", comfy_server.error_summary(entry)
    saved, _ = read_saved_model(saved_file(comfy_server, merged_prefix))
    # layers ComfyUI keeps unquantized are held (and merged) in its compute dtype: the library merges the same
    expected = {k: v.to(saved[k].dtype) if v.dtype != torch.float8_e4m3fn else v.clone() for k, v in untouched.items()}
    fp8.merge_loras_fp8(expected, [(load_lora(comfy_server.loras_dir / lora_name), 1.0)])
    changed = [k for k in expected if not _same_bits(expected[k], untouched[k].to(expected[k].dtype))]
    assert {k.removesuffix(".weight") for k in changed if k.endswith(".weight")} == set(SMALL)
    assert any(untouched[k].dtype == torch.float8_e4m3fn for k in changed)  # quantized layers among them
    _assert_saved(saved_file(comfy_server, merged_prefix), expected)
    _assert_saved(saved_file(comfy_server, plain_prefix), untouched)  # the other branch never sees the LoRA


@pytest.mark.comfyui_has("comfy/quant_ops.py", "class QuantizedTensor")  # 0.3.x has no quantized layouts
def test_a_layer_in_another_layout_is_refused_and_nothing_changes(comfy_server, flux_tiny_checkpoint, tmp_path):
    fp8_path = comfy_server.diffusion_models_dir / FP8_NAME
    if not fp8_path.exists():
        fp8.merge_checkpoint_fp8(flux_tiny_checkpoint, [], fp8_path, policy="default")
    _int8_file(fp8_path, comfy_server.diffusion_models_dir / INT8_NAME)
    lora_name = comfy_server.add_lora(write_node_lora(tmp_path / "int8_small.safetensors", SMALL, 8, 11))
    prompt = {
        "unet": unet(INT8_NAME),
        "lora": load_node(lora_name, 1.0),
        "merge": merge_node("unet", "lora"),
        "save": save_node("merge", unique("int8_merged")),
    }
    entry = comfy_server.run(prompt, timeout=1800, check=False)
    assert entry["status"]["status_str"] == "error"
    message = comfy_server.error_summary(entry)
    assert INT8_LAYER in message and "int8_tensorwise" in message, message
    plain_prefix = unique("int8_plain")
    comfy_server.run({"unet": unet(INT8_NAME), "save": save_node("unet", plain_prefix)}, timeout=1800)
    _assert_saved(saved_file(comfy_server, plain_prefix), _model_tensors(comfy_server.diffusion_models_dir / INT8_NAME))
