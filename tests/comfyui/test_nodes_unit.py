"""The ComfyUI nodes in-process, against ComfyUI's real ModelPatcher / load_models_gpu on a tiny Flux-named model.

Needs a ComfyUI checkout (COMFYUI_ROOT, e.g. ../shared/comfyui/0.33.0); skipped otherwise. The pack is imported the way
ComfyUI imports it: as a package named after its folder (here `flux_lora_ops_unit`), so its relative imports
resolve to its own `lora_ops` and `nodes`, never to ComfyUI's top-level `nodes` module.

What is checked here (fast, no server): exact undo when another clone loads, one-pass in-place strength changes,
ComfyUI's own LoRA patches before and after ours (full and lowvram/partial loads), interrupt rollback, chained
merges, the node declarations of both registration paths (V3 and forced V1), the LoRA cache and the VRAM report.
"""

from __future__ import annotations

import math
import os
import re
import sys

import hostile_files as hf
import pytest
import torch
from inprocess import assert_equal, core_lora, entry, fresh_merge, import_pack, load, weights
from lora_factory import TINY, write_lora

# --------------------------------------------------------------------------------------------- merge / undo


def test_merge_at_load_then_plain_branch_gets_exact_base(lc, comfy, pack, rt, plain, base, loras):
    merged = rt.attach_plan(plain, [entry(rt, loras["a"], 0.8)])
    assert merged.patches_uuid != plain.patches_uuid
    assert_equal(weights(plain), base)  # nothing happens at the node
    load(comfy, merged)
    assert_equal(weights(merged), fresh_merge(pack, base, [(loras["a"], 0.8)]))
    assert list(plain.backup) == [lc.UNDO_ATTR]  # the shared dict ComfyUI restores from
    load(comfy, plain)
    assert_equal(weights(plain), base)
    assert lc.record_of(plain.model) is None
    load(comfy, merged)  # and back again: merged from scratch, in place
    assert_equal(weights(merged), fresh_merge(pack, base, [(loras["a"], 0.8)]))


def test_free_and_unload_restore_base(comfy, rt, plain, base, loras):
    merged = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])
    load(comfy, merged)
    comfy.model_management.unload_all_models()
    assert_equal(weights(plain), base)


def test_undo_that_would_not_give_back_the_base_raises_and_keeps_the_record(lc, comfy, pack, rt, plain, base, loras):
    """A failed undo check (here: the recorded fingerprint of one weight no longer matches) is never retried into
    weights that only look restored: the error names the weight and the module keeps its record."""
    merged = rt.attach_plan(plain, [entry(rt, loras["a"], 0.8)])
    load(comfy, merged)
    state = lc.record_of(plain.model).state
    key = sorted(state.fingerprints)[0]
    true_print = state.fingerprints[key]
    state.fingerprints[key] = true_print + 1
    with pytest.raises(pack.lora_ops.UndoError, match=re.escape(key)):
        lc.undo(plain.model)
    assert lc.record_of(plain.model) is not None
    assert_equal(weights(merged), fresh_merge(pack, base, [(loras["a"], 0.8)]))
    state.fingerprints[key] = true_print  # the model file "reloaded": the next undo is exact again
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_strength_change_is_one_pass_in_place(lc, comfy, pack, rt, plain, base, loras, monkeypatch):
    undos = []
    real_undo = lc.undo
    monkeypatch.setattr(lc, "undo", lambda model: (undos.append(model), real_undo(model)))
    m1 = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])
    m2 = rt.attach_plan(plain, [entry(rt, loras["a"], 0.25)])
    m3 = rt.attach_plan(plain, [entry(rt, loras["b"], -0.5), entry(rt, loras["dora"], 0.7)])
    load(comfy, m1)
    params = {k: id(p) for k, p in plain.model.diffusion_model.named_parameters()}
    for patcher, stack in (
        (m2, [(loras["a"], 0.25)]),
        (m3, [(loras["b"], -0.5), (loras["dora"], 0.7)]),
        (m1, [(loras["a"], 1.0)]),
    ):
        load(comfy, patcher)
        assert_equal(weights(patcher), fresh_merge(pack, base, stack))
        assert plain.model.current_weight_patches_uuid == patcher.patches_uuid
        assert lc.record_of(plain.model).owner == patcher.patches_uuid
    assert undos == [], "a strength change went through ComfyUI's unpatch instead of the one-pass switch"
    assert params == {k: id(p) for k, p in plain.model.diffusion_model.named_parameters()}  # same Parameters
    load(comfy, plain)
    assert len(undos) == 1
    assert_equal(weights(plain), base)


