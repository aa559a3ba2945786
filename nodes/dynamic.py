"""Dynamic VRAM (ComfyUI's ModelPatcherDynamic, 0.33+): the stack is added when ComfyUI casts each weight to the GPU.

Under dynamic VRAM the model's weights are read-only views of the checkpoint file and ComfyUI pages them into VRAM
on demand, so the classic in-place merge is impossible (and would reach every clone). Instead, at `load()`:

* every merged weight that ComfyUI pages gets a `CastTimeMerge` as its `<param>_lowvram_function`, the hook ComfyUI
  itself uses for LoRAs there (comfy/ops.py `resolve_cast_module_with_vbar`): when the weight is cast, the stack is
  added to the cast copy by `lora_ops.merge_loras` (same engine, same bits as the in-place merge, tile-bounded
  temporaries). ComfyUI caches the result in VRAM under the patcher's `patches_uuid`, which every plan has its own
  of, so a strength change or another branch recomputes it and never sees ours.
* weights ComfyUI loads whole (small layers it "force loads" as copies, with the original in `backup`) are replaced
  by merged copies; ComfyUI's own `restore_loaded_backups` puts the originals back when another clone loads.
* ModelSave reads weights through `patch_weight_to_device(return_weight=True)`; `saved_weight` adds the stack there.

Nothing is written into the base weights, so nothing needs undoing; a core LoRA on the same weight is applied by
ComfyUI's own `LowVramPatch` first and ours on top of its result.
"""

from __future__ import annotations

import logging
import weakref

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..lora_ops import LoRAFile, LoRAOpsError, MergeOptions, merge_loras
from .fp8_slots import fill_slots, release_slots
from .model_view import BackupEntry, compute_device
from .plan import MergePlan
from .quantized import is_quantized

log = logging.getLogger("flux_lora_ops")

_PREFIX = "diffusion_model."
#: Attribute of the shared BaseModel naming the fp8 step whose slots are filled now (dynamic VRAM only).
FILLED_ATTR = "flux_lora_ops_filled"


def is_dynamic(patcher) -> bool:
    """True for ComfyUI's ModelPatcherDynamic (0.33+ with dynamic VRAM); 0.3.x patchers have no is_dynamic."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if check is not None else False


def _add_stack(weight: torch.Tensor, pairs: list[tuple[LoRAFile, float]], key: str, tile_bytes: int) -> None:
    """weight += the stack, in place, with the merge engine (no undo journal: the tensor is a copy)."""
    options = MergeOptions(tile_bytes=tile_bytes, compute_device=weight.device, exact_undo=False)
    with torch.inference_mode():
        merge_loras({key: weight}, pairs, options=options)


class CastTimeMerge(comfy.model_patcher.LowVramPatch):
    """A weight's `_lowvram_function` under dynamic VRAM: ComfyUI's patches for it (if any), then our stack.

    It is a LowVramPatch so that ComfyUI's cast path (prefetch, pinning) treats it like its own; with no core
    patches for the weight it asks for no transfer buffer.
    """

    def __init__(self, full_key: str, core_patches: dict, pairs, tile_bytes: int, module: torch.nn.Module, param: str):
        super().__init__(full_key, core_patches if full_key in core_patches else {full_key: []})
        self.bare = full_key.removeprefix(_PREFIX)
        self.pairs = pairs
        self.tile_bytes = tile_bytes
        self.param = param
        self._module = weakref.ref(module)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.patches[self.key]:
            weight = super().__call__(weight)
        try:
            return self.merged(weight)
        except BaseException:
            module = self._module()
            if module is not None:  # ComfyUI marked the VRAM copy valid before calling us: make it recompute
                module._v_signature = None
            raise

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The stack added to a cast copy of the weight, rounded to the stored dtype as the in-place merge rounds."""
        module = self._module()
        stored = getattr(module, self.param, None) if module is not None else None
        plain = type(stored) in (torch.Tensor, torch.nn.Parameter)  # a QuantizedTensor arrives dequantised: keep it
        w = weight.to(stored.dtype) if plain else weight
        if plain and w.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr():
            w = w.clone()  # never write into the base weights
        _add_stack(w, self.pairs, self.bare, self.tile_bytes)
        return w.to(weight.dtype)


def _refuse_quantized(weight, full_key: str, what: str) -> None:
    if is_quantized(weight):
        raise LoRAOpsError(
            f"{full_key.removeprefix(_PREFIX)} is {what} under dynamic VRAM, which the pack cannot merge into yet; "
            "start ComfyUI with --disable-dynamic-vram for this model (nothing was changed)."
        )


