"""Runs inside ComfyUI's Python (cwd = COMFYUI_ROOT): ComfyUI's own LoRA merge of a Flux.2 checkpoint.

argv: a JSON file {"checkpoint": path, "loras": [[path, strength], ...], "out_dir": path}. Each LoRA is
applied alone the way LoraLoaderModelOnly does (model_lora_keys_unet, load_lora, add_patches) to the
model loaded in bf16 (UNETLoader's weight dtype on a GPU); the weights are patched in place on the CPU
(ModelPatcher.patch_model) and the diffusion model's state dict is saved as merged_<i>.safetensors.
Then the pack's merge node does the same on a fresh UNETLoader model (node_<i>.safetensors) and the plain
model is loaded again, which undoes the merge (base_<i>.safetensors). Prints one JSON line: the model
config class and, per LoRA, the keys ComfyUI reported as not loaded and the number of weights it patched.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch


class _NotLoaded(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("lora key not loaded"):
            self.keys.append(text.split(": ", 1)[1])


def _node_merge(comfy, spec: dict, path: str, strength: float, i: int, save_file) -> None:
    """Our MergeLoRAIntoModel on a model loaded as UNETLoader loads it, then the plain branch."""
    from inprocess import import_pack

    pack = import_pack("flux_lora_ops_probe")
    runtime = sys.modules[pack.__name__ + ".nodes.runtime"]
    model = comfy.sd.load_diffusion_model(spec["checkpoint"], model_options={"dtype": torch.bfloat16})
    entry = runtime.StackEntry("lora", strength, pack.lora_ops.load_lora(path))
    merged = runtime.attach_plan(model, [entry])
    for patcher, name in ((merged, "node"), (model, "base")):
        comfy.model_management.load_models_gpu([patcher])
        state = {k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
        save_file(state, f"{spec['out_dir']}/{name}_{i}.safetensors")
    comfy.model_management.unload_all_models()


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path[:0] = [".", str(Path(__file__).resolve().parents[1])]  # ComfyUI, and tests/ for the factory
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    result = {"loras": []}
    for i, (path, strength) in enumerate(spec["loras"]):
        model = comfy.sd.load_diffusion_model(spec["checkpoint"], model_options={"dtype": torch.bfloat16})
        result["model_config"] = type(model.model.model_config).__name__
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        handler = _NotLoaded()
        logging.getLogger().addHandler(handler)
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path)), key_map)
        logging.getLogger().removeHandler(handler)
        patcher = model.clone()
        patched = patcher.add_patches(loaded, strength)
        patcher.patch_model()
        state = {k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
        save_file(state, f"{spec['out_dir']}/merged_{i}.safetensors")
        weights = {k[0] if isinstance(k, tuple) else k for k in patched}  # q/k/v patches name (weight, offset)
        result["loras"].append({"not_loaded": handler.keys, "patched": len(weights)})
        _node_merge(comfy, spec, path, strength, i, save_file)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
