"""MergeLoRAIntoModel on a model whose Linears are ComfyUI `QuantizedTensor`s (ComfyUI with comfy/quant_ops.py, e.g.
0.33.0), in-process against ComfyUI's real mixed-precision ops, ModelPatcher and load_models_gpu.

The model is built the way ComfyUI loads a comfy_quant checkpoint: `comfy.ops.mixed_precision_ops` Linears filled by
their own `_load_from_state_dict` from our comfy_quant fp8 state dict, so every selected Linear holds a
QuantizedTensor (per-tensor fp8, TensorCoreFP8E4M3Layout). The oracle is our library's fresh-scale merge of the same
state dict (`lora_ops.fp8.merge_loras_fp8`).
"""

from __future__ import annotations

import pytest
import torch
from inprocess import entry, load
from lora_factory import TINY, base_state_dict, write_lora

# Not applicable to a ComfyUI without quantized tensors (0.3.x): deselected there (conftest.py).
pytestmark = pytest.mark.comfyui_has("comfy/quant_ops.py", "class QuantizedTensor")


@pytest.fixture(scope="module", autouse=True)
def _needs_quant_ops(comfy):
    import comfy.quant_ops as quant_ops

    if not quant_ops._CK_AVAILABLE:
        pytest.fail("ComfyUI has quant_ops but comfy_kitchen is missing: install the tree's requirements")


@pytest.fixture(scope="module")
def quant_sd(pack):
    """Our comfy_quant fp8 state dict of the tiny Flux model: every Linear the "all" policy picks is fp8."""
    return pack.lora_ops.fp8.merge_to_fp8(base_state_dict(TINY, 0), [], "all", file_format="comfy_quant")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, pack):
    case = write_lora("kohya", tmp_path_factory.mktemp("q") / "a.safetensors", TINY, 4, 1)
    return pack.lora_ops.load_lora(case.path)


class _Root(torch.nn.Module):
    """Stands in for comfy.model_base.BaseModel: the Flux weights under `.diffusion_model`."""


def _quantized_model(comfy, sd: dict[str, torch.Tensor]) -> _Root:
    """Flux-named tree: every 2-D weight's module is a mixed-precision Linear loaded by ComfyUI from `sd`."""
    ops = comfy.ops.mixed_precision_ops({}, torch.bfloat16)
    dm = torch.nn.Module()
    layers = {k.rpartition(".")[0] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}
    for key, value in sd.items():
        module, _, pname = key.rpartition(".")
        parent = dm
        for part in module.split("."):
            if not hasattr(parent, part):
                if module in layers and part == module.split(".")[-1]:
                    w = sd[module + ".weight"]
                    parent.add_module(part, ops.Linear(w.shape[1], w.shape[0], bias=module + ".bias" in sd))
                else:
                    parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        if module not in layers:
            parent.register_parameter(pname, torch.nn.Parameter(value.clone(), requires_grad=False))
    dm.load_state_dict({k: v.clone() for k, v in sd.items() if k.rpartition(".")[0] in layers}, strict=False)
    root = _Root()
    root.diffusion_model = dm
    return root


@pytest.fixture
def qplain(comfy, quant_sd):
    """A ModelPatcher over a freshly loaded quantized model (what UNETLoader returns for a comfy_quant file)."""
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model = _quantized_model(comfy, quant_sd)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    yield patcher
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()


def parts(patcher) -> dict[str, torch.Tensor]:
    """The model's weights as a comfy_quant state dict would store them (payload bits, scales, 16-bit tensors)."""
    out = {}
    for name, p in patcher.model.diffusion_model.named_parameters():
        t = p.data
        if hasattr(t, "_qdata"):
            out[name] = t._qdata.clone()
            out[name.removesuffix(".weight") + ".weight_scale"] = t._params.scale.clone()
        else:
            out[name] = t.clone()
    return out


def library_merge(pack, quant_sd, stack) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in quant_sd.items() if not k.endswith(".comfy_quant")}
    pack.lora_ops.fp8.merge_loras_fp8(out, stack)
    return out