def _split(full_key: str) -> tuple[str, str]:
    module, _, param = full_key.rpartition(".")
    return module, param


def _stack_for(plan: MergePlan, bare: str) -> list[tuple[LoRAFile, float]]:
    return [(lora.only({bare}), s) for lora, s in plan.pairs() if s != 0.0 and bare in lora.targets]


def _merged_copy(patcher, full_key: str, pairs, tile_bytes: int) -> None:
    """Replace a weight ComfyUI loaded whole by a merged copy; the original stays in `backup` for ComfyUI to restore."""
    current = comfy.utils.get_attr(patcher.model, full_key)
    _refuse_quantized(current, full_key, "a quantized layer ComfyUI loads whole")
    if full_key not in patcher.backup:
        patcher.backup[full_key] = BackupEntry(current, False)
    with torch.inference_mode():
        merged = current.data.clone()
    _add_stack(merged, pairs, full_key.removeprefix(_PREFIX), tile_bytes)
    comfy.utils.set_attr_param(patcher.model, full_key, merged)


def _release_previous_slots(model, plan: MergePlan) -> None:
    previous = model.__dict__.pop(FILLED_ATTR, None)
    if previous is not None and previous is not plan.fp8:
        release_slots(previous)


def load_dynamic(patcher, plan: MergePlan, original_load, load_args: tuple, load_kwargs: dict):
    """ModelPatcherDynamic.load with the plan attached at cast time (see the module docstring)."""
    model = patcher.model
    try:
        comfy.model_management.throw_exception_if_processing_interrupted()
        _release_previous_slots(model, plan)
        if plan.fp8 is not None:
            fill_slots(patcher, plan, compute_device(patcher, plan.compute), plan.tile_mb << 20, lambda _n: None)
            model.__dict__[FILLED_ATTR] = plan.fp8
        out = original_load(*load_args, **load_kwargs)
        _attach(patcher, plan)
    except BaseException as exc:
        if model.__dict__.pop(FILLED_ATTR, None) is not None:
            release_slots(plan.fp8)
        if not isinstance(exc, Exception):  # an interrupt: ComfyUI detaches only on an Exception (see lifecycle)
            patcher.detach()
        raise
    return out


def _attach(patcher, plan: MergePlan) -> None:
    """Our stack on every weight it changes: a cast-time merge where ComfyUI pages, a merged copy elsewhere."""
    model = patcher.model
    tile_bytes = plan.tile_mb << 20
    skip = plan.fp8_keys()
    if plan.fp8 is not None:
        # ComfyUI backs up whatever sits at a weight's path, our slot's fp8 tensors included, and would restore
        # them into the original layer once the slot is swapped out: the slots own their tensors, nothing to restore.
        for name, _ in plan.fp8.slots:
            for suffix in (".weight", ".bias"):
                patcher.backup.pop(_PREFIX + name + suffix, None)
            patcher.backup_buffers.pop(_PREFIX + name + ".scale_weight", None)
    at_cast = copied = 0
    for bare in sorted({k for lora, s in plan.pairs() if s != 0.0 for k in lora.targets} - skip):
        full_key = _PREFIX + bare
        pairs = _stack_for(plan, bare)
        module_name, param = _split(full_key)
        module = comfy.utils.get_attr(model, module_name)
        if full_key in patcher.backup or not hasattr(module, "comfy_cast_weights"):
            _merged_copy(patcher, full_key, pairs, tile_bytes)
            copied += 1
        else:
            fn = CastTimeMerge(full_key, patcher.patches, pairs, tile_bytes, module, param)
            fn._pin_state = model.dynamic_pins[patcher.load_device]
            setattr(module, param + "_lowvram_function", fn)
            at_cast += 1
    log.info(
        "Flux LoRA Ops: %s under dynamic VRAM: %d weights merged when cast to the GPU, %d small ones as copies",
        plan.describe(),
        at_cast,
        copied,
    )


def saved_weight(patcher, full_key: str, weight: torch.Tensor) -> torch.Tensor:
    """What ModelSave writes for a weight under dynamic VRAM: ComfyUI's result plus our stack where we cast-merge."""
    module_name, param = _split(full_key)
    try:
        module = comfy.utils.get_attr(patcher.model, module_name)
    except AttributeError:
        return weight
    fn = getattr(module, param + "_lowvram_function", None)
    if not isinstance(fn, CastTimeMerge):
        return weight
    _refuse_quantized(weight, full_key, "a quantized layer to save")
    return fn.merged(weight)
