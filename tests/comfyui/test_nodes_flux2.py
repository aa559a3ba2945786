"""The merge node on a Flux.2-shaped model in-process (ComfyUI's ModelPatcher and load_models_gpu): merged at
load bit-exact with the library, another branch gets the exact base back, a strength change is one pass in
place, and a Flux.1 LoRA is refused at the node naming both families with the model untouched."""

from __future__ import annotations

import pytest
import torch
from inprocess import assert_equal, build_model, entry, fresh_merge, load, make_loras, weights
from lora_factory import TINY, TINY_FLUX2, base_state_dict, write_lora


@pytest.fixture(scope="module")
def base2():
    return base_state_dict(TINY_FLUX2, 3)


@pytest.fixture(scope="module")
def loras2(tmp_path_factory, pack, base2):
    return make_loras(tmp_path_factory.mktemp("flux2_loras"), pack, TINY_FLUX2, base2)


@pytest.fixture
def plain2(comfy, base2):
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model = build_model(comfy, base2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    yield patcher
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()


def test_flux2_merge_at_load_undo_and_strength_change(lc, comfy, pack, rt, plain2, base2, loras2):
    m1 = rt.attach_plan(plain2, [entry(rt, loras2["a"], 0.8)])
    m2 = rt.attach_plan(plain2, [entry(rt, loras2["b"], -0.5), entry(rt, loras2["dora"], 0.7)])
    assert_equal(weights(plain2), base2)
    load(comfy, m1)
    assert_equal(weights(m1), fresh_merge(pack, base2, [(loras2["a"], 0.8)]))
    load(comfy, m2)
    assert_equal(weights(m2), fresh_merge(pack, base2, [(loras2["b"], -0.5), (loras2["dora"], 0.7)]))
    load(comfy, plain2)
    assert_equal(weights(plain2), base2)
    assert lc.record_of(plain2.model) is None


def test_flux1_lora_refused_at_the_node(pack, rt, plain2, base2, tmp_path):
    flux1 = pack.lora_ops.load_lora(write_lora("kohya", tmp_path / "f1.safetensors", TINY, 4, 1).path)
    with pytest.raises(pack.lora_ops.ModelMismatchError, match="made for Flux.1.*is Flux.2"):
        rt.attach_plan(plain2, [entry(rt, flux1, 1.0)])
    assert_equal(weights(plain2), base2)
