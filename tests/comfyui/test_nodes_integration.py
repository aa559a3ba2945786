"""The pack's nodes in a real ComfyUI server (CPU, --bf16-unet, the 3072-wide 1+1-block Flux checkpoint).

Each test proves one point of the issue:

1. two branches from one UNETLoader in one queue, one through MergeLoRAIntoModel: each ModelSave writes its own
   weights (merged = a fresh lora_ops merge, bit-exact; plain = the untouched base, bit-exact); sampling differs,
   and the saved merged file loads back through UNETLoader and samples bit-identically;
2. re-queueing with another strength and back updates the weights in place in one pass (UNETLoader cached, the
   server logs the in-place switch and no restore), each save equal to a fresh merge;
3. memory: the server's RSS during our merge vs core LoraLoaderModelOnly on the same file (printed);
4. POST /interrupt during a merge leaves the model unchanged and progress events arrive;
5. ComfyUI LoRA patches (LoraLoaderModelOnly) before and after our merge in one graph, then a plain branch;
6. the V3 registration (this server) and the V1 fallback (a second server with FLUX_LORA_OPS_FORCE_V1=1) expose
   the same nodes.

The merge engine on this machine's CPU is slow (tens of seconds for a LoRA on every block Linear of the test
model), so most LoRAs here touch a few layers; the memory test uses the whole single block.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from comfy_harness import (
    FLUX_TINY_NAME,
    PACK_DIR_NAME,
    ComfyServer,
    free_port,
    ksampler_node,
    make_base_directory,
    read_saved_model,
    reads_comfy_quant,
)
from safetensors.torch import load_file, save_file

from lora_ops import FluxShape, load_lora, merge_loras
from lora_ops.flux import flux_weight_shapes
from lora_ops.merge import terms_by_target
from lora_ops.synthetic import kohya_lora_tensors

SHAPE = FluxShape(depth=1, depth_single=1)

SMALL = ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj", "final_layer.linear", "img_in")
OTHER = ("double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.2", "single_blocks.0.linear2")
SINGLE_BLOCK = ("single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin")


# --------------------------------------------------------------------------------------------- helpers


def write_lora(path: Path, modules: tuple[str, ...], rank: int, seed: int) -> Path:
    """A kohya LoRA (lora_unet_*, alpha) on some Flux Linears; core ComfyUI reads the same file."""
    names = set(flux_weight_shapes(SHAPE))
    tensors = kohya_lora_tensors(SHAPE, rank, seed, relative_change=0.05)
    for module in modules:  # kohya_lora_tensors covers block Linears; add the others the same way
        if module.startswith(("double_blocks", "single_blocks")):
            continue
        rows, cols = flux_weight_shapes(SHAPE)[module + ".weight"]
        gen = torch.Generator().manual_seed(seed + len(module))
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"] = (torch.randn(rank, cols, generator=gen) / cols**0.5).to(torch.bfloat16)
        tensors[f"{kohya}.lora_up.weight"] = (torch.randn(rows, rank, generator=gen) * 0.002).to(torch.bfloat16)
        tensors[f"{kohya}.alpha"] = torch.tensor(float(rank))
    prefixes = tuple("lora_unet_" + m.replace(".", "_") + "." for m in modules)
    keep = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    assert all(m + ".weight" in names for m in modules)
    save_file(keep, str(path))
    return path


@pytest.fixture(scope="module")
def base(flux_tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(flux_tiny_checkpoint))


@pytest.fixture(scope="module")
def loras(comfy_server, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("node_loras")
    specs = {
        "small": (SMALL, 8, 11),
        "other": (OTHER, 4, 12),
        "single": (SINGLE_BLOCK, 32, 13),
        **{f"stack{i}": (OTHER, 16, 20 + i) for i in range(4)},
    }
    out = {}
    for name, (modules, rank, seed) in specs.items():
        out[name] = comfy_server.add_lora(write_lora(folder / f"flo_{name}.safetensors", modules, rank, seed))
    return out


def fresh_merge(server: ComfyServer, base: dict, stack: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """The reference: lora_ops in this process, on a copy of the checkpoint's tensors."""
    parsed = [(load_lora(server.loras_dir / name), s) for name, s in stack]
    touched = {k for lora, _ in parsed for k in lora.targets}
    out = {k: (v.clone() if k in touched else v) for k, v in base.items()}
    merge_loras(out, parsed)
    return out


def saved_file(server: ComfyServer, prefix: str) -> Path:
    files = sorted(server.output_dir.glob(prefix + "_*_.safetensors"))
    assert len(files) == 1, files
    return files[0]


