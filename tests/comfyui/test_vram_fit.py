"""The VRAM Report's 'will this fit' half: the pack's planner on the model ComfyUI holds, as loaded (in-process).

What is checked: the planned weights are exactly the bytes the loaded diffusion model stores (bf16, and after the
pack's fp8 cast the fp8 payloads plus their scales); the activations are the planner's for that architecture and
size; the verdict and the cheapest change follow the card size; a non-model passthrough falls back to the Flux model
ComfyUI has loaded, and with none there is nothing to plan.
"""

from __future__ import annotations

import sys

import torch
from inprocess import entry, load
from lora_factory import TINY

GIB = 1 << 30


def _modules(pack):
    return sys.modules[pack.__name__ + ".nodes.fit"], sys.modules[pack.__name__ + ".nodes.definitions"]


def _stored_bytes(patcher) -> int:
    dm = patcher.model.diffusion_model
    return sum(t.numel() * t.element_size() for t in (*dm.parameters(), *dm.buffers()))


def test_plan_of_the_loaded_model_counts_its_weights_as_stored(comfy, pack, rt, plain, loras):
    fit, _ = _modules(pack)
    load(comfy, rt.attach_plan(plain, [entry(rt, loras["a"], 1.0, name="a.safetensors")]))
    plan = fit.plan_fit(plain, fit.FitRequest(width=512, height=256, batch=2), card_bytes=24 * GIB)
    dm = plain.model.diffusion_model
    assert plan.params == sum(p.numel() for p in dm.parameters())
    assert plan.weight_bytes == _stored_bytes(plain) == 2 * plan.params  # merged in place: still bf16, same size
    assert "Flux.1" in plan.model
    shape = pack.lora_ops.shape_from_state_dict({k: v.shape for k, v in dm.state_dict().items()})
    assert (shape.hidden, shape.depth, shape.depth_single) == (TINY.hidden, TINY.depth, TINY.depth_single)
    expected = pack.lora_ops.planner.activation_points(shape, 32 * 16, 512, 2)
    assert plan.activation_points == expected and plan.activation_bytes == max(expected.values())
    assert plan.lora_resident_bytes == 0 and plan.encoders == {}  # merged; encoders unloaded while sampling
    assert plan.fits is True


def test_verdict_and_cheapest_change_follow_the_card(comfy, pack, rt, plain):
    fit, _ = _modules(pack)
    load(comfy, plain)
    request = fit.FitRequest(width=1024, height=1024, batch=4, cfg=True)
    roomy = fit.plan_fit(plain, request, card_bytes=24 * GIB)
    assert roomy.fits and roomy.suggestion is None
    peak = roomy.peak_bytes
    tight = fit.plan_fit(plain, request, card_bytes=peak + (1 << 29) - (1 << 20))  # 1 MiB short after the reserve
    assert tight.fits is False and tight.suggestion_fits
    assert tight.suggestion[0] in (
        "fp8 weights (fp8-quality: modulation stays bf16)",
        "fp8 weights (fp8-default)",
        "no CFG",
        "batch 2",
    )
    lines = fit.fit_lines(plain, request, card_bytes=peak + (1 << 29) - (1 << 20))
    assert lines[0].startswith("Will this fit? Sampling 1024x1024, batch 4, CFG on")
    assert any(line.strip().startswith("verdict: does not fit") for line in lines)
    assert any("cheapest change that fits" in line for line in lines)


def test_after_the_fp8_cast_the_plan_counts_fp8_payloads_and_scales(comfy, pack, rt, plain):
    fit, _ = _modules(pack)
    cast = rt.attach_fp8(plain, "default")
    load(comfy, cast)
    plan = fit.plan_fit(cast, fit.FitRequest(), card_bytes=24 * GIB)
    assert plan.weight_bytes == _stored_bytes(cast) < 2 * plan.params
    assert "fp8_e4m3fn" in plan.weights and plan.weights["fp8_e4m3fn"][1] > 0


def test_report_node_shows_both_halves(comfy, pack, rt, plain):
    fit, defs = _modules(pack)
    result = defs.run_vram_report("check", passthrough="not a model", width=768, height=512, batch_size=1)
    assert "Will this fit? Sampling 768x512" in result.text
    assert "nothing to plan" in result.text  # nothing loaded, and the passthrough is no model
    load(comfy, plain)
    result = defs.run_vram_report("check", passthrough="not a model", width=768, height=512, batch_size=1)
    text = result.text
    assert "Loaded models" in text and "Will this fit?" in text and "sampling peak" in text
    if not torch.cuda.is_available():
        assert "no GPU: ComfyUI samples on the CPU" in text
    with_model = defs.run_vram_report("check", passthrough=plain)
    assert with_model.values[0] is plain and "Will this fit? Sampling 1024x1024" in with_model.text
