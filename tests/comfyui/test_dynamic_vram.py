"""Dynamic VRAM (ComfyUI 0.33's ModelPatcherDynamic) driven on the CPU through its own methods.

ComfyUI hands out the plain patcher for CPU load devices and comfy_aimdo needs CUDA, so the patcher is built the
way ComfyUI builds it but with the class forced (`__new__`), aimdo's host buffers stubbed and no VRAM arena (the
`_vbar_get` of a CPU device): load / restore_loaded_backups / partially_unload / unpatch_model / clone are
ComfyUI's own code. The GPU cast is ComfyUI's own `resolve_cast_module_with_vbar`, fed a transfer buffer by hand.

What must hold: nothing is written into the base weights; the merged branch equals a fresh merge bit-exact; other
branches never see the LoRA; a re-queue with another strength gives the new bits; an interrupt leaves everything as
it was; core LoRAs before/after ours; fp8 cast beside a plain branch; ModelSave's weights.
"""

from __future__ import annotations

import pytest
import torch
from inprocess import CPU0, build_model, core_lora, entry, force_dynamic_on_cpu, fresh_merge, load, make_loras
from lora_factory import TINY, base_state_dict

pytestmark = pytest.mark.comfyui_has("comfy/model_patcher.py", "class ModelPatcherDynamic")

#: Wide enough that ComfyUI pages most layers (> 16 KiB: cast-time merge) and loads the small ones whole (copies).
WIDE = type(TINY)(**{**TINY.__dict__, "hidden": 128, "depth": 1, "depth_single": 1})


@pytest.fixture(scope="module")
def base():
    return base_state_dict(WIDE, 0)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, pack, base):
    return make_loras(tmp_path_factory.mktemp("wide_loras"), pack, WIDE, base)


@pytest.fixture
def dyn(comfy, base, monkeypatch):
    """A ModelPatcherDynamic over a fresh model (what UNETLoader returns with dynamic VRAM on)."""
    force_dynamic_on_cpu(comfy, monkeypatch.setattr)
    with torch.inference_mode():
        model = build_model(comfy, base)
    patcher = comfy.model_patcher.ModelPatcherDynamic(model, load_device=CPU0, offload_device=torch.device("cpu"))
    assert patcher.is_dynamic()
    yield patcher
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()


def base_params(patcher) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The base weights as loaded (the checkpoint's tensors under dynamic VRAM) and a copy of their bits."""
    return {k: (p.data, p.data.clone()) for k, p in patcher.model.diffusion_model.named_parameters()}


def effective(patcher) -> dict[str, torch.Tensor]:
    """What a forward would compute with: each weight as cast, through its `_lowvram_function` if it has one."""
    out = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            fn = getattr(module, pname + "_lowvram_function", None)
            value = p.data.clone()
            with torch.inference_mode():
                out[f"{name}.{pname}" if name else pname] = fn(value) if fn is not None else value
    return out


def assert_same(actual: dict, expected: dict) -> None:
    bad = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def assert_base_untouched(before: dict) -> None:
    """Every tensor the model was loaded with still holds its bits (nothing wrote into the base)."""
    bad = [key for key, (tensor, bits) in before.items() if not torch.equal(tensor, bits)]
    assert not bad, f"{len(bad)} base weights were written, e.g. {bad[:3]}"


def test_merged_branch_is_a_fresh_merge_and_base_is_never_written(lc, comfy, pack, rt, dyn, base, loras):
    before = base_params(dyn)
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 0.8), entry(rt, loras["dora"], 0.5)])
    load(comfy, merged)
    assert_same(effective(merged), fresh_merge(pack, base, [(loras["a"], 0.8), (loras["dora"], 0.5)]))
    assert_base_untouched(before)
    assert lc.UNDO_ATTR not in dyn.backup and lc.record_of(dyn.model) is None
    paths = {type(getattr(m, "weight_lowvram_function", None)).__name__ for m in dyn.model.diffusion_model.modules()}
    assert "CastTimeMerge" in paths and len(dyn.backup) > 0  # both ways are exercised: at the cast, as copies
    load(comfy, dyn)  # the plain branch of the same loader
    assert_same(effective(dyn), base)
    assert_base_untouched(before)


