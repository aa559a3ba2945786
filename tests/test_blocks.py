"""Per-block strengths: the spec grammar, its errors, and merges that scale each block's change."""

from __future__ import annotations

import pytest
import torch
from lora_factory import TINY, base_state_dict, write_lora

from lora_ops import LoRAOpsError, MergeReport, load_lora, merge_loras
from lora_ops.blocks import block_counts, blocks_touched, format_ranges, parse_block_spec, with_block_weights

FLUX1 = {"double": 19, "single": 38}
KLEIN_4B = {"double": 5, "single": 20}


def test_later_rules_override_earlier_ones():
    w = parse_block_spec("*=0.5, single=0, single.10-20=2, double.3=1.5", FLUX1)
    assert w.other == 0.5
    assert w.blocks["double"] == tuple(1.5 if i == 3 else 0.5 for i in range(19))
    assert w.blocks["single"] == tuple(2.0 if 10 <= i <= 20 else 0.0 for i in range(38))
    everything = parse_block_spec("double=3, *=0.25", FLUX1)
    assert everything.other == 0.25 and set(everything.blocks["double"]) == {0.25}


def test_scale_for_names_blocks_and_weights_outside_them():
    w = parse_block_spec("*=0.5, double.2=0, single.37=3", FLUX1)
    assert w.scale_for("double_blocks.2.img_attn.qkv.weight") == 0.0
    assert w.scale_for("double_blocks.12.txt_mlp.0.bias") == 0.5
    assert w.scale_for("single_blocks.37.linear1.weight") == 3.0
    assert w.scale_for("img_in.weight") == 0.5
    assert w.scale_for("final_layer.adaLN_modulation.1.weight") == 0.5
    assert w.scale_for("double_stream_modulation_img.lin.weight") == 0.5  # Flux.2 shared modulation: outside


def test_empty_spec_is_identity_and_presets_follow_the_model_counts():
    assert parse_block_spec("", FLUX1).is_identity
    assert parse_block_spec("all", FLUX1).is_identity
    double_only = parse_block_spec("double only", FLUX1)
    assert (
        double_only.other == 0 and set(double_only.blocks["double"]) == {1} and set(double_only.blocks["single"]) == {0}
    )
    late = parse_block_spec("Style: late single blocks", KLEIN_4B)
    assert late.blocks["single"] == tuple(1.0 if i >= 10 else 0.0 for i in range(20))
    assert set(late.blocks["double"]) == {0.0} and late.other == 0
    mixed = parse_block_spec("single only, single.0=0.5", KLEIN_4B)
    assert mixed.blocks["single"][0] == 0.5 and mixed.blocks["single"][1] == 1 and set(mixed.blocks["double"]) == {0}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("single.38=1", ["single.38", "outside this model", "single blocks 0-37"]),
        ("double.5=1", ["double.5", "double blocks 0-4"]),
        ("single.12-3=1", ["runs backwards", "single.3-12"]),
        ("triple=1", ["unknown selector", "triple"]),
        ("double=half", ["not a number", "half"]),
        ("double=inf", ["not a finite number"]),
        ("no such preset", ["neither a SELECTOR=VALUE rule nor a preset", "double only"]),
    ],
)
def test_bad_specs_say_what_and_how(spec, words):
    counts = KLEIN_4B if spec.startswith("double.5") else FLUX1
    with pytest.raises(LoRAOpsError) as info:
        parse_block_spec(spec, counts)
    for word in words:
        assert word in str(info.value)
    assert "SELECTOR=VALUE" in str(info.value)


def test_block_counts_from_weight_names():
    names = [
        "img_in.weight",
        "double_blocks.0.img_mod.lin.weight",
        "double_blocks.4.x.weight",
        "single_blocks.19.linear1.weight",
    ]
    assert block_counts(names) == KLEIN_4B


def test_format_ranges():
    assert format_ranges([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert format_ranges([]) == ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blocks")
    base = base_state_dict(TINY, seed=11)
    case = write_lora("kohya", tmp / "kohya.safetensors", TINY, rank=4, seed=12)
    return base, case


def _multiplier(key: str) -> float:
    """The spec used below, evaluated by hand: "*=0.5, double=2, double.1=0, single.1=-1"."""
    if key.startswith("double_blocks.1."):
        return 0.0
    if key.startswith("double_blocks."):
        return 2.0
    if key.startswith("single_blocks.1."):
        return -1.0
    return 0.5


SPEC = "*=0.5, double=2, double.1=0, single.1=-1"


def _reference(base, case, strength, multiplier):
    out = dict(base)
    for key, delta in case.expected_at(strength).items():
        out[key] = (base[key].float() + delta * multiplier(key)).to(base[key].dtype)
    return out


def test_merge_scales_each_blocks_change(tiny):
    base, case = tiny
    lora = load_lora(case.path)
    assert blocks_touched(lora)["double"] == [0, 1] and blocks_touched(lora)["single"] == [0, 1]
    weighted = with_block_weights(lora, parse_block_spec(SPEC, block_counts(base)))
    weights = {k: v.clone() for k, v in base.items()}
    merge_loras(weights, [(weighted, 0.75)])
    want = _reference(base, case, 0.75, _multiplier)
    for key in base:
        torch.testing.assert_close(weights[key], want[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(weights[k], base[k]) for k in base if k.startswith("img_in"))


def test_changing_the_spec_remerges_only_changed_weights_in_one_pass(tiny):
    base, case = tiny
    lora = load_lora(case.path)
    counts = block_counts(base)
    weights = {k: v.clone() for k, v in base.items()}
    state = merge_loras(weights, [(lora, 0.75)])
    report = MergeReport()
    state = merge_loras(
        weights, [(with_block_weights(lora, parse_block_spec("single.1=-1", counts)), 0.75)], state=state, report=report
    )
    changed = [k for k in lora.targets if k.startswith("single_blocks.1.")]
    assert report.keys == len(changed) > 0
    want = _reference(base, case, 0.75, lambda k: -1.0 if k.startswith("single_blocks.1.") else 1.0)
    for key in base:
        torch.testing.assert_close(weights[key], want[key], rtol=0, atol=0, msg=key)
    merge_loras(weights, [], state=state)
    for key in base:
        assert torch.equal(weights[key], base[key]), key


def test_a_spec_for_a_bigger_model_is_refused_before_any_weight_changes(tiny):
    base, _ = tiny
    with pytest.raises(LoRAOpsError, match="single blocks 0-1"):
        parse_block_spec("single.2-3=0", block_counts(base))