def assert_same_bits(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    bad = [
        k
        for k in expected
        if actual[k].dtype != expected[k].dtype
        or not torch.equal(actual[k].reshape(-1).view(torch.uint8), expected[k].reshape(-1).view(torch.uint8))
    ]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_the_model_holds_quantized_tensors(qplain):
    layer = qplain.model.diffusion_model.get_submodule("double_blocks.0.img_attn.qkv")
    assert type(layer.weight).__name__ == "QuantizedTensor" and layer.quant_format == "float8_e4m3fn"


def test_merge_into_quantized_fp8_equals_the_library_and_other_branches_see_base(
    lc,
    comfy,
    pack,
    rt,
    qplain,
    quant_sd,
    lora,
):
    base = parts(qplain)
    merged = rt.attach_plan(qplain, [entry(rt, lora, 0.8)])
    load(comfy, merged)
    got = parts(merged)
    assert_same_bits(got, library_merge(pack, quant_sd, [(lora, 0.8)]))
    changed = [
        k
        for k in lora.targets
        if not torch.equal(got[k].reshape(-1).view(torch.uint8), base[k].reshape(-1).view(torch.uint8))
    ]
    assert sorted(changed) == sorted(lora.targets)  # every weight the LoRA names really changed
    load(comfy, qplain)  # another branch of the same loader: exact base, scales included
    assert_same_bits(parts(qplain), base)
    assert lc.record_of(qplain.model) is None


def test_quantized_strength_switch_in_place_and_undo(lc, comfy, pack, rt, qplain, quant_sd, lora, monkeypatch):
    undos = []
    real_undo = lc.undo
    monkeypatch.setattr(lc, "undo", lambda model: (undos.append(model), real_undo(model)))
    base = parts(qplain)
    m1 = rt.attach_plan(qplain, [entry(rt, lora, 1.0)])
    m2 = rt.attach_plan(qplain, [entry(rt, lora, 0.3)])
    load(comfy, m1)
    load(comfy, m2)
    assert_same_bits(parts(m2), library_merge(pack, quant_sd, [(lora, 0.3)]))
    assert undos == [], "a strength change went through ComfyUI's unpatch instead of the one-pass switch"
    load(comfy, qplain)
    assert_same_bits(parts(qplain), base)


def test_an_impossible_undo_never_reloads_quantized_weights(lc, comfy, pack, rt, qplain, quant_sd, lora, tmp_path,
                                                            caplog):
    """Even with the model file known, quantized weights are not reloaded (payload and scale are not the file's
    plain cast): the UndoError surfaces, the log says why, nothing changes and the record stays."""
    import logging
    import sys

    from safetensors.torch import save_file

    path = tmp_path / "quantized.safetensors"
    save_file({k: v.contiguous() for k, v in quant_sd.items()}, str(path))
    model_file = sys.modules[pack.__name__ + ".nodes.model_file"]
    qplain.model.__dict__[model_file.SOURCE_ATTR] = str(path)  # as if found before
    merged = rt.attach_plan(qplain, [entry(rt, lora, 0.8)])
    load(comfy, merged)
    rec = lc.record_of(qplain.model)
    assert rec.source == str(path)
    key = "double_blocks.0.img_attn.qkv.weight"
    assert hasattr(qplain.model.diffusion_model.get_parameter(key).data, "_qdata")
    true_print = rec.state.fingerprints[key]
    rec.state.fingerprints[key] = true_print + 1
    before = parts(qplain)
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"), pytest.raises(pack.lora_ops.UndoError):
        lc.undo(qplain.model)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not be reloaded from the model file" in errors[0]
    assert f"is a scaled fp8 weight whose scale the merge changed; it is not reloaded from {path}" in errors[0]
    assert lc.record_of(qplain.model) is rec
    assert_same_bits(parts(qplain), before)
    rec.state.fingerprints[key] = true_print
    load(comfy, qplain)
    assert lc.record_of(qplain.model) is None


def test_int8_layer_is_refused_by_name_and_nothing_changes(comfy, pack, rt, quant_sd, lora):
    """A layer in another layout (built by hand: int8_tensorwise loads on the CPU) is refused at the node."""
    layer = "double_blocks.0.img_attn.qkv"
    sd = dict(quant_sd)
    sd[layer + ".weight"] = torch.randint(-100, 100, sd[layer + ".weight"].shape, dtype=torch.int8)
    sd[layer + ".comfy_quant"] = pack.lora_ops.fp8.comfy_quant_tensor({"format": "int8_tensorwise"})
    with torch.inference_mode():
        model = _quantized_model(comfy, sd)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    assert model.diffusion_model.get_submodule(layer).weight._layout_cls == "TensorWiseINT8Layout"
    before = parts(patcher)
    with pytest.raises(pack.lora_ops.LoRAOpsError, match=rf"{layer}.*int8_tensorwise"):
        rt.attach_plan(patcher, [entry(rt, lora, 1.0)])
    load(comfy, patcher)
    assert_same_bits(parts(patcher), before)


def test_a_merge_that_does_not_reach_the_weights_is_an_error(lc, comfy, pack, rt, qplain, lora, monkeypatch):
    """Writes that land somewhere other than the model's storage (as writes into the QuantizedTensor wrapper did
    before) are caught: an error instead of a success message, base bits kept."""
    quantized = pack.nodes.quantized
    real_view = quantized.engine_view

    def detached_view(weights):
        view, scales = real_view(weights)
        return {k: v.clone() for k, v in view.items()}, {k: v.clone() for k, v in scales.items()}

    monkeypatch.setattr(quantized, "engine_view", detached_view)
    base = parts(qplain)
    merged = rt.attach_plan(qplain, [entry(rt, lora, 1.0)])
    with pytest.raises(pack.lora_ops.LoRAOpsError, match="did not reach the model's weights"):
        load(comfy, merged)
    assert_same_bits(parts(qplain), base)
    assert lc.record_of(qplain.model) is None


def test_cast_to_fp8_on_a_quantized_model_says_so(pack, rt, qplain):
    with pytest.raises(pack.lora_ops.LoRAOpsError, match="already quantized"):
        rt.attach_fp8(qplain, "default")
