"""Per-block strengths and text-encoder parts through the nodes, in-process, against ComfyUI's real classes.

Block specs: merged at load through ComfyUI's load_models_gpu, switched in place in one pass like a strength.
Text encoders: a real ComfyUI Flux CLIP (comfy.sd.CLIP over comfy.text_encoders.flux's CLIP-L + T5 classes, the
real tokenizers), shrunk to width 32 and 1 layer through ComfyUI's own `*_model_config` model options so that it
builds in a second; the LoRA's text-encoder keys go through comfy.lora and the CLIP's own patcher.
"""

from __future__ import annotations

import sys

import pytest
import torch
from inprocess import assert_equal, fresh_merge, load, weights
from lora_factory import TINY, FluxShape, write_lora
from safetensors.torch import load_file


def _entry(rt, lora, strength, spec):
    return rt.StackEntry("a", strength, lora, block_spec=spec)


def _weighted(pack, lora, spec):
    return pack.lora_ops.with_block_weights(lora, pack.lora_ops.parse_block_spec(spec, {"double": 2, "single": 2}))


def test_block_spec_change_is_one_pass_in_place(lc, comfy, pack, rt, plain, base, loras, monkeypatch):
    undos = []
    real_undo = lc.undo
    monkeypatch.setattr(lc, "undo", lambda model: (undos.append(model), real_undo(model)))
    specs = ("single=0", "*=0.5, double.1=2, single.0=-1", "single only")
    patchers = [rt.attach_plan(plain, [_entry(rt, loras["a"], 0.8, spec)]) for spec in specs]
    for patcher, spec in zip(patchers, specs):
        load(comfy, patcher)
        assert_equal(weights(patcher), fresh_merge(pack, base, [(_weighted(pack, loras["a"], spec), 0.8)]))
    assert undos == [], "a block-spec change went through ComfyUI's unpatch instead of the one-pass switch"
    tokens = [p.attachments[rt.ATTACHMENT].token for p in patchers]
    assert len(set(tokens)) == 3  # the plan token carries the block multipliers
    same = rt.attach_plan(plain, [_entry(rt, loras["a"], 0.8, "SINGLE ONLY")])
    assert same.attachments[rt.ATTACHMENT].token == tokens[2]  # same multipliers, same token
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_block_spec_outside_the_model_fails_at_the_merge_node(pack, rt, plain, base, loras):
    with pytest.raises(pack.lora_ops.LoRAOpsError, match=r"a: block spec .*single blocks 0-1"):
        rt.attach_plan(plain, [_entry(rt, loras["a"], 1.0, "single.5=0")])
    assert_equal(weights(plain), base)


def test_load_node_checks_the_spec_grammar_and_shows_it(pack, tmp_path, monkeypatch):
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    shape = FluxShape(
        hidden=32,
        depth=2,
        depth_single=2,
        heads=2,
        context_dim=48,
        vec_dim=24,
        time_dim=16,
        in_channels=16,
        out_channels=16,
    )
    write_lora("bfl", tmp_path / "l.safetensors", shape, 2, 1)
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    stack, text, clip = defs.run_load_lora("l.safetensors", 0.5, blocks="double only, double.1=0.5").values
    assert stack[0].block_spec == "double only, double.1=0.5" and clip is None
    assert "block strengths: double only, double.1=0.5" in text and "blocks: double 0-1; single 0-1" in text
    with pytest.raises(pack.lora_ops.LoRAOpsError, match="l.safetensors: block spec 'dubble=1'"):
        defs.run_load_lora("l.safetensors", 0.5, blocks="dubble=1")


# --------------------------------------------------------------------------------------------- text encoders

TE_SHAPE = FluxShape(
    hidden=32,
    depth=1,
    depth_single=1,
    heads=2,
    context_dim=32,
    vec_dim=32,
    time_dim=16,
    in_channels=16,
    out_channels=16,
)
CLIP_L = "clip_l.transformer.text_model.encoder.layers.0."
T5 = "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention."


