"""ComfyUI glue: merge a LoRA stack into a MODEL's shared weights when ComfyUI loads it, undo it exactly
when any other clone of the same model loads.

Why not merge when the node runs: every clone of a MODEL (every branch from one UNETLoader) shares one
torch module, and ComfyUI caches node outputs, so a merge done at execution time would leak into the
other branches and be merged twice on a re-run. What this module does instead (ComfyUI 0.3.64,
comfy/model_patcher.py and comfy/model_management.py):

* `attach_plan` returns a clone of the MODEL with a fresh `patches_uuid` (so ComfyUI knows its weights
  differ from every other clone's), the wanted stack as a patcher attachment (`attachments` are copied
  by `clone()`), and its class switched to a subclass (`_MergingPatcherMixin` + the original class;
  `clone()` builds `self.__class__`, so clones keep it).

* `load()` (called by ComfyUI's `partially_load` / `patch_model`): the stack is merged in place with
  `lora_ops.merge_loras`. Weights that ComfyUI itself will patch (a LoraLoader before or after this
  node) are merged *before* ComfyUI's `load()`, so the originals ComfyUI keeps in its backup dict hold
  base + our stack and ComfyUI's own restores (`unpatch_model`, `partially_unload` for lowvram) stay
  correct. All other weights are merged *after* it, on the device ComfyUI moved them to.

* What is merged into the shared module is recorded on the module itself (`model.flux_lora_ops_record`:
  the `MergeState` journal, weak references to the exact Parameter objects that were merged, the
  patcher uuid that owns the weights). Undo goes through ComfyUI's *shared* backup dict: the entry
  `backup["flux_lora_ops_undo"] = (weight, inplace_update=True)` makes `unpatch_model` call
  `comfy.utils.copy_to_param(model, "flux_lora_ops_undo", w)`, i.e. `model.flux_lora_ops_undo.data.copy_(w)`,
  and that object runs `lora_ops.restore` on the recorded Parameters (bit-exact). ComfyUI unpatches
  whenever a clone with another `patches_uuid` loads (`partially_load`), on `/free` and on unload, so
  any branch that loads after ours sees the untouched base weights. The entry is kept last in the dict
  so that ComfyUI's own restores run first.

* `partially_load()`: when the module holds exactly another plan of this pack and neither side has
  ComfyUI weight patches, hooks or weight wrappers, the weights are moved from the old stack to the
  new one in one pass (`merge_loras(..., state=old)`) and ComfyUI is told the weights are already the
  new clone's (`current_weight_patches_uuid`), so it neither unpatches nor reloads: a strength change
  is an in-place incremental update. In every other case ComfyUI unpatches (our undo runs), then
  `load()` merges again, both in place (no file is read again).

Interrupt: `MergeOptions.on_tile` calls `throw_exception_if_processing_interrupted()`; the engine then
rolls every touched tile back to its exact previous bits. Progress: a `comfy.utils.ProgressBar` over
the elements merged.
"""

from __future__ import annotations

import collections
import logging
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import comfy.model_management
import comfy.utils
import torch

from ..lora_ops import LoRAOpsError, MergeOptions, MergeState, ModelMismatchError, merge_loras, restore
from ..lora_ops.formats import LoRAFile, check_fits

log = logging.getLogger("flux_lora_ops")

#: Patcher attachment holding the wanted MergePlan.
ATTACHMENT = "flux_lora_ops"
#: Attribute of the shared BaseModel holding the Record of what is merged now.
RECORD_ATTR = "flux_lora_ops_record"
#: Attribute of the shared BaseModel that ComfyUI's backup dict "restores" (see _Undo).
UNDO_ATTR = "flux_lora_ops_undo"

_BackupEntry = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ComfyUI's own layout

_STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


# --------------------------------------------------------------------------------------------- stack


@dataclass(frozen=True, eq=False)
class StackEntry:
    """One LoRA of a FLUX_LORA_STACK: the parsed file and its strength."""

    name: str
    strength: float
    lora: LoRAFile