def assert_file_equals(path: Path, expected: dict[str, torch.Tensor]) -> None:
    saved, _ = read_saved_model(path)
    assert set(saved) == set(expected)
    bad = [k for k in expected if not torch.equal(saved[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ from the expected weights, e.g. {bad[:4]}"


def unique(tag: str) -> str:
    return f"diffusion_models/{tag}_{uuid.uuid4().hex[:8]}"


def unet(name: str = FLUX_TINY_NAME) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def load_node(name: str, strength: float, stack_from: str | None = None) -> dict:
    inputs = {"lora_name": name, "strength": strength}
    if stack_from is not None:
        inputs["lora_stack"] = [stack_from, 0]
    return {"class_type": "LoadFluxLoRA", "inputs": inputs}


def merge_node(model_from: str, stack_from: str) -> dict:
    return {"class_type": "MergeLoRAIntoModel", "inputs": {"model": [model_from, 0], "lora_stack": [stack_from, 0]}}


def save_node(model_from: str, prefix: str) -> dict:
    return {"class_type": "ModelSave", "inputs": {"model": [model_from, 0], "filename_prefix": prefix}}


def sample_nodes(prompt: dict, model_from: str, tag: str, latent_prefix: str, seed: int = 5) -> str:
    """KSampler (1 euler step, 64x64) + SaveLatent on `model_from`; returns the SaveLatent node id."""
    prompt.setdefault("cond", {"class_type": "FluxLoRAOpsTestConditioning", "inputs": {"seed": 3}})
    prompt.setdefault(
        "latent", {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    )
    prompt[f"ks_{tag}"] = ksampler_node([model_from, 0], ["cond", 0], ["latent", 0], seed)
    prompt[f"sl_{tag}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"ks_{tag}", 0], "filename_prefix": latent_prefix},
    }
    return f"sl_{tag}"


def latent_of(server: ComfyServer, entry: dict, node_id: str) -> torch.Tensor:
    [path] = server.output_files(entry, node_id, "latents")
    return load_file(str(path))["latent_tensor"]


def cached_nodes(entry: dict) -> set[str]:
    return {n for event, data in entry["status"]["messages"] if event == "execution_cached" for n in data["nodes"]}


def log_since(server: ComfyServer, mark: int) -> str:
    return server.log_text()[mark:]


def settle(server: ComfyServer) -> dict:
    """Run a VRAMReport (always runs): returns once everything queued before it is done.

    The prompt holds the usual UNETLoader node, so ComfyUI's cache keeps its output (the loaded checkpoint)
    instead of dropping it as a node absent from the latest prompt.
    """
    prompt = {
        "unet": unet(),
        "r": {"class_type": "VRAMReport", "inputs": {"label": "settle", "passthrough": ["unet", 0]}},
    }
    return server.run(prompt, timeout=900)


def free(server: ComfyServer) -> None:
    """POST /free (unload_models only: node outputs stay cached, so the checkpoint stays loaded in RAM).

    ComfyUI unloads every model, unpatching it (our undo runs), before it takes the next prompt.
    """
    server.free(unload_models=True, free_memory=False)
    time.sleep(1.0)  # let the worker wake on the flag; the settle prompt then queues behind the unload
    settle(server)


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


# --------------------------------------------------------------------------------------------- 3. memory


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.005):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def measure(server: ComfyServer, prompt: dict) -> dict:
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    with RssSampler(server.proc.pid) as sampler:
        server.run(prompt, timeout=1800)
    elapsed = time.perf_counter() - t0
    after = proc.memory_info().rss
    mib = 2**20
    return {
        "before_MiB": round(before / mib),
        "peak_delta_MiB": round((sampler.peak - before) / mib),
        "after_delta_MiB": round((after - before) / mib),
        "seconds": round(elapsed, 1),
    }


def start_server(root: Path, base_dir: Path, checkpoint: Path, monkeypatch, **env: str) -> ComfyServer:
    """Another ComfyUI server (own base directory, same checkpoint, extra environment)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    make_base_directory(base_dir, checkpoint)
    server = ComfyServer(comfyui_root=root, base_dir=base_dir, log_path=base_dir / "server.log", port=free_port())
    server.start(timeout=300)
    return server


def test_memory_ours_vs_core_lora_loader(
    comfy_server, flux_tiny_checkpoint, tmp_path, monkeypatch, loras, record_property
):
    """RSS of a dedicated server: plain sampling, our merge, core LoraLoaderModelOnly (same file and strength).

    glibc keeps freed blocks below its dynamic mmap threshold inside the process, so with the default allocator
    RSS shows every past temporary rather than what is alive; the server runs with MALLOC_MMAP_THRESHOLD_=128 KiB
    so that large tensors are returned to the system when freed and "after" is the memory each method keeps.
    """
    shapes = flux_weight_shapes(SHAPE)
    patched_mib = sum(torch.Size(shapes[m + ".weight"]).numel() * 2 for m in SINGLE_BLOCK) / 2**20
    server = start_server(
        comfy_server.comfyui_root,
        tmp_path / "mem_base",
        flux_tiny_checkpoint,
        monkeypatch,
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    try:
        lora = server.add_lora(comfy_server.loras_dir / loras["single"])
        warm = {"unet": unet()}
        sample_nodes(warm, "unet", "warm", "latents/mem_warm", seed=1)
        server.run(warm, timeout=1800)  # model loaded, first sampling done: the baseline
        figures = {}
        plain = {"unet": unet()}
        sample_nodes(plain, "unet", "mem", "latents/mem_plain", seed=2)
        figures["plain sampling (no LoRA)"] = measure(server, plain)
        ours = {"unet": unet(), "lora": load_node(lora, 1.0), "merge": merge_node("unet", "lora")}
        sample_nodes(ours, "merge", "mem", "latents/mem_ours", seed=3)
        figures["MergeLoRAIntoModel"] = measure(server, ours)
        free(server)
        figures["  after /free (our undo)"] = {
            "rss_MiB": round(psutil.Process(server.proc.pid).memory_info().rss / 2**20)
        }
        core = {
            "unet": unet(),
            "lora": {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": ["unet", 0], "lora_name": lora, "strength_model": 1.0},
            },
        }
        sample_nodes(core, "lora", "mem", "latents/mem_core", seed=4)
        figures["LoraLoaderModelOnly"] = measure(server, core)
        free(server)
        figures["  after /free (core unpatch)"] = {
            "rss_MiB": round(psutil.Process(server.proc.pid).memory_info().rss / 2**20)
        }
    finally:
        server.stop()
    record_property("rss", figures)
    print(
        f"\nserver RSS (MALLOC_MMAP_THRESHOLD_=128KiB), rank-32 LoRA on the whole single block "
        f"({patched_mib:.0f} MiB of bf16 weights patched), load + 1 sampling step, deltas vs before each prompt:"
    )
    for name, fig in figures.items():
        print(f"  {name:28s} {fig}")
    ours_kept, core_kept = (
        figures["MergeLoRAIntoModel"]["after_delta_MiB"],
        figures["LoraLoaderModelOnly"]["after_delta_MiB"],
    )
    # Core keeps the original of every patched weight next to the patched copy; we keep a sparse journal.
    assert core_kept > 0.8 * patched_mib
    assert ours_kept < 0.5 * patched_mib
    assert figures["MergeLoRAIntoModel"]["peak_delta_MiB"] < figures["LoraLoaderModelOnly"]["peak_delta_MiB"]


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


# --------------------------------------------------------------------------------------------- 6. registration

OUR_NODES = ("LoadFluxLoRA", "MergeLoRAIntoModel", "CastFluxFP8", "VRAMReport", "ResizeFluxLoRA")


def _node_signature(info: dict) -> dict:
    """What a user sees of a node in /object_info: inputs (group, type, has tooltip), outputs, category."""
    inputs = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            inputs[name] = (group, kind, bool(len(spec) > 1 and spec[1].get("tooltip")))
    return {
        "inputs": inputs,
        "outputs": list(info["output"]),
        "output_names": list(info["output_name"]),
        "category": info["category"],
        "output_node": info["output_node"],
        "has_description": bool(info["description"]),
    }


def test_v3_registration_exposes_the_nodes(comfy_server):
    info = comfy_server.object_info()
    for name in OUR_NODES:
        assert name in info, name
        sig = _node_signature(info[name])
        assert sig["category"] == "Flux LoRA Ops" and sig["has_description"]
        assert all(tooltip for _, _, tooltip in sig["inputs"].values()), (name, sig)
    assert info["LoadFluxLoRA"]["output"] == ["FLUX_LORA_STACK", "STRING", "CLIP"]
    assert info["VRAMReport"]["output"] == ["*", "STRING", "IMAGE"] and info["VRAMReport"]["output_node"]
    assert info["MergeLoRAIntoModel"]["output"] == ["MODEL"]
    failed = [line for line in comfy_server.log_text().splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if line.rstrip().endswith(PACK_DIR_NAME)], failed


def test_v1_fallback_registration_same_nodes(comfy_server, flux_tiny_checkpoint, tmp_path, monkeypatch, base, loras):
    """A second server with FLUX_LORA_OPS_FORCE_V1=1: the V1 classes expose the same nodes and merge the same."""
    v3_info = {name: _node_signature(comfy_server.object_info(name)[name]) for name in OUR_NODES}
    server = start_server(
        comfy_server.comfyui_root, tmp_path / "v1_base", flux_tiny_checkpoint, monkeypatch, FLUX_LORA_OPS_FORCE_V1="1"
    )
    try:
        for name in OUR_NODES:
            info = server.object_info(name)
            assert name in info, name
            assert _node_signature(info[name]) == v3_info[name], name
            assert info[name]["python_module"] == comfy_server.object_info(name)[name]["python_module"]
        server.add_lora(comfy_server.loras_dir / loras["small"])
        prefix = unique("v1_merged")
        entry = server.run(
            {
                "unet": unet(),
                "lora": load_node(loras["small"], 0.5),
                "merge": merge_node("unet", "lora"),
                "save": save_node("merge", prefix),
                "report": {"class_type": "VRAMReport", "inputs": {"passthrough": ["merge", 0]}},
            },
            timeout=1800,
        )
        assert "Process RSS" in entry["outputs"]["report"]["text"][0]
        assert_file_equals(saved_file(server, prefix), fresh_merge(comfy_server, base, [(loras["small"], 0.5)]))
        failed = [line for line in server.log_text().splitlines() if "IMPORT FAILED" in line]
        assert not [line for line in failed if line.rstrip().endswith(PACK_DIR_NAME)], failed
    finally:
        server.stop()