@pytest.fixture(scope="module")
def tiny_clip(comfy):
    """A real Flux CLIP object (CLIP-L + T5 classes of ComfyUI), 32 wide, 1 layer, fp32, random weights."""
    import comfy.sd
    import comfy.text_encoders.flux as flux

    class Target:
        params = {}
        clip = flux.flux_clip()
        tokenizer = flux.FluxTokenizer

    sizes = {
        "clip_l_model_config": {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "t5xxl_model_config": {"d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 64, "num_layers": 1},
    }
    clip = comfy.sd.CLIP(Target(), model_options={**sizes, "dtype": torch.float32})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return clip


def _clip_weights(comfy, clip) -> dict[str, torch.Tensor]:
    comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
    return {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}


def _te_delta(path, module: str) -> torch.Tensor:
    """alpha/rank · up @ down of one text-encoder module, by hand from the file (float64)."""
    sd = load_file(str(path))
    up, down = sd[f"{module}.lora_up.weight"].double(), sd[f"{module}.lora_down.weight"].double()
    alpha = float(sd[f"{module}.alpha"]) if f"{module}.alpha" in sd else down.shape[0]
    return alpha / down.shape[0] * up @ down


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (
            "onetrainer",
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": CLIP_L + "self_attn.q_proj.weight",
                "lora_te2_encoder_block_0_layer_0_SelfAttention_q": T5 + "q.weight",
            },
        ),
        (
            "kohya",
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": CLIP_L + "self_attn.q_proj.weight",
                "lora_te1_text_model_encoder_layers_0_mlp_fc1": CLIP_L + "mlp.fc1.weight",
            },
        ),
    ],
)
def test_text_encoder_keys_go_to_the_clip_through_comfyui(comfy, pack, tiny_clip, tmp_path, monkeypatch, fmt, expected):
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    path = write_lora(fmt, tmp_path / f"{fmt}.safetensors", TE_SHAPE, 4, 3).path
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    before = _clip_weights(comfy, tiny_clip)
    _, text, patched = defs.run_load_lora(path.name, 1.0, clip=tiny_clip, strength_clip=0.5).values
    assert patched is not tiny_clip
    after = _clip_weights(comfy, patched)
    for module, key in expected.items():
        want = (before[key].double() + 0.5 * _te_delta(path, module)).float()
        torch.testing.assert_close(after[key], want, rtol=1e-5, atol=1e-6)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(expected.values())
    if fmt == "onetrainer":
        assert "1 weights to CLIP-L (clip_l)" in text and "1 weights to T5-XXL (t5xxl)" in text, text
    else:
        assert "2 weights to CLIP-L (clip_l)" in text, text
    assert_equal(_clip_weights(comfy, tiny_clip), before)  # the input CLIP is untouched


def test_text_encoder_keys_without_a_clip_say_so(pack, tmp_path, monkeypatch):
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    path = write_lora("kohya", tmp_path / "k.safetensors", TE_SHAPE, 4, 3).path
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    _, text, clip = defs.run_load_lora(path.name, 1.0).values
    assert clip is None
    assert "k.safetensors also has 6 text-encoder keys (2 layers); connect a CLIP" in text, text


# --------------------------------------------------------------------------------------------- resized LoRAs


def test_resized_lora_merges_the_same_in_comfyui_core_and_in_our_nodes(comfy, pack, rt, plain, base, tmp_path):
    """The file `resize` writes is read by ComfyUI's own LoRA loader with the scale we meant (alpha/rank kept)."""
    import types

    import comfy.sd
    import comfy.utils

    case = write_lora("kohya", tmp_path / "big.safetensors", TINY, 8, 5)
    report = pack.lora_ops.resize_lora(case.path, tmp_path / "small.safetensors", rank=3)
    assert report.layers and all(layer.new_rank == 3 for layer in report.layers)
    small = pack.lora_ops.load_lora(tmp_path / "small.safetensors")
    want = fresh_merge(pack, base, [(small, 1.0)])
    ours = rt.attach_plan(plain, [rt.StackEntry("small", 1.0, small)])
    load(comfy, ours)
    assert_equal(weights(ours), want)
    load(comfy, plain)
    plain.model.model_config = types.SimpleNamespace(unet_config={})  # what model_lora_keys_unet reads
    sd = comfy.utils.load_torch_file(str(tmp_path / "small.safetensors"), safe_load=True)
    core, _ = comfy.sd.load_lora_for_models(plain, None, sd, 1.0, 0.0)
    assert len(core.patches) == len(small.targets)
    load(comfy, core)
    got = weights(core)
    for key in small.targets:
        ulp = want[key].float().abs() * 2**-7 + 1e-30  # one bf16 rounding apart at most
        assert ((got[key].float() - want[key].float()).abs() <= ulp).all(), key
    load(comfy, plain)
    assert_equal(weights(plain), base)


def test_resize_node_writes_a_smaller_copy_next_to_the_lora(pack, tmp_path, monkeypatch):
    defs = sys.modules[pack.__name__ + ".nodes.definitions"]
    write_lora("kohya", tmp_path / "big.safetensors", TINY, 8, 6)
    monkeypatch.setattr(defs.folder_paths, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name))
    (text,) = defs.run_resize("big.safetensors", rank=3).values
    assert "8 -> 3" in text and "less GPU memory when applied unmerged" in text
    assert set(pack.lora_ops.load_lora(tmp_path / "big_rank3.safetensors").ranks) == {3}
    (text,) = defs.run_resize("big.safetensors", rank=0, energy=0.5, output_name="half").values
    assert (tmp_path / "half.safetensors").is_file() and "rel. error" in text
    before = (tmp_path / "half.safetensors").read_bytes()
    with pytest.raises(pack.lora_ops.LoRAOpsError, match="already exists"):
        defs.run_resize("big.safetensors", rank=2, output_name="half.safetensors")
    assert (tmp_path / "half.safetensors").read_bytes() == before
