"""ComfyUI glue: merge a LoRA stack into a MODEL's shared weights when ComfyUI loads it, undo it exactly
when any other clone of the same model loads.

Why not merge when the node runs: every clone of a MODEL (every branch from one UNETLoader) shares one
torch module, and ComfyUI caches node outputs, so a merge done at execution time would leak into the
other branches and be merged twice on a re-run. What this module does instead (ComfyUI 0.3.64,
comfy/model_patcher.py and comfy/model_management.py):

* `apply_plan` (behind runtime.attach_plan / attach_fp8) returns a clone of the MODEL with a fresh
  `patches_uuid` (so ComfyUI knows its weights differ from every other clone's), the wanted stack as a
  patcher attachment (`attachments` are copied by `clone()`), and its class switched to a subclass
  (`MergingPatcherMixin` + the original class; `clone()` builds `self.__class__`, so clones keep it).

* `load()` (called by ComfyUI's `partially_load` / `patch_model`): the stack is merged in place with
  `lora_ops.merge_loras`. Weights that ComfyUI itself will patch (a LoraLoader before or after this
  node) are merged *before* ComfyUI's `load()`, so the originals ComfyUI keeps in its backup dict hold
  base + our stack and ComfyUI's own restores (`unpatch_model`, `partially_unload` for lowvram) stay
  correct. All other weights are merged *after* it, on the device ComfyUI moved them to.

* What is merged into the shared module is recorded on the module itself (`model.flux_lora_ops_record`:
  the `MergeState` journal, the plan's identity, the patcher uuid that owns the weights, the compute
  device and tile size to undo with). Undo goes through ComfyUI's *shared* backup dict: the entry
  `backup["flux_lora_ops_undo"] = (weight, inplace_update=True)` makes `unpatch_model` call
  `comfy.utils.copy_to_param(model, "flux_lora_ops_undo", w)`, i.e. `model.flux_lora_ops_undo.data.copy_(w)`,
  and that object runs `lora_ops.restore` (bit-exact) on the module's weights as they are at that moment.
  The entry is kept *last* in the dict, so ComfyUI's own restores have run by then and every weight name
  holds base + our stack (ComfyUI restores with `set_attr_param`, i.e. a *new* Parameter around the
  original storage, so the merged Parameter objects themselves cannot be tracked). ComfyUI unpatches
  whenever a clone with another `patches_uuid` loads (`partially_load`), on `/free` and on unload, so
  any branch that loads after ours sees the untouched base weights. When an undo cannot be exact (UndoError), the
  merged weights are reloaded from the model file instead, fingerprint-checked (model_file.py); with no matching
  file the error is raised and the record stays.

* ComfyUI runs nodes under `torch.inference_mode()`, so the weights are inference tensors; every engine
  call runs in inference mode, because ComfyUI's unload (`/free`) runs outside it.

* `partially_load()`: when the module holds exactly another plan of this pack and neither side has
  ComfyUI weight patches, hooks, weight wrappers, replaced diffusion modules or an fp8 step, the weights
  are moved from the old stack to the new one in one pass (`merge_loras(..., state=old)`) and ComfyUI is
  told the weights are already the new clone's (`current_weight_patches_uuid`), so it neither unpatches
  nor reloads: a strength change is an in-place incremental update. In every other case ComfyUI
  unpatches (our undo runs), then `load()` merges again, both in place (no file is read again).

* fp8 (node CastFluxFP8, fp8_slots.py): the Linears a `lora_ops.fp8` policy selects get empty `FP8Linear`
  slots as ComfyUI object patches. `load()` fills each slot from the untouched 16-bit original (found in
  `object_patches_backup`) plus the plan's LoRA terms with `FP8Linear.fill` (merge-then-quantise, one
  rounding, fresh scale); the in-place merge skips those layers. Undo empties the slots; ComfyUI puts the
  originals back itself. The clone's `size` is the fp8 size, so ComfyUI plans VRAM for what it loads.

Interrupt: `MergeOptions.on_tile` calls `throw_exception_if_processing_interrupted()`; the engine then
rolls every touched tile back to its exact previous bits. Progress: a `comfy.utils.ProgressBar` over
the elements merged.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
import weakref
from collections.abc import Iterable

import comfy.model_management
import comfy.utils
import torch

from ..lora_ops import MIB, LoRAFile, MergeOptions, MergeState, UndoError
from . import quantized
from .dynamic import is_dynamic, load_dynamic, saved_weight
from .fp8_slots import fill_slots, make_step, release_slots, slot_numel
from .model_file import reload_merged, source_of
from .model_view import BackupEntry, compute_device, diffusion_params, is_clean, live_weights, original_size
from .plan import ATTACHMENT, RECORD_ATTR, MergePlan, Record, record_of

log = logging.getLogger("flux_lora_ops")

#: Attribute of the shared BaseModel that ComfyUI's backup dict "restores" (see _Undo).
UNDO_ATTR = "flux_lora_ops_undo"


# --------------------------------------------------------------------------------------------- undo


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


def _options(device, tile_bytes: int, interruptible: bool, progress=None) -> MergeOptions:
    on_tile = (lambda *_: comfy.model_management.throw_exception_if_processing_interrupted()) if interruptible else None
    return MergeOptions(tile_bytes=tile_bytes, compute_device=device, on_tile=on_tile, progress=progress)


def _touched(pairs: list[tuple[LoRAFile, float]]) -> set[str]:
    return {k for lora, s in pairs if s != 0.0 for k in lora.targets}


def _merge(target, pairs, **kw) -> MergeState:
    # ComfyUI runs nodes under torch.inference_mode(), so the model's weights are inference tensors, which may
    # only be changed in place inside inference mode (unload / free also run outside it).
    # Quantized weights (ComfyUI's QuantizedTensor) are merged through their payload and scale; the merge is checked.
    with torch.inference_mode():
        return quantized.merge(target, pairs, **kw)


def _restore(target, state: MergeState, **kw) -> None:
    with torch.inference_mode():
        quantized.restore_weights(target, state, **kw)


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
        _take_out(model, rec)
    except UndoError as error:
        # The undo would not give back the original bits (or could not be rolled back): never serve them as the
        # base model. They are reloaded from the model file (checked); when no file fits, the record stays, so the
        # module keeps saying what it holds, and the user must reload the model.
        if not reload_merged(model, live_weights(model), rec.state, rec.source, error):
            raise
    _forget(model, rec)
    log.info("Flux LoRA Ops: restored the base weights (took out %s)", rec.names)


def _forget(model, rec: Record) -> None:
    """The module holds the base weights again: empty the fp8 slots, drop the record."""
    if rec.fp8 is not None:
        release_slots(rec.fp8)
    model.__dict__.pop(RECORD_ATTR, None)


def _take_out(model, rec: Record) -> None:
    try:
        _restore(live_weights(model), rec.state, options=_options(rec.compute_device, rec.tile_bytes, False))
    except UndoError:
        raise
    except Exception:
        # The engine rolled back exactly (checked), so the weights still hold the stack. ComfyUI forgets its
        # backups after this call, so leaving them merged would hand them to other branches: retry with small
        # tiles. The engine recomputes with the merge's own device and threads and checks the result against the
        # original bits' fingerprint: exact, or UndoError.
        log.exception("Flux LoRA Ops: taking %s out failed; retrying with small tiles", rec.names)
        _restore(live_weights(model), rec.state, options=_options(torch.device("cpu"), 4 << 20, False))


def _register_undo(patcher) -> None:
    """Make sure the shared backup dict ends with our entry (ComfyUI's own restores run first)."""
    model = patcher.model
    if not isinstance(model.__dict__.get(UNDO_ATTR), _Undo):
        setattr(model, UNDO_ATTR, _Undo(model))
    entry = patcher.backup.pop(UNDO_ATTR, None)
    patcher.backup[UNDO_ATTR] = entry if entry is not None else BackupEntry(torch.empty(0), True)


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

    def step(self, n: int) -> None:
        """Advance by a finished piece of work and show it."""
        self.advance(n)
        self.bar.update_absolute(self.offset, self.total)


def _numel(params: dict[str, torch.nn.Parameter], keys: Iterable[str]) -> int:
    return sum(params[k].numel() for k in keys if k in params)


# --------------------------------------------------------------------------------------------- merge at load


def _merge_at_load(patcher, plan: MergePlan, original_load, load_args: tuple, load_kwargs: dict):
    model = patcher.model
    rec = record_of(model)
    device = compute_device(patcher, plan.compute)
    tile_bytes = plan.tile_mb << 20
    if rec is not None and rec.token == plan.token:
        # The module already holds this plan (ComfyUI loading more of the same weights, e.g. lowvram).
        out = original_load(*load_args, **load_kwargs)
        rec.owner = patcher.patches_uuid
        _register_undo(patcher)
        return out
    if rec is not None:
        # Weights still hold another plan that ComfyUI did not unpatch (not expected): take it out first.
        log.warning("Flux LoRA Ops: the model still held %s at load; taking it out", rec.names)
        undo(model)

    pairs = plan.pairs()
    params = diffusion_params(model)
    touched = _touched(pairs) - plan.fp8_keys()
    comfy_keys = {k for k in touched if "diffusion_model." + k in patcher.patches}
    rest = touched - comfy_keys
    progress = _Progress(_numel(params, touched) + slot_numel(patcher, plan))
    pre_state: MergeState | None = None
    pre_targets: dict[str, torch.nn.Parameter] = {}
    try:
        if plan.fp8 is not None:
            # Before ComfyUI's load: it then moves the filled slots to the device and patches them if asked.
            fill_slots(patcher, plan, device, tile_bytes, progress.step)
        if comfy_keys:
            # Merged before ComfyUI patches these, so the originals it keeps in its backup hold base + our stack.
            pre_targets = {k: params[k] for k in comfy_keys}
            pre_state = _merge(
                {k: p.data for k, p in params.items()},
                [(lora.only(comfy_keys), s) for lora, s in pairs],
                options=_options(device, tile_bytes, True, progress.part()),
            )
            progress.advance(_numel(params, comfy_keys))
        out = original_load(*load_args, **load_kwargs)
        post_state = _merge(
            live_weights(model),
            [(lora.only(rest), s) for lora, s in pairs],
            options=_options(device, tile_bytes, True, progress.part()),
        )
    except BaseException as exc:
        failure = _reload_after_failed_rollback(patcher, exc)
        _roll_back(patcher, plan, pre_targets, pre_state, _options(device, tile_bytes, interruptible=False), failure)
        if failure is exc:
            raise
        raise failure from None
    # The state names only what was merged in place (the fp8 step's layers come from untouched originals).
    merged_pairs = pairs if plan.fp8 is None else [(lora.only(touched), s) for lora, s in pairs]
    state = MergeState.combine(merged_pairs, (pre_state, post_state))
    _record(patcher, plan, state, device, tile_bytes)
    log.info(
        "Flux LoRA Ops: applied %s (%d weights merged in place, undo journal %.1f MiB)",
        plan.describe(),
        len(touched),
        state.journal_bytes / MIB,
    )
    return out


def _reload_after_failed_rollback(patcher, exc: BaseException) -> BaseException:
    """A merge of this load failed and could not be rolled back: the weights it names are reloaded from the model
    file, each checked against the fingerprint of its original bits. Returns the failure to report: the merge's
    own error once they are back, else `exc` (no file fits: the UndoError says to reload the model)."""
    if not isinstance(exc, UndoError) or not exc.originals or exc.__cause__ is None:
        return exc
    if not reload_merged(patcher.model, live_weights(patcher.model), MergeState(), source_of(patcher), exc):
        return exc
    return exc.__cause__


def _roll_back(patcher, plan: MergePlan, pre_targets: dict, pre_state: MergeState | None, options, exc) -> None:
    """A failed or interrupted load: take our pre-merge out, free the fp8 slots, leave ComfyUI as it was."""
    if pre_state is not None:
        # The same Parameter objects (in the module or in ComfyUI's backup), wherever their data is now.
        weights = {k: p.data for k, p in pre_targets.items()}
        try:
            _restore(weights, pre_state, options=options)
        except UndoError as error:
            if not reload_merged(patcher.model, weights, pre_state, source_of(patcher), error):
                raise
    if plan.fp8 is not None:
        release_slots(plan.fp8)
    if not isinstance(exc, Exception):
        # ComfyUI's partially_load puts its own patches back (detach) only for an Exception; since 0.33 an
        # interrupt is a BaseException, which would leave the model marked loaded with this clone's uuid.
        patcher.detach()


def _record(patcher, plan: MergePlan, state: MergeState, device, tile_bytes: int) -> None:
    """Note on the shared module what is merged now, and make ComfyUI's unpatch call our undo."""
    patcher.model.__dict__[RECORD_ATTR] = Record(
        state=state,
        token=plan.token,
        owner=patcher.patches_uuid,
        clean=is_clean(patcher) and plan.fp8 is None,
        compute_device=device,
        tile_bytes=tile_bytes,
        names=plan.describe(),
        fp8=plan.fp8,
        source=source_of(patcher),
    )
    _register_undo(patcher)


def _switch_in_place(patcher, plan: MergePlan) -> bool:
    """One-pass move from the stack another clone merged to ours, when nothing else touched the weights."""
    model = patcher.model
    rec = record_of(model)
    current = model.current_weight_patches_uuid
    if rec is None or current is None or current == patcher.patches_uuid or rec.owner != current:
        return False
    device = compute_device(patcher, plan.compute)
    tile_bytes = plan.tile_mb << 20
    if not (rec.clean and is_clean(patcher) and plan.fp8 is None and set(patcher.backup) <= {UNDO_ATTR}):
        return False
    if rec.compute_device != device or rec.tile_bytes != tile_bytes:
        return False  # the old stack must be taken out exactly as it was merged
    pairs = plan.pairs()
    params = diffusion_params(model)
    progress = _Progress(_numel(params, _touched(pairs) | _touched(rec.state.stack)))
    try:
        new_state = _merge(
            live_weights(model), pairs, state=rec.state, options=_options(device, tile_bytes, True, progress.part())
        )
    except UndoError as error:
        # The old stack cannot be taken out exactly: reload its weights from the model file; ComfyUI then unpatches
        # (nothing left to undo) and load() merges the new stack into the reloaded base.
        if not reload_merged(model, live_weights(model), rec.state, rec.source, error):
            raise
        _forget(model, rec)
        return False
    rec.state = new_state
    rec.token = plan.token
    rec.owner = patcher.patches_uuid
    rec.names = plan.describe()
    model.current_weight_patches_uuid = patcher.patches_uuid
    _register_undo(patcher)
    log.info("Flux LoRA Ops: switched the merged stack in place to %s", plan.describe())
    return True


def apply_plan(model, plan: MergePlan):
    """A clone carrying `plan`: new patches_uuid, our patcher class, fp8 slots as object patches, fp8 size."""
    m = model.clone()
    previous = m.attachments.get(ATTACHMENT)
    if previous is not None and previous.fp8 is not None:
        for name, _ in previous.fp8.slots:
            m.object_patches.pop("diffusion_model." + name, None)
    if plan.fp8 is not None:
        step, saved = make_step(model, plan.fp8.policy, plan.fp8.rounding, plan.fp8.fp8_matmul)
        plan = dataclasses.replace(plan, fp8=step)  # fresh slots: never shared with another stack
        for name, slot in step.slots:
            m.add_object_patch("diffusion_model." + name, slot)
        m.size = original_size(model) - saved
    elif previous is not None and previous.fp8 is not None:
        m.size = original_size(model)
    m.set_attachments(ATTACHMENT, plan)
    m.patches_uuid = uuid.uuid4()
    m.__class__ = _merging_class(type(m))
    return m


class MergingPatcherMixin:
    """Mixed in front of the MODEL's patcher class by `apply_plan` (see the module docstring)."""

    def load(self, *args, **kwargs):
        plan = self.attachments.get(ATTACHMENT)
        if plan is None:
            return super().load(*args, **kwargs)
        if is_dynamic(self):
            return load_dynamic(self, plan, super().load, args, kwargs)
        return _merge_at_load(self, plan, super().load, args, kwargs)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        plan = self.attachments.get(ATTACHMENT)
        if plan is not None and not is_dynamic(self) and _switch_in_place(self, plan):
            # The weights are now exactly this clone's; ComfyUI's force_patch_weights concerns only its
            # own patches, of which neither clone has any (checked), so it must not trigger an unpatch.
            force_patch_weights = False
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)

    def patch_weight_to_device(self, key, *args, **kwargs):
        out = super().patch_weight_to_device(key, *args, **kwargs)
        if kwargs.get("return_weight") and is_dynamic(self) and ATTACHMENT in self.attachments:
            return saved_weight(self, key, out)  # ModelSave under dynamic VRAM reads weights this way
        return out


_CLASSES: dict[type, type] = {}


def _merging_class(base: type) -> type:
    if issubclass(base, MergingPatcherMixin):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"FluxLoRAOps{base.__name__}", (MergingPatcherMixin, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls
