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
  the `MergeState` journal, the plan's identity, the patcher uuid that owns the weights, the compute
  device and tile size to undo with). Undo goes through ComfyUI's *shared* backup dict: the entry
  `backup["flux_lora_ops_undo"] = (weight, inplace_update=True)` makes `unpatch_model` call
  `comfy.utils.copy_to_param(model, "flux_lora_ops_undo", w)`, i.e. `model.flux_lora_ops_undo.data.copy_(w)`,
  and that object runs `lora_ops.restore` (bit-exact) on the module's weights as they are at that moment.
  The entry is kept *last* in the dict, so ComfyUI's own restores have run by then and every weight name
  holds base + our stack (ComfyUI restores with `set_attr_param`, i.e. a *new* Parameter around the
  original storage, so the merged Parameter objects themselves cannot be tracked). ComfyUI unpatches
  whenever a clone with another `patches_uuid` loads (`partially_load`), on `/free` and on unload, so
  any branch that loads after ours sees the untouched base weights.

* ComfyUI runs nodes under `torch.inference_mode()`, so the weights are inference tensors; every engine
  call runs in inference mode, because ComfyUI's unload (`/free`) runs outside it.

* `partially_load()`: when the module holds exactly another plan of this pack and neither side has
  ComfyUI weight patches, hooks, weight wrappers, replaced diffusion modules or an fp8 step, the weights
  are moved from the old stack to the new one in one pass (`merge_loras(..., state=old)`) and ComfyUI is
  told the weights are already the new clone's (`current_weight_patches_uuid`), so it neither unpatches
  nor reloads: a strength change is an in-place incremental update. In every other case ComfyUI
  unpatches (our undo runs), then `load()` merges again, both in place (no file is read again).

* fp8 (`attach_fp8`, node CastFluxFP8): the Linears a `lora_ops.fp8` policy selects get empty `FP8Linear`
  slots as ComfyUI object patches. `load()` fills each slot from the untouched 16-bit original (found in
  `object_patches_backup`) plus the plan's LoRA terms with `quantize_merged` (merge-then-quantise, one
  rounding, fresh scale); the in-place merge skips those layers. Undo empties the slots; ComfyUI puts the
  originals back itself. The clone's `size` is the fp8 size, so ComfyUI plans VRAM for what it loads.

