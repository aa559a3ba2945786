"""The pack's nodes in a real ComfyUI server: the test LoRAs, API-format prompts, and reading back what the server
saved and logged (tests/comfyui/nodes_integration, test_quantized_server.py).

The server runs on the CPU with --bf16-unet and the 3072-wide 1+1-block Flux checkpoint. The merge engine on this
machine's CPU is slow (tens of seconds for a LoRA on every block Linear of the test model), so most LoRAs here
touch a few layers; the memory test uses the whole single block.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch
from comfy_harness import (
    FLUX_TINY_NAME,
    ComfyServer,
    free_port,
    ksampler_node,
    make_base_directory,
    read_saved_model,
)
from safetensors.torch import load_file, save_file

from lora_ops import FluxShape, load_lora, merge_loras
from lora_ops.flux import flux_weight_shapes
from lora_ops.synthetic import kohya_lora_tensors

SHAPE = FluxShape(depth=1, depth_single=1)

SMALL = ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj", "final_layer.linear", "img_in")
OTHER = ("double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.2", "single_blocks.0.linear2")
SINGLE_BLOCK = ("single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin")


# --------------------------------------------------------------------------------------------- the test LoRAs


def write_lora(path: Path, modules: tuple[str, ...], rank: int, seed: int) -> Path:
    """A kohya LoRA (lora_unet_*, alpha) on some Flux Linears; core ComfyUI reads the same file."""
    names = set(flux_weight_shapes(SHAPE))
    tensors = kohya_lora_tensors(SHAPE, rank, seed, relative_change=0.05)
    for module in modules:  # kohya_lora_tensors covers block Linears; add the others the same way
        if module.startswith(("double_blocks", "single_blocks")):
            continue
        rows, cols = flux_weight_shapes(SHAPE)[module + ".weight"]
        gen = torch.Generator().manual_seed(seed + len(module))
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"] = (torch.randn(rank, cols, generator=gen) / cols**0.5).to(torch.bfloat16)
        tensors[f"{kohya}.lora_up.weight"] = (torch.randn(rows, rank, generator=gen) * 0.002).to(torch.bfloat16)
        tensors[f"{kohya}.alpha"] = torch.tensor(float(rank))
    prefixes = tuple("lora_unet_" + m.replace(".", "_") + "." for m in modules)
    keep = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    assert all(m + ".weight" in names for m in modules)
    save_file(keep, str(path))
    return path


def fresh_merge(server: ComfyServer, base: dict, stack: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """The reference: lora_ops in this process, on a copy of the checkpoint's tensors."""
    parsed = [(load_lora(server.loras_dir / name), s) for name, s in stack]
    touched = {k for lora, _ in parsed for k in lora.targets}
    out = {k: (v.clone() if k in touched else v) for k, v in base.items()}
    merge_loras(out, parsed)
    return out


# --------------------------------------------------------------------------------------------- prompts


def unique(tag: str) -> str:
    return f"diffusion_models/{tag}_{uuid.uuid4().hex[:8]}"


def unet(name: str = FLUX_TINY_NAME) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def load_node(name: str, strength: float, stack_from: str | None = None) -> dict:
    inputs = {"lora_name": name, "strength": strength}
    if stack_from is not None:
        inputs["lora_stack"] = [stack_from, 0]
    return {"class_type": "LoadFluxLoRA", "inputs": inputs}


def merge_node(model_from: str, stack_from: str) -> dict:
    return {"class_type": "MergeLoRAIntoModel", "inputs": {"model": [model_from, 0], "lora_stack": [stack_from, 0]}}


def save_node(model_from: str, prefix: str) -> dict:
    return {"class_type": "ModelSave", "inputs": {"model": [model_from, 0], "filename_prefix": prefix}}


def sample_nodes(prompt: dict, model_from: str, tag: str, latent_prefix: str, seed: int = 5) -> str:
    """KSampler (1 euler step, 64x64) + SaveLatent on `model_from`; returns the SaveLatent node id."""
    prompt.setdefault("cond", {"class_type": "FluxLoRAOpsTestConditioning", "inputs": {"seed": 3}})
    prompt.setdefault(
        "latent", {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    )
    prompt[f"ks_{tag}"] = ksampler_node([model_from, 0], ["cond", 0], ["latent", 0], seed)
    prompt[f"sl_{tag}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"ks_{tag}", 0], "filename_prefix": latent_prefix},
    }
    return f"sl_{tag}"


# --------------------------------------------------------------------------------------------- reading back


def saved_file(server: ComfyServer, prefix: str) -> Path:
    files = sorted(server.output_dir.glob(prefix + "_*_.safetensors"))
    assert len(files) == 1, files
    return files[0]


def assert_file_equals(path: Path, expected: dict[str, torch.Tensor]) -> None:
    saved, _ = read_saved_model(path)
    assert set(saved) == set(expected)
    bad = [k for k in expected if not torch.equal(saved[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ from the expected weights, e.g. {bad[:4]}"


def latent_of(server: ComfyServer, entry: dict, node_id: str) -> torch.Tensor:
    [path] = server.output_files(entry, node_id, "latents")
    return load_file(str(path))["latent_tensor"]


def cached_nodes(entry: dict) -> set[str]:
    return {n for event, data in entry["status"]["messages"] if event == "execution_cached" for n in data["nodes"]}


def log_since(server: ComfyServer, mark: int) -> str:
    return server.log_text()[mark:]


# --------------------------------------------------------------------------------------------- the server


def settle(server: ComfyServer) -> dict:
    """Run a VRAMReport (always runs): returns once everything queued before it is done.

    The prompt holds the usual UNETLoader node, so ComfyUI's cache keeps its output (the loaded checkpoint)
    instead of dropping it as a node absent from the latest prompt.
    """
    prompt = {
        "unet": unet(),
        "r": {"class_type": "VRAMReport", "inputs": {"label": "settle", "passthrough": ["unet", 0]}},
    }
    return server.run(prompt, timeout=900)


def free(server: ComfyServer) -> None:
    """POST /free (unload_models only: node outputs stay cached, so the checkpoint stays loaded in RAM).

    ComfyUI unloads every model, unpatching it (our undo runs), before it takes the next prompt.
    """
    server.free(unload_models=True, free_memory=False)
    time.sleep(1.0)  # let the worker wake on the flag; the settle prompt then queues behind the unload
    settle(server)


def start_server(root: Path, base_dir: Path, checkpoint: Path, monkeypatch, **env: str) -> ComfyServer:
    """Another ComfyUI server (own base directory, same checkpoint, extra environment)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    make_base_directory(base_dir, checkpoint)
    server = ComfyServer(comfyui_root=root, base_dir=base_dir, log_path=base_dir / "server.log", port=free_port())
    server.start(timeout=300)
    return server
