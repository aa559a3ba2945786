"""The shipped example workflows against a real ComfyUI server.

* Every UI-format workflow (example_workflows/*.json, what users open) uses only node types the server knows,
  every link's type matches the source output and the target input in /object_info, and every node has as many
  widget values as the server's node definition has widgets.
* Every API-format twin (example_workflows/api/<name>.api.json; kept in a subfolder so that ComfyUI's template
  list shows only the UI files) is queued and must run. The test server has no text encoder, VAE or real Flux
  weights, so before queueing, this test (and only this test) substitutes: CLIPTextEncode / FluxGuidance /
  ConditioningZeroOut -> the test-only FluxLoRAOpsTestConditioning node; DualCLIPLoader and VAELoader removed;
  VAEDecode + SaveImage -> SaveLatent; the checkpoint and LoRA file names -> the test files; 64x64 latents and
  1 sampling step. Everything of this pack (LoadFluxLoRA, MergeLoRAIntoModel, CastFluxFP8, VRAMReport) and the
  core PreviewAny / PreviewImage nodes run as shipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from comfy_harness import FLUX_TINY_NAME, REPO_ROOT
from safetensors.torch import load_file, save_file

from lora_ops import FluxShape
from lora_ops.flux import FLUX2_DEV
from lora_ops.synthetic import kohya_lora_tensors, write_flux_checkpoint

EXAMPLES = REPO_ROOT / "example_workflows"
UI_FILES = sorted(EXAMPLES.glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EXPECTED = {
    "flux_big_lora_merged",
    "lora_block_weights",
    "merged_then_fp8",
    "several_loras_stacked",
    "vram_report_before_after",
    "flux2_lora_merged_fp8",
}


#: Flux.2 stand-in for the Flux.2 example: real key names (ComfyUI detects it as Flux.2 by its shared modulation),
#: 1 + 1 blocks, width 256; its txt_in reads the test conditioning's 4096-wide tokens.
FLUX2_TINY = dataclasses.replace(FLUX2_DEV, hidden=256, heads=2, depth=1, depth_single=1, context_dim=4096)
FLUX2_TINY_NAME = "flux2_tiny.safetensors"


#: The Flux.2 example needs a ComfyUI with Flux.2 (EmptyFlux2LatentImage, CLIPLoader type flux2): deselected on
#: 0.3.64 (conftest's comfyui_has marker), never skipped.
NEEDS_FLUX2 = pytest.mark.comfyui_has("comfy_extras/nodes_flux.py", "class EmptyFlux2LatentImage")
EXAMPLE_PARAMS = [pytest.param(f, marks=NEEDS_FLUX2 if f.stem.startswith("flux2") else ()) for f in UI_FILES]


def api_twin(ui_file: Path) -> Path:
    return EXAMPLES / "api" / f"{ui_file.stem}.api.json"


def test_every_example_has_an_api_twin():
    assert {f.stem for f in UI_FILES} == EXPECTED
    for f in UI_FILES:
        assert api_twin(f).is_file(), f


def _inputs(info: dict) -> dict[str, tuple[str, dict]]:
    out = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            out[name] = (spec[0] if isinstance(spec[0], str) else "COMBO", spec[1] if len(spec) > 1 else {})
    return out


def _compatible(a: str, b: str) -> bool:
    return a == b or "*" in (a, b)


@pytest.mark.parametrize("ui_file", EXAMPLE_PARAMS, ids=lambda p: p.stem)
def test_ui_workflow_matches_object_info(comfy_server, ui_file):
    info = comfy_server.object_info()
    wf = json.loads(ui_file.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    missing = sorted({n["type"] for n in wf["nodes"]} - set(info))
    assert not missing, f"{ui_file.name}: node types the server does not know: {missing}"
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        assert nodes[src]["outputs"][src_slot]["type"] == out_type == link_type, (ui_file.name, link_id)
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id, (ui_file.name, link_id)
        in_type = _inputs(info[nodes[dst]["type"]])[target["name"]][0]
        assert _compatible(link_type, in_type), (ui_file.name, link_id, link_type, in_type)
    for node in wf["nodes"]:
        spec = _inputs(info[node["type"]])
        widgets = [name for name, (kind, opts) in spec.items() if kind in WIDGET_TYPES and not opts.get("forceInput")]
        expected = len(widgets) + sum(1 for name in widgets if name in ("seed", "noise_seed"))
        assert len(node.get("widgets_values", [])) == expected, (ui_file.name, node["type"], node["widgets_values"])
        for socket in node["inputs"]:
            assert socket["name"] in spec, (ui_file.name, node["type"], socket["name"])
            required = socket["name"] in info[node["type"]]["input"].get("required", {})
            assert socket["link"] is not None or not required, (ui_file.name, node["type"], socket["name"])


# --------------------------------------------------------------------------------------------- running the twins


@pytest.fixture(scope="module")
def example_loras(comfy_server, tmp_path_factory) -> dict[str, str]:
    """Small kohya LoRAs (a few Linears of the test checkpoint) standing in for the examples' file names."""
    shape = FluxShape(depth=1, depth_single=1)
    folder = tmp_path_factory.mktemp("example_loras")
    modules = {
        "my_flux_lora.safetensors": ("double_blocks.0.img_attn.proj", "single_blocks.0.linear2"),
        "style_lora.safetensors": ("double_blocks.0.txt_attn.proj",),
        "character_lora.safetensors": ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_mlp.2"),
        "detail_lora.safetensors": ("single_blocks.0.linear2",),
    }
    out = {}
    for i, (name, targets) in enumerate(modules.items()):
        tensors = kohya_lora_tensors(shape, 8, seed=40 + i, relative_change=0.05)
        prefixes = tuple("lora_unet_" + m.replace(".", "_") + "." for m in targets)
        path = folder / f"example_{name}"
        save_file({k: v for k, v in tensors.items() if k.startswith(prefixes)}, str(path))
        out[name] = comfy_server.add_lora(path)
    write_flux_checkpoint(comfy_server.diffusion_models_dir / FLUX2_TINY_NAME, FLUX2_TINY, seed=5)
    tensors = kohya_lora_tensors(FLUX2_TINY, 16, seed=50, relative_change=0.05)
    prefixes = ("lora_unet_double_blocks_0_img_attn_proj.", "lora_unet_single_blocks_0_linear2.")
    path = folder / "example_my_flux2_lora.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith(prefixes)}, str(path))
    out["my_flux2_lora.safetensors"] = comfy_server.add_lora(path)
    return out