@dataclass(frozen=True, eq=False)
class MergePlan:
    """What a MODEL wants merged: the stack plus merge options (a patcher attachment, immutable)."""

    entries: tuple[StackEntry, ...]
    compute: str = "auto"  # "auto" (the model's load device), "weight" (where each weight lives), "cpu"
    tile_mb: int = 64

    def pairs(self) -> list[tuple[LoRAFile, float]]:
        return [(e.lora, float(e.strength)) for e in self.entries]

    @property
    def token(self) -> tuple:
        return _token(self.pairs())

    def describe(self) -> str:
        return ", ".join(f"{e.name} @ {e.strength:g}" for e in self.entries) or "(empty)"


def _token(pairs: Iterable[tuple[LoRAFile, float]]) -> tuple:
    # LoRAFile objects come from the pack's file cache; the record keeps them alive, so ids are stable.
    return tuple((id(lora), float(s)) for lora, s in pairs)


def _compute_device(patcher, compute: str) -> torch.device | None:
    if compute == "cpu":
        return torch.device("cpu")
    if compute == "weight":
        return None
    return torch.device(patcher.load_device)


# --------------------------------------------------------------------------------------------- record


@dataclass(eq=False)
class Record:
    """What is merged into one shared module now (lives on the BaseModel)."""

    state: MergeState
    owner: uuid.UUID | None = None  # patches_uuid of the patcher whose weights these are
    clean: bool = True  # the owner had no ComfyUI weight patches / wrappers / hooks
    compute_device: torch.device | None = None
    tile_bytes: int = 64 << 20
    names: str = ""

    @property
    def token(self) -> tuple:
        return _token(self.state.stack)


def record_of(model) -> Record | None:
    return model.__dict__.get(RECORD_ATTR)


class _Undo:
    """Stands in ComfyUI's backup dict for "put the base weights back".

    ComfyUI restores a backup entry with `inplace_update=True` through `comfy.utils.copy_to_param(model, key,
    bk.weight)`, which does `getattr(model, key).data.copy_(bk.weight)`. For our key that lands here.
    """

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)

    @property
    def data(self) -> _Undo:
        return self

    def copy_(self, *_args, **_kwargs) -> _Undo:
        model = self._model()
        if model is not None:
            undo(model)
        return self

    def __repr__(self) -> str:
        return "<flux_lora_ops undo entry>"


def _diffusion_params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.diffusion_model.named_parameters())


def _weights(model) -> dict[str, torch.Tensor]:
    """Name -> the live tensor of each diffusion-model weight (in-place writes reach the Parameter)."""
    return {k: p.data for k, p in model.diffusion_model.named_parameters()}


def _options(compute_device, tile_bytes: int, interruptible: bool, progress=None) -> MergeOptions:
    on_tile = (lambda *_: comfy.model_management.throw_exception_if_processing_interrupted()) if interruptible else None
    return MergeOptions(tile_bytes=tile_bytes, compute_device=compute_device, on_tile=on_tile, progress=progress)


def _union(stack: list[tuple[LoRAFile, float]], parts: Iterable[MergeState | None]) -> MergeState:
    """One state for a stack merged in several calls over disjoint key sets."""
    out = MergeState(list(stack))
    for part in parts:
        if part is not None:
            out.journals.update(part.journals)
            out.dora_norms.update(part.dora_norms)
    return out


def _touched(pairs: list[tuple[LoRAFile, float]]) -> set[str]:
    return {k for lora, s in pairs if s != 0.0 for k in lora.targets}


def undo(model) -> None:
    """Take the recorded stack out of the module's current weights, exactly; forget the record.

    Called last in ComfyUI's unpatch (our backup entry is kept at the end of the dict), so ComfyUI has already
    put back its own backups: whatever Parameter each name holds now (the original, or a new Parameter ComfyUI
    wrapped around the original storage, possibly moved to another device) holds base + the recorded stack.
    """
    rec = record_of(model)
    if rec is None:
        return
    try:
        restore(_weights(model), rec.state, options=_options(rec.compute_device, rec.tile_bytes, interruptible=False))
    except Exception:
        log.exception("Flux LoRA Ops: could not take %s out of the model", rec.names)
        raise
    model.__dict__.pop(RECORD_ATTR, None)
    log.info("Flux LoRA Ops: restored the base weights (took out %s)", rec.names)