def test_requeue_with_another_strength_gives_the_new_bits(comfy, pack, rt, dyn, base, loras):
    before = base_params(dyn)
    for strength in (1.0, 0.3, -0.7):
        merged = rt.attach_plan(dyn, [entry(rt, loras["a"], strength)])
        load(comfy, merged)
        assert_same(effective(merged), fresh_merge(pack, base, [(loras["a"], strength)]))
        assert_base_untouched(before)


def test_comfyui_unload_paths_leave_base(comfy, rt, dyn, base, loras):
    """restore_loaded_backups / partially_unload / unpatch_model / a second load: no TypeError, no LoRA left."""
    before = base_params(dyn)
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 1.0)])
    load(comfy, merged)
    merged.partially_unload(None, 1e32)
    merged.restore_loaded_backups()
    load(comfy, merged)
    merged.unpatch_model(None)
    assert all(not isinstance(v, torch.nn.Parameter) or v.dim() > 0 for v in vars(dyn.model).values())
    load(comfy, merged)  # merging again after ComfyUI's own unpatch
    load(comfy, dyn)
    assert_same(effective(dyn), base)
    assert_base_untouched(before)


def test_clone_keeps_the_plan_and_class(comfy, pack, lc, rt, dyn, base, loras):
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 1.0)])
    again = merged.clone()
    assert isinstance(again, lc.MergingPatcherMixin) and again.is_dynamic()
    load(comfy, again)
    assert_same(effective(again), fresh_merge(pack, base, [(loras["a"], 1.0)]))


@pytest.mark.parametrize("order", ["core_then_ours", "ours_then_core"])
def test_core_lora_before_and_after_ours(comfy, pack, rt, dyn, base, loras, order):
    key = "double_blocks.0.img_attn.qkv.weight"

    def core(m):
        return core_lora(m, [key])[0]

    ours = [entry(rt, loras["a"], 1.0)]
    both = rt.attach_plan(core(dyn), ours) if order == "core_then_ours" else core(rt.attach_plan(dyn, ours))
    load(comfy, both)
    expected = {k: v.clone() for k, v in base.items()}
    with torch.inference_mode():
        core_fn = comfy.model_patcher.LowVramPatch(f"diffusion_model.{key}", both.patches)
        expected[key] = core_fn(base[key].clone())  # ComfyUI's own patch first, as at the cast
        pack.lora_ops.merge_loras(expected, [(loras["a"], 1.0)])
    assert_same(effective(both), expected)
    load(comfy, dyn)
    assert_same(effective(dyn), base)


def test_interrupt_at_load_leaves_everything_as_it_was(comfy, pack, rt, dyn, base, loras):
    before = base_params(dyn)
    merged = rt.attach_plan(rt.attach_fp8(dyn, "default"), [entry(rt, loras["a"], 1.0)])
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            load(comfy, merged)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert_base_untouched(before)
    assert_same(effective(dyn), base)
    load(comfy, merged)  # a re-queue works
    load(comfy, dyn)
    assert_same(effective(dyn), base)


