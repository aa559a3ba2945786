"""The pack's nodes merging in a real ComfyUI server (CPU, --bf16-unet, the 3072-wide 1+1-block Flux checkpoint).

Each test proves one point of the issue:

1. two branches from one UNETLoader in one queue, one through MergeLoRAIntoModel: each ModelSave writes its own
   weights (merged = a fresh lora_ops merge, bit-exact; plain = the untouched base, bit-exact); sampling differs,
   and the saved merged file loads back through UNETLoader and samples bit-identically;
2. re-queueing with another strength and back updates the weights in place in one pass (UNETLoader cached, the
   server logs the in-place switch and no restore), each save equal to a fresh merge;
4. POST /interrupt during a merge leaves the model unchanged and progress events arrive;
5. ComfyUI LoRA patches (LoraLoaderModelOnly) before and after our merge in one graph, then a plain branch;

and a LoRA merged then cast to fp8 on one branch beside the plain model on another. Points 3 (memory) and 6
(registration) are in the other files of this folder.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from comfy_harness import read_saved_model, reads_comfy_quant
from node_server import (
    assert_file_equals,
    cached_nodes,
    free,
    fresh_merge,
    latent_of,
    load_node,
    log_since,
    merge_node,
    sample_nodes,
    save_node,
    saved_file,
    unet,
    unique,
)

from lora_ops import load_lora
from lora_ops.merge import terms_by_target

# --------------------------------------------------------------------------------------------- 1. branches


def test_two_branches_one_queue_each_saves_its_own_weights(comfy_server, base, loras, record_property):
    s = 0.85
    merged_prefix, plain_prefix = unique("branch_merged"), unique("branch_plain")
    prompt = {
        "unet": unet(),
        "lora": load_node(loras["small"], s),
        "merge": merge_node("unet", "lora"),
        "save_merged": save_node("merge", merged_prefix),
        "save_plain": save_node("unet", plain_prefix),
    }
    merged_latent_node = sample_nodes(prompt, "merge", "merged", "latents/branch_merged")
    plain_latent_node = sample_nodes(prompt, "unet", "plain", "latents/branch_plain")
    t0 = time.perf_counter()
    entry = comfy_server.run(prompt, timeout=1800)
    record_property("two_branch_run_s", round(time.perf_counter() - t0, 1))

    assert_file_equals(saved_file(comfy_server, merged_prefix), fresh_merge(comfy_server, base, [(loras["small"], s)]))
    assert_file_equals(saved_file(comfy_server, plain_prefix), base)
    merged_latent = latent_of(comfy_server, entry, merged_latent_node)
    plain_latent = latent_of(comfy_server, entry, plain_latent_node)
    assert not torch.equal(merged_latent, plain_latent)
    text = entry["outputs"]["lora"]["text"][0]
    assert "4 Flux weights changed" in text and "0 unmapped" in text

    # The saved merged file loads back through UNETLoader and samples exactly like the merged branch.
    reload_name = f"flo_reload_{uuid.uuid4().hex[:6]}.safetensors"
    os.link(saved_file(comfy_server, merged_prefix), comfy_server.diffusion_models_dir / reload_name)
    again = {"unet": unet(reload_name)}
    node = sample_nodes(again, "unet", "reloaded", "latents/branch_reloaded")
    reloaded = comfy_server.run(again, timeout=1800)
    assert torch.equal(latent_of(comfy_server, reloaded, node), merged_latent)
    free(comfy_server)


# --------------------------------------------------------------------------------------------- 2. re-queue


def test_requeue_other_strength_updates_in_place(comfy_server, base, loras, record_property):
    lora = loras["other"]
    history = []
    for i, s in enumerate((1.0, -0.4, 1.0)):
        prefix = unique(f"requeue_{i}")
        prompt = {
            "unet": unet(),
            "lora": load_node(lora, s),
            "merge": merge_node("unet", "lora"),
            "save": save_node("merge", prefix),
        }
        mark = len(comfy_server.log_text())
        t0 = time.perf_counter()
        entry = comfy_server.run(prompt, timeout=1800)
        elapsed = time.perf_counter() - t0
        history.append((s, round(elapsed, 1)))
        assert_file_equals(saved_file(comfy_server, prefix), fresh_merge(comfy_server, base, [(lora, s)]))
        log = log_since(comfy_server, mark)
        if i > 0:
            assert "unet" in cached_nodes(entry)  # the checkpoint was not loaded again
            assert "switched the merged stack in place" in log, log[-3000:]
            assert "restored the base weights" not in log  # no unpatch / reload between strengths
    record_property("requeue_s", history)
    print(f"\nre-queue timings (strength, seconds): {history}")
    free(comfy_server)


# --------------------------------------------------------------------------------------------- 4. interrupt


def test_interrupt_during_merge_leaves_model_unchanged(comfy_server, base, loras):
    names = [loras[f"stack{i}"] for i in range(4)]
    prefix = unique("interrupted")
    prompt = {"unet": unet()}
    previous = None
    for i, name in enumerate(names):
        prompt[f"lora{i}"] = load_node(name, 0.5 + 0.1 * i, previous)
        previous = f"lora{i}"
    prompt["merge"] = merge_node("unet", previous)
    prompt["save"] = save_node("merge", prefix)
    with comfy_server.listen() as ws:
        prompt_id = comfy_server.queue(prompt)
        first = ws.wait_for(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == prompt_id, 900)
        comfy_server.interrupt(prompt_id)
        entry = comfy_server.wait(prompt_id, timeout=900, check=False)
    assert first["data"]["node"] == "save" and 0 < first["data"]["value"] < first["data"]["max"]
    assert entry["status"]["status_str"] == "error"
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_error" not in events, comfy_server.error_summary(entry)
    assert not list(comfy_server.output_dir.glob(prefix.split("/")[-1] + "*"))

    plain = unique("after_interrupt_plain")
    comfy_server.run({"unet": unet(), "save": save_node("unet", plain)}, timeout=1800)
    assert_file_equals(saved_file(comfy_server, plain), base)

    # The same prompt again, not interrupted: the full stack, with progress up to the total.
    with comfy_server.listen() as ws:
        prompt_id = comfy_server.queue(prompt)
        comfy_server.wait(prompt_id, timeout=1800)
        ws.wait_for(
            lambda e: (
                e["type"] == "executing" and e["data"].get("prompt_id") == prompt_id and e["data"].get("node") is None
            ),
            60,
        )
    progress = [d for d in ws.of("progress", prompt_id) if d["node"] == "save"]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    stack = [(name, 0.5 + 0.1 * i) for i, name in enumerate(names)]
    assert_file_equals(saved_file(comfy_server, prefix), fresh_merge(comfy_server, base, stack))
    free(comfy_server)


# --------------------------------------------------------------------------------------------- 5. with core LoRAs


def _close(path: Path, base: dict, expected_delta: dict[str, torch.Tensor]) -> None:
    saved, _ = read_saved_model(path)
    for key, delta in expected_delta.items():
        got = saved[key].float()
        want = base[key].float() + delta
        err = (got - want).abs().max().item()
        assert err <= want.abs().max().item() * 2**-7, (key, err)


@pytest.mark.parametrize("order", ["core_then_ours", "ours_then_core"])
def test_core_lora_loader_before_and_after_ours(comfy_server, base, loras, order):
    ours_name, core_name = loras["small"], loras["other"]
    both_prefix, plain_prefix = unique(f"{order}_both"), unique(f"{order}_plain")
    core = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": core_name, "strength_model": 0.7}}
    prompt = {"unet": unet(), "lora": load_node(ours_name, 1.0)}
    if order == "core_then_ours":
        prompt["core"] = {**core, "inputs": {**core["inputs"], "model": ["unet", 0]}}
        prompt["merge"] = merge_node("core", "lora")
        last = "merge"
    else:
        prompt["merge"] = merge_node("unet", "lora")
        prompt["core"] = {**core, "inputs": {**core["inputs"], "model": ["merge", 0]}}
        last = "core"
    prompt["save_both"] = save_node(last, both_prefix)
    prompt["save_plain"] = save_node("unet", plain_prefix)
    comfy_server.run(prompt, timeout=1800)
    ours_delta = {
        k: v.float() - base[k].float()
        for k, v in fresh_merge(comfy_server, base, [(ours_name, 1.0)]).items()
        if not torch.equal(v, base[k])
    }
    core_delta = {
        k: v.float() - base[k].float()
        for k, v in fresh_merge(comfy_server, base, [(core_name, 0.7)]).items()
        if not torch.equal(v, base[k])
    }
    total = {k: ours_delta.get(k, 0) + core_delta.get(k, 0) for k in set(ours_delta) | set(core_delta)}
    _close(saved_file(comfy_server, both_prefix), base, total)
    assert_file_equals(saved_file(comfy_server, plain_prefix), base)
    # and our branch alone afterwards is still exactly a fresh merge
    alone = unique(f"{order}_alone")
    comfy_server.run(
        {
            "unet": unet(),
            "lora": load_node(ours_name, 1.0),
            "merge": merge_node("unet", "lora"),
            "save": save_node("merge", alone),
        },
        timeout=1800,
    )
    assert_file_equals(saved_file(comfy_server, alone), fresh_merge(comfy_server, base, [(ours_name, 1.0)]))
    free(comfy_server)


# --------------------------------------------------------------------------------------------- fp8 cast


def test_fp8_cast_branch_next_to_plain_branch(comfy_server, base, loras):
    """LoRA merged then cast to fp8 on one branch, the plain model saved on another, in one queue."""
    from lora_ops import fp8

    plain_prefix, cast_prefix = unique("fp8_plain"), unique("fp8_cast")
    prompt = {
        "unet": unet(),
        "lora": load_node(loras["small"], 1.0),
        "merge": merge_node("unet", "lora"),
        "cast": {"class_type": "CastFluxFP8", "inputs": {"model": ["merge", 0], "policy": "default"}},
        "save_plain": save_node("unet", plain_prefix),
        "save_cast": save_node("cast", cast_prefix),
    }
    cast_node = sample_nodes(prompt, "cast", "fp8", "latents/fp8_cast")
    plain_node = sample_nodes(prompt, "unet", "plain", "latents/fp8_plain")
    entry = comfy_server.run(prompt, timeout=1800)
    assert "fp8 (default" in entry["outputs"]["cast"]["text"][0]
    assert_file_equals(saved_file(comfy_server, plain_prefix), base)
    cast_latent, plain_latent = latent_of(comfy_server, entry, cast_node), latent_of(comfy_server, entry, plain_node)
    assert torch.isfinite(cast_latent).all() and not torch.equal(cast_latent, plain_latent)
    # ModelSave of the fp8 branch: each fp8 layer is the merge-then-quantise of the untouched bf16 original, with
    # its scale as this ComfyUI names it (comfy_quant where it has quantized tensors: the file then loads natively;
    # 0.3.x names, no marker, on 0.3.x: there the CLI writes loadable fp8 checkpoints)
    scale_suffix = ".weight_scale" if reads_comfy_quant(comfy_server.comfyui_root) else ".scale_weight"
    terms = terms_by_target([(load_lora(comfy_server.loras_dir / loras["small"]), 1.0)])
    saved, _ = read_saved_model(saved_file(comfy_server, cast_prefix))
    fp8_keys = [k for k in base if fp8.get_policy("default").selects(k, base[k].shape)]
    assert fp8_keys
    for key in fp8_keys:
        q, scale = fp8.quantize_merged(base[key], terms.get(key, []), key=key)
        got = saved[key]
        assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(saved[key.removesuffix(".weight") + scale_suffix], scale)
    alone = unique("after_fp8_alone")
    comfy_server.run(
        {
            "unet": unet(),
            "lora": load_node(loras["small"], 1.0),
            "merge": merge_node("unet", "lora"),
            "save": save_node("merge", alone),
        },
        timeout=1800,
    )
    assert_file_equals(saved_file(comfy_server, alone), fresh_merge(comfy_server, base, [(loras["small"], 1.0)]))
    free(comfy_server)