def test_chained_merge_nodes_compose(comfy, pack, rt, plain, base, loras):
    first = rt.attach_plan(plain, [entry(rt, loras["a"], 0.5)])
    second = rt.attach_plan(first, [entry(rt, loras["b"], 1.5)])
    load(comfy, second)
    assert_equal(weights(second), fresh_merge(pack, base, [(loras["a"], 0.5), (loras["b"], 1.5)]))
    load(comfy, first)
    assert_equal(weights(first), fresh_merge(pack, base, [(loras["a"], 0.5)]))
    load(comfy, plain)
    assert_equal(weights(plain), base)


# --------------------------------------------------------------------------------------------- with core LoRA patches


def _close_to(actual: dict, base: dict, *deltas: dict) -> None:
    """Within two bf16 roundings of base + every delta (fp32)."""
    keys = set().union(*deltas)
    for key in keys:
        want = base[key].float() + sum(d[key] for d in deltas if key in d)
        err = (actual[key].float() - want).abs().max().item()
        ulp = want.abs().max().item() * 2**-7
        assert err <= ulp, (key, err, ulp)


def _lora_delta(pack, base, stack) -> dict:
    merged = fresh_merge(pack, {k: v.float() for k, v in base.items()}, stack)
    return {k: merged[k] - base[k].float() for k in merged if not torch.equal(merged[k], base[k].float())}


@pytest.mark.parametrize("order", ["core_then_ours", "ours_then_core"])
def test_core_lora_patches_and_ours_share_the_model(lc, comfy, pack, rt, plain, base, loras, order):
    keys = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight", "img_in.weight"]
    if order == "core_then_ours":
        core, core_delta = core_lora(plain, keys)
        both = rt.attach_plan(core, [entry(rt, loras["a"], 1.0)])
    else:
        ours = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])
        both, core_delta = core_lora(ours, keys)
        assert isinstance(both, lc.MergingPatcherMixin)  # clone() keeps the class and the plan
    load(comfy, both)
    _close_to(weights(both), base, _lora_delta(pack, base, [(loras["a"], 1.0)]), core_delta)
    assert list(plain.backup)[-1] == lc.UNDO_ATTR  # ours is restored after core's own entries
    load(comfy, plain)
    assert_equal(weights(plain), base)
    ours_only = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])
    load(comfy, ours_only)
    assert_equal(weights(ours_only), fresh_merge(pack, base, [(loras["a"], 1.0)]))
    load(comfy, both)
    _close_to(weights(both), base, _lora_delta(pack, base, [(loras["a"], 1.0)]), core_delta)
    load(comfy, plain)
    assert_equal(weights(plain), base)


def _effective(comfy, patcher) -> dict[str, torch.Tensor]:
    """The weights a forward pass uses (lowvram modules apply their weight_function patches on the fly)."""
    out = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        if isinstance(module, comfy.ops.manual_cast.Linear):
            w, b = comfy.ops.cast_bias_weight(
                module, dtype=module.weight.dtype, device=torch.device("cpu"), bias_dtype=module.bias.dtype
            )
            out[name + ".weight"], out[name + ".bias"] = w.clone(), b.clone()
    return out


def test_lowvram_partial_load_and_partial_unload_keep_the_merge(lc, comfy, pack, rt, plain, base, loras):
    """ComfyUI's lowvram path: some modules 'stay offloaded' with LowVramPatch for core patches; ours is in place."""
    keys = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "txt_in.weight"]
    core, core_delta = core_lora(plain, keys)
    both = rt.attach_plan(core, [entry(rt, loras["a"], 1.0)])
    ours_delta = _lora_delta(pack, base, [(loras["a"], 1.0)])
    budget = comfy.model_management.module_size(plain.model) // 3
    both.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
    assert plain.model.model_lowvram and plain.model.lowvram_patch_counter > 0
    _close_to(_effective(comfy, both), base, ours_delta, core_delta)
    both.partially_unload(torch.device("cpu"), memory_to_free=budget)  # core restores its backups of these
    _close_to(_effective(comfy, both), base, ours_delta, core_delta)
    both.unpatch_model(torch.device("cpu"))
    assert_equal(weights(plain), base)
    assert lc.record_of(plain.model) is None