def _register_undo(patcher) -> None:
    """Make sure the shared backup dict ends with our entry (ComfyUI's own restores run first)."""
    model = patcher.model
    if not isinstance(model.__dict__.get(UNDO_ATTR), _Undo):
        setattr(model, UNDO_ATTR, _Undo(model))
    entry = patcher.backup.pop(UNDO_ATTR, None)
    patcher.backup[UNDO_ATTR] = entry if entry is not None else _BackupEntry(torch.empty(0), True)


def _is_clean(patcher) -> bool:
    """No ComfyUI weight patches, weight wrappers or hooks: the weights are base + our stack only."""
    return not (
        patcher.patches
        or patcher.weight_wrapper_patches
        or patcher.hook_patches
        or patcher.hook_backup
        or patcher.current_hooks is not None
    )


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = max(int(total), 1)
        self.offset = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def part(self):
        base = self.offset

        def update(done: int, _total: int) -> None:
            self.bar.update_absolute(base + done, self.total)

        return update

    def advance(self, n: int) -> None:
        self.offset += n


def _numel(params: dict[str, torch.nn.Parameter], keys: Iterable[str]) -> int:
    return sum(params[k].numel() for k in keys if k in params)


# --------------------------------------------------------------------------------------------- merge at load


def _merge_at_load(patcher, plan: MergePlan, original_load, load_args: tuple, load_kwargs: dict):
    model = patcher.model
    rec = record_of(model)
    device = _compute_device(patcher, plan.compute)
    tile_bytes = plan.tile_mb << 20
    if rec is not None and rec.token == plan.token:
        # The module already holds this stack (ComfyUI loading more of the same weights, e.g. lowvram).
        out = original_load(*load_args, **load_kwargs)
        rec.owner = patcher.patches_uuid
        _register_undo(patcher)
        return out
    if rec is not None:
        # Weights still hold another stack that ComfyUI did not unpatch (not expected): take it out first.
        log.warning("Flux LoRA Ops: the model still held %s at load; taking it out", rec.names)
        undo(model)

    pairs = plan.pairs()
    params = _diffusion_params(model)
    touched = _touched(pairs)
    comfy_keys = {k for k in touched if "diffusion_model." + k in patcher.patches}
    rest = touched - comfy_keys
    progress = _Progress(_numel(params, touched))
    pre_state: MergeState | None = None
    pre_targets: dict[str, torch.nn.Parameter] = {}
    try:
        if comfy_keys:
            # Merged before ComfyUI patches these, so the originals it keeps in its backup hold base + our stack.
            pre_targets = {k: params[k] for k in comfy_keys}
            pre_state = merge_loras(
                {k: p.data for k, p in params.items()},
                [(lora.only(comfy_keys), s) for lora, s in pairs],
                options=_options(device, tile_bytes, True, progress.part()),
            )
            progress.advance(_numel(params, comfy_keys))
        out = original_load(*load_args, **load_kwargs)
        post_state = merge_loras(
            _weights(model),
            [(lora.only(rest), s) for lora, s in pairs],
            options=_options(device, tile_bytes, True, progress.part()),
        )
    except BaseException:
        if pre_state is not None:
            # The same Parameter objects (in the module or in ComfyUI's backup), wherever their data is now.
            restore({k: p.data for k, p in pre_targets.items()}, pre_state,
                    options=_options(device, tile_bytes, interruptible=False))
        raise
    state = _union(pairs, (pre_state, post_state))
    model.__dict__[RECORD_ATTR] = Record(
        state=state,
        owner=patcher.patches_uuid,
        clean=_is_clean(patcher),
        compute_device=device,
        tile_bytes=tile_bytes,
        names=plan.describe(),
    )
    _register_undo(patcher)
    log.info("Flux LoRA Ops: merged %s into %d weights (undo journal %.1f MiB)", plan.describe(), len(touched),
             state.journal_bytes / 2**20)
    return out