Interrupt: `MergeOptions.on_tile` calls `throw_exception_if_processing_interrupted()`; the engine then
rolls every touched tile back to its exact previous bits. Progress: a `comfy.utils.ProgressBar` over
the elements merged.
"""

from __future__ import annotations

import collections
import dataclasses
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
from ..lora_ops.merge import terms_by_target

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
class FP8Step:
    """Cast the Linears a policy selects to fp8 at load: FP8Linear slots swapped in by ComfyUI object patches.

    Each slot is filled from the untouched 16-bit original plus the plan's LoRA terms (merge-then-quantise,
    rounded once, fresh scale), so the originals are never modified and ComfyUI swaps them back itself.
    Slots belong to one plan (a new plan gets new slots) and are emptied when ComfyUI unpatches.
    """

    policy: str
    rounding: str
    fp8_matmul: bool
    slots: tuple[tuple[str, torch.nn.Module], ...]  # (module name under diffusion_model, FP8Linear slot)

    def describe(self) -> str:
        return f"fp8 ({self.policy}, {self.rounding} rounding, {len(self.slots)} Linears)"


@dataclass(frozen=True, eq=False)
class MergePlan:
    """What a MODEL wants at load: the LoRA stack, merge options, optionally an fp8 cast (a patcher attachment)."""

    entries: tuple[StackEntry, ...]
    compute: str = "auto"  # "auto" (the model's load device), "weight" (where each weight lives), "cpu"
    tile_mb: int = 64
    fp8: FP8Step | None = None

    def pairs(self) -> list[tuple[LoRAFile, float]]:
        return [(e.lora, float(e.strength)) for e in self.entries]

    @property
    def token(self) -> tuple:
        return (_token(self.pairs()), id(self.fp8) if self.fp8 is not None else None)

    def fp8_keys(self) -> set[str]:
        """Weights (and biases) the fp8 step produces itself; the in-place merge leaves these alone."""
        if self.fp8 is None:
            return set()
        return {f"{name}.{p}" for name, _ in self.fp8.slots for p in ("weight", "bias")}

    def describe(self) -> str:
        parts = [", ".join(f"{e.name} @ {e.strength:g}" for e in self.entries)] if self.entries else []
        if self.fp8 is not None:
            parts.append(self.fp8.describe())
        return "; ".join(parts) or "(nothing)"


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
    token: tuple = ()  # MergePlan.token of the plan merged
    owner: uuid.UUID | None = None  # patches_uuid of the patcher whose weights these are
    clean: bool = True  # the owner had no ComfyUI weight patches / wrappers / hooks / fp8 step
    compute_device: torch.device | None = None
    tile_bytes: int = 64 << 20
    names: str = ""
    fp8: FP8Step | None = None  # whose slots are filled now


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


def _diffusion_params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.diffusion_model.named_parameters())


def _weights(model) -> dict[str, torch.Tensor]:
    """Name -> the live tensor of each diffusion-model weight (in-place writes reach the Parameter)."""
    return {k: p.data for k, p in model.diffusion_model.named_parameters()}


def _options(compute_device, tile_bytes: int, interruptible: bool, progress=None) -> MergeOptions:
    on_tile = (lambda *_: comfy.model_management.throw_exception_if_processing_interrupted()) if interruptible else None
    return MergeOptions(tile_bytes=tile_bytes, compute_device=compute_device, on_tile=on_tile, progress=progress)


def _touched(pairs: list[tuple[LoRAFile, float]]) -> set[str]:
    return {k for lora, s in pairs if s != 0.0 for k in lora.targets}


def _merge(target, pairs, **kw) -> MergeState:
    # ComfyUI runs nodes under torch.inference_mode(), so the model's weights are inference tensors, which may
    # only be changed in place inside inference mode (unload / free also run outside it).
    with torch.inference_mode():
        return merge_loras(target, pairs, **kw)


def _restore(target, state: MergeState, **kw) -> None:
    with torch.inference_mode():
        restore(target, state, **kw)


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
        _restore(_weights(model), rec.state, options=_options(rec.compute_device, rec.tile_bytes, False))
    except Exception:
        # The engine rolled back, so the weights still hold the stack. ComfyUI forgets its backups after this
        # call, so leaving them merged would hand them to other branches: retry on the CPU with small tiles
        # (exact unless the merge ran on another device, then off by at most an ulp where rounding differs).
        log.exception("Flux LoRA Ops: taking %s out failed; retrying on the CPU", rec.names)
        _restore(_weights(model), rec.state, options=_options(torch.device("cpu"), 4 << 20, False))
    if rec.fp8 is not None:
        _release_slots(rec.fp8)
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
    params = _diffusion_params(model)
    touched = _touched(pairs) - plan.fp8_keys()
    comfy_keys = {k for k in touched if "diffusion_model." + k in patcher.patches}
    rest = touched - comfy_keys
    progress = _Progress(_numel(params, touched) + _slot_numel(patcher, plan))
    pre_state: MergeState | None = None
    pre_targets: dict[str, torch.nn.Parameter] = {}
    try:
        if plan.fp8 is not None:
            # Before ComfyUI's load: it then moves the filled slots to the device and patches them if asked.
            _fill_slots(patcher, plan, device, tile_bytes, progress)
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
            _weights(model),
            [(lora.only(rest), s) for lora, s in pairs],
            options=_options(device, tile_bytes, True, progress.part()),
        )
    except BaseException:
        if pre_state is not None:
            # The same Parameter objects (in the module or in ComfyUI's backup), wherever their data is now.
            _restore(
                {k: p.data for k, p in pre_targets.items()},
                pre_state,
                options=_options(device, tile_bytes, interruptible=False),
            )
        if plan.fp8 is not None:
            _release_slots(plan.fp8)
        raise
    # The state names only what was merged in place (the fp8 step's layers come from untouched originals).
    merged_pairs = pairs if plan.fp8 is None else [(lora.only(touched), s) for lora, s in pairs]
    state = MergeState.combine(merged_pairs, (pre_state, post_state))
    model.__dict__[RECORD_ATTR] = Record(
        state=state,
        token=plan.token,
        owner=patcher.patches_uuid,
        clean=_is_clean(patcher) and plan.fp8 is None,
        compute_device=device,
        tile_bytes=tile_bytes,
        names=plan.describe(),
        fp8=plan.fp8,
    )
    _register_undo(patcher)
    log.info(
        "Flux LoRA Ops: applied %s (%d weights merged in place, undo journal %.1f MiB)",
        plan.describe(),
        len(touched),
        state.journal_bytes / 2**20,
    )
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
    if not (rec.clean and _is_clean(patcher) and plan.fp8 is None and set(patcher.backup) <= {UNDO_ATTR}):
        return False
    if rec.compute_device != device or rec.tile_bytes != tile_bytes:
        return False  # the old stack must be taken out exactly as it was merged
    pairs = plan.pairs()
    params = _diffusion_params(model)
    progress = _Progress(_numel(params, _touched(pairs) | _touched(rec.state.stack)))
    new_state = _merge(
        _weights(model), pairs, state=rec.state, options=_options(device, tile_bytes, True, progress.part())
    )
    rec.state = new_state
    rec.token = plan.token
    rec.owner = patcher.patches_uuid
    rec.names = plan.describe()
    model.current_weight_patches_uuid = patcher.patches_uuid
    _register_undo(patcher)
    log.info("Flux LoRA Ops: switched the merged stack in place to %s", plan.describe())
    return True


# --------------------------------------------------------------------------------------------- fp8 step


def _fp8():
    """lora_ops.fp8, imported when first used (the nodes load without it; CastFluxFP8 then is not offered)."""
    from ..lora_ops import fp8

    return fp8


def _slot_numel(patcher, plan: MergePlan) -> int:
    if plan.fp8 is None:
        return 0
    total = 0
    for name, _ in plan.fp8.slots:
        original = patcher.object_patches_backup.get("diffusion_model." + name)
        total += original.weight.numel() if original is not None else 0
    return total


def _fill_slots(patcher, plan: MergePlan, device, tile_bytes: int, progress: _Progress) -> None:
    """Each slot := quantise(original 16-bit weight + the plan's LoRA terms), rounded once, fresh scale."""
    fp8 = _fp8()
    step = plan.fp8
    terms = terms_by_target(plan.pairs())
    for name, slot in step.slots:
        comfy.model_management.throw_exception_if_processing_interrupted()
        original = patcher.object_patches_backup.get("diffusion_model." + name)
        if original is None:  # ComfyUI applies object patches before load(), keeping what they replaced
            raise LoRAOpsError(f"fp8 cast: the original layer diffusion_model.{name} is not in the patcher's backup")
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        with torch.inference_mode():
            q, scale = fp8.quantize_merged(
                original.weight.data,
                terms.get(wkey, []),
                key=wkey,
                rounding=step.rounding,
                tile_bytes=tile_bytes,
                device=device,
            )
            bias = None
            if original.bias is not None:
                bias = fp8.merge_rows_to(
                    original.bias.data,
                    terms.get(bkey, []),
                    original.bias.dtype,
                    key=bkey,
                    tile_bytes=tile_bytes,
                    device=device,
                )
        slot.weight = torch.nn.Parameter(q, requires_grad=False)
        slot.scale_weight = scale.to(q.device)
        slot.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        slot.out_features, slot.in_features = q.shape
        progress.advance(original.weight.numel())
        progress.bar.update_absolute(progress.offset, progress.total)


def _empty_slot(slot, in_features: int) -> None:
    slot.weight = torch.nn.Parameter(torch.empty((0, in_features), dtype=torch.float8_e4m3fn), requires_grad=False)
    slot.scale_weight = torch.ones((), dtype=torch.float32)
    slot.bias = None
    slot.out_features = 0


def _release_slots(step: FP8Step) -> None:
    """Free the fp8 copies (ComfyUI swaps the originals back in right after)."""
    for _, slot in step.slots:
        _empty_slot(slot, slot.in_features)


def _make_step(model, policy: str, rounding: str, fp8_matmul: bool) -> tuple[FP8Step, int]:
    """Empty FP8Linear slots for the Linears `policy` selects, and the bytes the cast saves."""
    fp8 = _fp8()
    pol = fp8.get_policy(policy)
    if rounding not in fp8.ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {', '.join(fp8.ROUNDINGS)}")
    slots, saved = [], 0
    for name, module in original_modules(model).items():
        if isinstance(module, torch.nn.Linear) and pol.selects(f"{name}.weight", module.weight.shape):
            slot = fp8.FP8Linear.from_quantized(
                torch.empty((0, module.in_features), dtype=torch.float8_e4m3fn), 1.0, None, fp8_matmul=fp8_matmul
            )
            _empty_slot(slot, module.in_features)
            slots.append((name, slot))
            w = module.weight
            saved += w.numel() * w.element_size() - w.numel() - 4
    if not slots:
        raise LoRAOpsError(f"fp8 policy {policy!r} selects no Linear of this model; is it a Flux model?")
    return FP8Step(pol.name, rounding, bool(fp8_matmul), tuple(slots)), saved


def _apply_plan(model, plan: MergePlan):
    """A clone carrying `plan`: new patches_uuid, our patcher class, fp8 slots as object patches, fp8 size."""
    m = model.clone()
    previous = m.attachments.get(ATTACHMENT)
    if previous is not None and previous.fp8 is not None:
        for name, _ in previous.fp8.slots:
            m.object_patches.pop("diffusion_model." + name, None)
    if plan.fp8 is not None:
        step, saved = _make_step(model, plan.fp8.policy, plan.fp8.rounding, plan.fp8.fp8_matmul)
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
    for module_name, module in original_modules(model).items():
        if getattr(module, "scale_weight", None) is not None:
            raise LoRAOpsError(
                f"this model stores scaled fp8 weights ({module_name}.scale_weight); merging in place into them is "
                "not supported. Load a bf16 Flux model (UNETLoader weight_dtype default), merge, then cast to fp8."
            )


def attach_plan(model, entries: Iterable[StackEntry], compute: str = "auto", tile_mb: int = 64):
    """A clone of `model` that merges `entries` (after any stack it already has) whenever ComfyUI loads it."""
    entries = tuple(entries)
    if not entries:
        return model
    check_model(model, entries)
    previous = model.attachments.get(ATTACHMENT)
    plan = MergePlan(
        (previous.entries if previous is not None else ()) + entries,
        compute=compute,
        tile_mb=int(tile_mb),
        fp8=previous.fp8 if previous is not None else None,
    )
    return _apply_plan(model, plan)


def attach_fp8(model, policy: str = "default", rounding: str = "nearest", fp8_matmul: bool = False):
    """A clone of `model` whose selected Linears are cast to fp8 at load, after merging its LoRA stack."""
    check_model(model, ())
    previous = model.attachments.get(ATTACHMENT)
    step = FP8Step(policy, rounding, bool(fp8_matmul), ())
    if previous is None:
        plan = MergePlan((), fp8=step)
    else:
        plan = dataclasses.replace(previous, fp8=step)
    return _apply_plan(model, plan)


def describe_model_state(model) -> str:
    """One line about what is merged into a shared module now (for the VRAM report)."""
    rec = record_of(model)
    if rec is None:
        return "no LoRA merged"
    return f"merged {rec.names}; undo journal {rec.state.journal_bytes / 2**20:.1f} MiB"