def for_test(api: dict, lora_names: dict[str, str], tag: str) -> dict:
    """The substitutions described in the module docstring (the test server has no CLIP / VAE / Flux weights)."""
    prompt = copy.deepcopy(api)
    decoded = {}
    for nid, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            flux2 = inputs["unet_name"].startswith("flux2")
            inputs.update(unet_name=FLUX2_TINY_NAME if flux2 else FLUX_TINY_NAME, weight_dtype="default")
        elif kind == "LoadFluxLoRA":
            inputs["lora_name"] = lora_names[inputs["lora_name"]]
        elif kind in ("DualCLIPLoader", "CLIPLoader", "VAELoader"):
            del prompt[nid]
        elif kind in ("CLIPTextEncode", "ConditioningZeroOut"):
            prompt[nid] = {"class_type": "FluxLoRAOpsTestConditioning", "inputs": {"seed": 3}}
        elif kind == "FluxGuidance":
            prompt[nid] = {
                "class_type": "FluxLoRAOpsTestConditioning",
                "inputs": {"seed": 3, "guidance": inputs["guidance"]},
            }
        elif kind in ("EmptySD3LatentImage", "EmptyFlux2LatentImage"):
            inputs.update(width=64, height=64, batch_size=1)
        elif kind == "KSampler":
            inputs["steps"] = 1
        elif kind == "VAEDecode":
            decoded[nid] = inputs["samples"]
            del prompt[nid]
    for nid, node in list(prompt.items()):
        images = node["inputs"].get("images")
        if node["class_type"] == "SaveImage" and images and images[0] in decoded:
            prompt[nid] = {
                "class_type": "SaveLatent",
                "inputs": {"samples": decoded[images[0]], "filename_prefix": f"latents/{tag}"},
            }
    return prompt


@pytest.mark.parametrize("ui_file", EXAMPLE_PARAMS, ids=lambda p: p.stem)
def test_api_twin_runs(comfy_server, example_loras, ui_file):
    api = json.loads(api_twin(ui_file).read_text())
    ui_types = sorted(n["type"] for n in json.loads(ui_file.read_text())["nodes"])
    assert sorted(n["class_type"] for n in api.values()) == ui_types  # the twin is the same graph
    prompt = for_test(api, example_loras, f"example_{ui_file.stem}")
    entry = comfy_server.run(prompt, timeout=1800)
    outputs = entry["outputs"]
    [saver] = [nid for nid, n in prompt.items() if n["class_type"] == "SaveLatent"]
    [latent_path] = comfy_server.output_files(entry, saver, "latents")
    latent = load_file(str(latent_path))["latent_tensor"]
    flux2 = ui_file.stem.startswith("flux2")
    assert latent.shape == ((1, 128, 4, 4) if flux2 else (1, 16, 8, 8)) and torch.isfinite(latent).all()
    previews = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewAny"]
    texts = [outputs[nid]["text"][0] for nid in previews]
    assert texts and all(texts), outputs
    if ui_file.stem == "vram_report_before_after":
        assert any("VRAM report: before merge" in t for t in texts)
        assert any("VRAM report: after merge + sampling" in t and "merged " in t for t in texts)
        # next to what is used, 'will this fit' for the model at 1024x1024 (the pack's planner, as loaded)
        assert all("Will this fit? Sampling 1024x1024" in t and "sampling peak" in t for t in texts)
        charts = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewImage"]
        assert len(charts) == 2 and all(outputs[nid]["images"] for nid in charts)
    else:
        assert any("unmapped" in t and "Flux weights changed" in t for t in texts)
    if flux2:  # the planner on the merged, fp8-cast Flux.2 model as ComfyUI loaded it
        assert any("Will this fit? Sampling 1024x1024" in t and "Flux.2" in t and "fp8" in t for t in texts), texts
    if ui_file.stem == "lora_block_weights":
        assert any("[blocks style: late single blocks]" in t for t in texts), texts
    if ui_file.stem == "merged_then_fp8":
        cast = [nid for nid, n in prompt.items() if n["class_type"] == "CastFluxFP8"]
        assert "fp8 (default" in outputs[cast[0]]["text"][0]