def _switch_in_place(patcher, plan: MergePlan) -> bool:
    """One-pass move from the stack another clone merged to ours, when nothing else touched the weights."""
    model = patcher.model
    rec = record_of(model)
    current = model.current_weight_patches_uuid
    if rec is None or current is None or current == patcher.patches_uuid or rec.owner != current:
        return False
    device = _compute_device(patcher, plan.compute)
    tile_bytes = plan.tile_mb << 20
    if not (rec.clean and _is_clean(patcher) and set(patcher.backup) <= {UNDO_ATTR}):
        return False
    if rec.compute_device != device or rec.tile_bytes != tile_bytes:
        return False  # the old stack must be taken out exactly as it was merged
    pairs = plan.pairs()
    params = _diffusion_params(model)
    progress = _Progress(_numel(params, _touched(pairs) | _touched(rec.state.stack)))
    new_state = merge_loras(
        _weights(model), pairs, state=rec.state, options=_options(device, tile_bytes, True, progress.part())
    )
    rec.state = new_state
    rec.owner = patcher.patches_uuid
    rec.names = plan.describe()
    model.current_weight_patches_uuid = patcher.patches_uuid
    _register_undo(patcher)
    log.info("Flux LoRA Ops: switched the merged stack in place to %s", plan.describe())
    return True


class _MergingPatcherMixin:
    """Mixed in front of the MODEL's patcher class by `attach_plan` (see the module docstring)."""

    def load(self, *args, **kwargs):
        plan = self.attachments.get(ATTACHMENT)
        if plan is None:
            return super().load(*args, **kwargs)
        return _merge_at_load(self, plan, super().load, args, kwargs)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        plan = self.attachments.get(ATTACHMENT)
        if plan is not None and _switch_in_place(self, plan):
            # The weights are now exactly this clone's; ComfyUI's force_patch_weights concerns only its
            # own patches, of which neither clone has any (checked), so it must not trigger an unpatch.
            force_patch_weights = False
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)


_CLASSES: dict[type, type] = {}


def _merging_class(base: type) -> type:
    if issubclass(base, _MergingPatcherMixin):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"FluxLoRAOps{base.__name__}", (_MergingPatcherMixin, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


# --------------------------------------------------------------------------------------------- node API


def check_model(model, entries: Iterable[StackEntry]) -> None:
    """Raise a clear error now (not at sampling) if a LoRA does not fit the MODEL or its weights."""
    base = getattr(model, "model", None)
    diffusion = getattr(base, "diffusion_model", None)
    if diffusion is None:
        raise ModelMismatchError("the MODEL input is not a diffusion model patcher (no model.diffusion_model)")
    shapes = {k: tuple(p.shape) for k, p in diffusion.named_parameters()}
    name = type(base).__name__
    for entry in entries:
        check_fits(entry.lora, shapes.get, model_name=f"this {name} model")
    dtypes = {k: p.dtype for k, p in diffusion.named_parameters()}
    for entry in entries:
        for key in entry.lora.targets:
            if dtypes[key] not in _STORAGE_DTYPES:
                raise LoRAOpsError(f"{entry.name}: weight {key!r} is stored as {dtypes[key]}, which the in-place "
                                   "merge cannot write; use a bf16/fp16/fp8 model.")
    for module_name, module in diffusion.named_modules():
        if getattr(module, "scale_weight", None) is not None:
            raise LoRAOpsError(
                f"this model stores scaled fp8 weights ({module_name}.scale_weight); merging in place into them is "
                "not supported. Load a bf16 Flux model (UNETLoader weight_dtype default), merge, then cast to fp8.")


def attach_plan(model, entries: Iterable[StackEntry], compute: str = "auto", tile_mb: int = 64):
    """A clone of `model` that merges `entries` (after any stack it already has) whenever ComfyUI loads it."""
    entries = tuple(entries)
    previous = model.attachments.get(ATTACHMENT) if hasattr(model, "attachments") else None
    if not entries:
        return model
    check_model(model, entries)
    m = model.clone()
    combined = (previous.entries if previous is not None else ()) + entries
    m.set_attachments(ATTACHMENT, MergePlan(combined, compute=compute, tile_mb=int(tile_mb)))
    m.patches_uuid = uuid.uuid4()
    m.__class__ = _merging_class(type(m))
    return m


def describe_model_state(model) -> str:
    """One line about what is merged into a shared module now (for the VRAM report)."""
    rec = record_of(model)
    if rec is None:
        return "no LoRA merged"
    return f"merged {rec.names}; undo journal {rec.state.journal_bytes / 2**20:.1f} MiB"