def test_fp8_cast_beside_a_plain_branch(comfy, pack, rt, dyn, base, loras):
    fp8 = pack.lora_ops.fp8
    terms = pack.lora_ops.terms_by_target([(loras["a"], 1.0)])
    cast = rt.attach_fp8(rt.attach_plan(dyn, [entry(rt, loras["a"], 1.0)]), "default")
    load(comfy, cast)
    slots = {n: m for n, m in cast.model.diffusion_model.named_modules() if isinstance(m, fp8.FP8Linear)}
    assert slots
    for name, slot in slots.items():
        q, scale = fp8.quantize_merged(base[f"{name}.weight"], terms.get(f"{name}.weight", []), key=f"{name}.weight")
        assert torch.equal(slot.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(slot.scale_weight, scale)
    load(comfy, dyn)
    assert not any(isinstance(m, fp8.FP8Linear) for m in dyn.model.diffusion_model.modules())
    assert_same(effective(dyn), base)


def test_comfyui_cast_path_runs_our_merge_and_caches_only_in_the_transfer_buffer(comfy, pack, rt, dyn, base, loras):
    """ComfyUI's resolve_cast_module_with_vbar with a transfer buffer (the VRAM copy) and a cache signature."""
    key = "double_blocks.0.img_attn.qkv"
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 1.0)])
    load(comfy, merged)
    module = merged.model.diffusion_model.get_submodule(key)
    mm = comfy.memory_management
    buffer = torch.empty(mm.vram_aligned_size([module.weight, module.bias]), dtype=torch.uint8)
    for view, t in zip(mm.interpret_gathered_like([module.weight, module.bias], buffer), (module.weight, module.bias)):
        view.copy_(t)
    module._prefetch = {
        "signature": object(),
        "resident": False,
        "xfer_dest": buffer,
        "cast_dest": None,
        "cast_geometry": mm.tensors_to_geometries([module.weight, module.bias]),
        "needs_cast": False,
    }
    with torch.inference_mode():
        weight, _ = comfy.ops.resolve_cast_module_with_vbar(module, torch.bfloat16, CPU0, torch.bfloat16, None, False)
    expected = fresh_merge(pack, base, [(loras["a"], 1.0)])[f"{key}.weight"]
    assert torch.equal(weight, expected)
    assert torch.equal(module._v_weight, expected)  # the cached VRAM copy holds the merged bits
    assert torch.equal(module.weight.data, base[f"{key}.weight"])  # the base stays as loaded
    del module._prefetch


def test_modelsave_writes_the_merged_weights(comfy, pack, rt, dyn, base, loras):
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 0.6)])
    load(comfy, merged)
    with torch.inference_mode():  # as ComfyUI runs ModelSave
        sd = merged.model_state_dict_for_saving(merged.model.diffusion_model, "diffusion_model.")
        saved = {k: v.to("cpu") for k, v in sd.items()}
    assert_same(saved, fresh_merge(pack, base, [(loras["a"], 0.6)]))


@pytest.mark.comfyui_has("comfy/quant_ops.py", "class QuantizedTensor")
def test_quantized_fp8_model_merges_at_the_cast(comfy, pack, rt, loras, base, monkeypatch):
    """A comfy_quant fp8 model (QuantizedTensor weights): ComfyUI hands our cast function the dequantised weight."""
    from test_quantized_in_comfyui import _quantized_model

    force_dynamic_on_cpu(comfy, monkeypatch.setattr)
    quant_sd = pack.lora_ops.fp8.merge_to_fp8(base, [], "default", file_format="comfy_quant")
    with torch.inference_mode():
        model = _quantized_model(comfy, quant_sd)
    dyn = comfy.model_patcher.ModelPatcherDynamic(model, load_device=CPU0, offload_device=torch.device("cpu"))
    merged = rt.attach_plan(dyn, [entry(rt, loras["a"], 1.0)])
    load(comfy, merged)
    key = "double_blocks.0.img_attn.qkv"
    module = merged.model.diffusion_model.get_submodule(key)
    fn = module.weight_lowvram_function
    with torch.inference_mode():
        dequantised = module.weight.dequantize()
        got = fn(dequantised.clone())
        expected = {f"{key}.weight": dequantised.clone()}
        pack.lora_ops.merge_loras(expected, [(loras["a"].only({f"{key}.weight"}), 1.0)])
    assert torch.equal(got, expected[f"{key}.weight"]) and not torch.equal(got, dequantised)
    assert torch.equal(module.weight.dequantize(), dequantised)  # the quantized base is untouched
    with pytest.raises(pack.lora_ops.LoRAOpsError, match="disable-dynamic-vram"):  # not a silent unmerged save
        merged.patch_weight_to_device(f"diffusion_model.{key}.weight", device_to=CPU0, return_weight=True)
    comfy.model_management.unload_all_models()