# --------------------------------------------------------------------------------------------- interrupt


def _interrupt_after(comfy, monkeypatch, calls: int) -> list:
    """Raise ComfyUI's interrupt after `calls` progress updates (the merge then checks it at the next tile)."""
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if len(seen) == calls:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    # ComfyUI 0.33 sends at most one progress update per 100 ms; count every update here.
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    return seen


def test_interrupt_during_merge_leaves_base(lc, comfy, pack, rt, plain, base, loras, monkeypatch):
    seen = _interrupt_after(comfy, monkeypatch, 3)
    merged = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0), entry(rt, loras["b"], 1.0)])
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        load(comfy, merged)
    assert len(seen) == 3 and seen[-1][0] < seen[-1][1]
    assert_equal(weights(plain), base)
    assert lc.record_of(plain.model) is None and lc.UNDO_ATTR not in plain.backup
    comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    load(comfy, merged)
    assert_equal(weights(merged), fresh_merge(pack, base, [(loras["a"], 1.0), (loras["b"], 1.0)]))


def test_interrupt_during_in_place_switch_keeps_previous_stack(comfy, pack, rt, plain, base, loras, monkeypatch):
    m1 = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])
    m2 = rt.attach_plan(plain, [entry(rt, loras["a"], 0.3), entry(rt, loras["b"], 1.0)])
    load(comfy, m1)
    _interrupt_after(comfy, monkeypatch, 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        load(comfy, m2)
    assert_equal(weights(plain), fresh_merge(pack, base, [(loras["a"], 1.0)]))
    comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_interrupt_after_core_patches_rolls_back_our_pre_merge(comfy, rt, plain, base, loras, monkeypatch):
    keys = ["double_blocks.0.img_attn.qkv.weight"]
    core, _ = core_lora(plain, keys)
    both = rt.attach_plan(core, [entry(rt, loras["a"], 1.0)])
    _interrupt_after(comfy, monkeypatch, 2)  # first update ends the pre-merge of core-patched keys
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        load(comfy, both)
    comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert_equal(weights(plain), base)


# --------------------------------------------------------------------------------------------- errors


def test_lora_that_does_not_fit_fails_at_the_node(comfy, pack, rt, plain, tmp_path):
    other = tmp_path / "wide.safetensors"
    shape = type(TINY)(**{**TINY.__dict__, "hidden": 64, "heads": 2})
    write_lora("kohya", other, shape, 4, 1)
    lora = pack.lora_ops.load_lora(other)
    with pytest.raises(pack.lora_ops.ModelMismatchError, match="another size|does not have"):
        rt.attach_plan(plain, [entry(rt, lora, 1.0)])


def test_empty_stack_passes_the_model_through(rt, plain):
    assert rt.attach_plan(plain, []) is plain


# --------------------------------------------------------------------------------------------- node declarations


def _check_v1_class(cls) -> None:
    spec = cls.INPUT_TYPES()
    assert cls.CATEGORY == "Flux LoRA Ops" and cls.DESCRIPTION
    for group in ("required", "optional"):
        for name, (_kind, opts) in spec.get(group, {}).items():
            assert opts.get("tooltip"), (cls.__name__, name)
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert callable(getattr(cls, cls.FUNCTION))


EXPECTED_NODES = {"LoadFluxLoRA", "MergeLoRAIntoModel", "CastFluxFP8", "VRAMReport", "ResizeFluxLoRA"}


def test_v3_registration(pack):
    import asyncio

    assert pack.__all__ == ["comfy_entrypoint"] and not hasattr(pack, "NODE_CLASS_MAPPINGS")
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert {n.GET_SCHEMA().node_id for n in nodes} >= EXPECTED_NODES
    for node in nodes:
        schema = node.GET_SCHEMA()
        assert schema.category == "Flux LoRA Ops" and schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        _check_v1_class(node)  # the V1 view ComfyUI derives from the schema (/object_info)


def test_v1_registration_when_forced(comfy):
    v1 = import_pack("flux_lora_ops_unit_v1", force_v1=True)
    assert not hasattr(v1, "comfy_entrypoint")
    assert set(v1.NODE_CLASS_MAPPINGS) >= EXPECTED_NODES
    assert set(v1.NODE_DISPLAY_NAME_MAPPINGS) == set(v1.NODE_CLASS_MAPPINGS)
    for cls in v1.NODE_CLASS_MAPPINGS.values():
        _check_v1_class(cls)
    assert math.isnan(v1.NODE_CLASS_MAPPINGS["VRAMReport"].IS_CHANGED(label=""))
    assert v1.NODE_CLASS_MAPPINGS["VRAMReport"].OUTPUT_NODE


def test_load_lora_node_caches_and_reports_unmapped_keys(pack, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    lib = sys.modules[pack.__name__ + ".nodes.library"]
    path = tmp_path / "with_junk.safetensors"
    write_lora("kohya", path, TINY, 4, 1)
    tensors = load_file(str(path))
    tensors["lora_unet_not_a_flux_layer.lora_down.weight"] = torch.zeros(4, 8, dtype=torch.bfloat16)
    save_file(tensors, str(path))
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    lib.clear()
    first = defs.run_load_lora("with_junk.safetensors", 0.75)
    stack, text, _ = first.values
    assert [(e.name, e.strength) for e in stack] == [("with_junk.safetensors", 0.75)]
    assert "lora_unet_not_a_flux_layer.lora_down.weight" in text and "unmapped" in text
    assert first.text == text
    again = defs.run_load_lora("with_junk.safetensors", 1.0, lora_stack=stack)
    assert [e.strength for e in again.values[0]] == [0.75, 1.0]
    assert again.values[0][1].lora is stack[0].lora  # parsed once
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert defs.run_load_lora("with_junk.safetensors", 1.0).values[0][0].lora is not stack[0].lora


def test_load_lora_node_raises_the_library_error(pack, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    save_file({"input_blocks.0.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "sdxl.safetensors"))
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    with pytest.raises(pack.lora_ops.LoRAFormatError, match="nothing in this file applies to Flux"):
        defs.run_load_lora("sdxl.safetensors", 1.0)


@pytest.mark.parametrize("case", hf.cases("load", "fit"), ids=lambda h: h.name)
def test_hostile_lora_through_the_nodes(comfy, pack, rt, plain, base, case, tmp_path, monkeypatch):
    """Every bad LoRA file of the hostile suite, through LoadFluxLoRA then MergeLoRAIntoModel: the library's
    clear error, the file untouched, the model's bits untouched."""
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    lib = sys.modules[pack.__name__ + ".nodes.library"]
    path = case.write(tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    lib.clear()
    with pytest.raises(getattr(pack.lora_ops, case.error), match=re.compile(case.words, re.I)):
        stack, _, _ = defs.run_load_lora(path.name, 1.0).values
        load(comfy, rt.attach_plan(plain, list(stack)))
    assert path.read_bytes() == before
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_vram_report(comfy, pack, rt, plain, loras):
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    load(comfy, rt.attach_plan(plain, [entry(rt, loras["a"], 1.0, name="a.safetensors")]))
    result = defs.run_vram_report("after merge", passthrough="anything")
    passthrough, text, chart = result.values
    assert passthrough == "anything" and result.text == text
    assert "Process RSS" in text and "_Root" in text and "merged a.safetensors @ 1" in text
    if not torch.cuda.is_available():
        assert "No GPU" in text
    assert chart.dim() == 4 and chart.shape[0] == 1 and chart.shape[3] == 3
    assert chart.dtype == torch.float32 and 0.0 <= chart.min() and chart.max() <= 1.0


# --------------------------------------------------------------------------------------------- fp8 cast


def _fp8_reference(pack, base, stack, policy="default", rounding="nearest"):
    """What each fp8 layer must hold: lora_ops.fp8.quantize_merged of the 16-bit original + the stack's terms."""
    fp8 = pack.lora_ops.fp8
    terms = pack.lora_ops.merge.terms_by_target(stack)
    out = {}
    for key, value in base.items():
        if fp8.get_policy(policy).selects(key, value.shape):
            out[key] = fp8.quantize_merged(value, terms.get(key, []), key=key, rounding=rounding)
    return out


def _fp8_layers(comfy, pack, patcher) -> dict:
    return {
        name + ".weight": module
        for name, module in patcher.model.diffusion_model.named_modules()
        if isinstance(module, pack.lora_ops.fp8.FP8Linear)
    }


@pytest.mark.parametrize("order", ["merge_then_cast", "cast_then_merge"])
def test_fp8_cast_at_load_merge_then_quantise(comfy, pack, rt, plain, base, loras, order):
    stack = [(loras["a"], 0.9), (loras["dora"], 0.5)]
    entries = [entry(rt, lora, s) for lora, s in stack]
    if order == "merge_then_cast":
        cast = rt.attach_fp8(rt.attach_plan(plain, entries), "default")
    else:
        cast = rt.attach_plan(rt.attach_fp8(plain, "default"), entries)
    assert cast.model_size() < plain.model_size()
    load(comfy, cast)
    layers = _fp8_layers(comfy, pack, cast)
    expected = _fp8_reference(pack, base, stack)
    assert set(layers) == set(expected) and layers
    for key, (q, scale) in expected.items():
        assert torch.equal(layers[key].weight.view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(layers[key].scale_weight, scale), key
    # the fp8 layers' biases stay 16-bit; every other tensor got the in-place merge, exactly
    fresh = fresh_merge(pack, base, stack)
    current = weights(cast)
    slot_biases = {k.removesuffix(".weight") + ".bias" for k in expected}
    for key in fresh:
        if key in expected:
            continue
        assert torch.equal(current[key], fresh[key]), key
        if key in slot_biases:
            assert current[key].dtype == base[key].dtype
    assert comfy.model_management.module_size(plain.model) == cast.model_size()
    # another branch: the original Linears are back, with the base bits; the fp8 copies are freed
    load(comfy, plain)
    assert not _fp8_layers(comfy, pack, plain)
    assert_equal(weights(plain), base)
    assert all(slot.weight.numel() == 0 for _, slot in cast.attachments[rt.ATTACHMENT].fp8.slots)
    load(comfy, cast)  # and again
    for key, (q, _) in expected.items():
        assert torch.equal(_fp8_layers(comfy, pack, cast)[key].weight.view(torch.uint8), q.view(torch.uint8))


def test_fp8_cast_forward_runs_and_is_close(comfy, pack, rt, plain, base):
    cast = rt.attach_fp8(plain, "all")
    load(comfy, cast)
    layer = cast.model.diffusion_model.get_submodule("double_blocks.0.img_attn.qkv")
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(
        x.float(),
        base["double_blocks.0.img_attn.qkv.weight"].float(),
        base["double_blocks.0.img_attn.qkv.bias"].float(),
    )
    got = layer(x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.05
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_fp8_cast_interrupt_leaves_base(comfy, pack, rt, plain, base, loras, monkeypatch):
    cast = rt.attach_fp8(rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)]), "default")
    _interrupt_after(comfy, monkeypatch, 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        load(comfy, cast)
    comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert not _fp8_layers(comfy, pack, plain)
    assert_equal(weights(plain), base)
    assert all(slot.weight.numel() == 0 for _, slot in cast.attachments[rt.ATTACHMENT].fp8.slots)


def test_nodes_see_through_another_clones_fp8_slots(comfy, pack, rt, plain, base, loras):
    """After a cast clone loaded, its FP8Linear slots stay in the shared module until the next unpatch."""
    cast = rt.attach_fp8(plain, "default")
    load(comfy, cast)
    assert _fp8_layers(comfy, pack, plain)
    merged = rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)])  # node time, slots still in the tree
    cast_again = rt.attach_fp8(merged, "quality")
    assert cast_again.model_size() > cast.model_size()  # quality keeps the modulation Linears 16-bit
    load(comfy, merged)
    assert_equal(weights(merged), fresh_merge(pack, base, [(loras["a"], 1.0)]))
    load(comfy, cast_again)
    expected = _fp8_reference(pack, base, [(loras["a"], 1.0)], policy="quality")
    layers = _fp8_layers(comfy, pack, cast_again)
    assert set(layers) == set(expected)
    for key, (q, _) in expected.items():
        assert torch.equal(layers[key].weight.view(torch.uint8), q.view(torch.uint8)), key
    load(comfy, plain)
    assert_equal(weights(plain), base)
