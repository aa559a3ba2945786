"""What the pack reads from a ComfyUI MODEL: its modules and weights as loaded, their sizes, whether anything else
patches them, and whether a LoRA stack fits them."""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from ..lora_ops import LoRAOpsError, ModelMismatchError, check_fits
from .plan import StackEntry
from .quantized import refuse_unwritable

#: An entry of ComfyUI's `ModelPatcher.backup` dict, in ComfyUI's own layout.
BackupEntry = collections.namedtuple("Dimension", ["weight", "inplace_update"])

_STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


def original_modules(patcher) -> dict[str, torch.nn.Module]:
    """The diffusion model's modules as loaded, seeing through object patches applied now.

    ComfyUI applies a clone's object patches (our fp8 slots among them) when it loads that clone and takes them
    out only at the next unpatch, so at node time the shared module may hold another clone's replacements;
    `object_patches_backup` (shared by all clones) holds what they replaced.
    """
    backup = getattr(patcher, "object_patches_backup", None) or {}
    out: dict[str, torch.nn.Module] = {}
    replaced: list[str] = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if any(name.startswith(r + ".") or r == "" for r in replaced):
            continue  # inside a subtree that an object patch replaced: the original's subtree is used
        original = backup.get(f"diffusion_model.{name}" if name else "diffusion_model")
        if original is None or original is module:
            out[name] = module
            continue
        replaced.append(name)
        for sub, m in original.named_modules():
            out[f"{name}.{sub}" if name and sub else name or sub] = m
    return out


def original_params(patcher) -> dict[str, torch.nn.Parameter]:
    """Name -> Parameter of the diffusion model as loaded (see original_modules)."""
    out = {}
    for name, module in original_modules(patcher).items():
        for pname, p in module.named_parameters(recurse=False):
            out[f"{name}.{pname}" if name else pname] = p
    return out


def original_size(patcher) -> int:
    """Bytes of the diffusion model's weights as loaded (what ModelPatcher.size holds for a plain model)."""
    total = 0
    for module in original_modules(patcher).values():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            total += t.numel() * t.element_size()
    other = sum(
        t.numel() * t.element_size()
        for n, t in patcher.model.state_dict().items()
        if not n.startswith("diffusion_model.")
    )
    return total + other


def diffusion_params(model) -> dict[str, torch.nn.Parameter]:
    """Name -> Parameter of the diffusion model as the module holds it now."""
    return dict(model.diffusion_model.named_parameters())


def live_weights(model) -> dict[str, torch.Tensor]:
    """Name -> the live tensor of each diffusion-model weight (in-place writes reach the Parameter)."""
    return {k: p.data for k, p in model.diffusion_model.named_parameters()}


def compute_device(patcher, compute: str) -> torch.device | None:
    """Where the merge math runs for a MergePlan.compute choice (None: where each weight lives)."""
    if compute == "cpu":
        return torch.device("cpu")
    if compute == "weight":
        return None
    return torch.device(patcher.load_device)


def is_clean(patcher) -> bool:
    """No ComfyUI weight patches, weight wrappers, hooks or replaced diffusion-model modules (object patches such
    as ModelSamplingFlux's `model_sampling` hold no weights): the weights are base + our stack only."""
    return not (
        patcher.patches
        or patcher.weight_wrapper_patches
        or patcher.hook_patches
        or patcher.hook_backup
        or patcher.current_hooks is not None
        or any(k.startswith("diffusion_model.") for k in patcher.object_patches)
    )


def check_model(model, entries: Iterable[StackEntry]) -> None:
    """Raise a clear error now (not at sampling) if a LoRA does not fit the MODEL or its weights."""
    base = getattr(model, "model", None)
    if getattr(base, "diffusion_model", None) is None or not hasattr(model, "object_patches_backup"):
        raise ModelMismatchError("the MODEL input is not a diffusion model patcher (no model.diffusion_model)")
    params = original_params(model)
    name = type(base).__name__
    for entry in entries:
        check_fits(
            entry.lora, lambda key: tuple(params[key].shape) if key in params else None, model_name=f"this {name} model"
        )
    for entry in entries:
        for key in entry.lora.targets:
            if params[key].dtype not in _STORAGE_DTYPES:
                raise LoRAOpsError(
                    f"{entry.name}: weight {key!r} is stored as {params[key].dtype}, which the in-place "
                    "merge cannot write; use a bf16/fp16/fp8 model."
                )
    modules = original_modules(model)
    for entry in entries:
        refuse_unwritable(modules, entry.lora.targets, entry.name)
    for module_name, module in modules.items():
        if getattr(module, "scale_weight", None) is not None:
            raise LoRAOpsError(
                f"this model stores scaled fp8 weights ({module_name}.scale_weight); merging in place into them is "
                "not supported. Load a bf16 Flux model (UNETLoader weight_dtype default), merge, then cast to fp8."
            )
