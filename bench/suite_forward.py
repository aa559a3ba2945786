"""GPU suite, forward section: peak memory of one Flux forward (bench/flux_forward.py) above the weights, with
no LoRA, with a LoRA merged, and unmerged as kohya's inference runs it (fp32 factors, autocast cache).
"""

from __future__ import annotations

import torch
from flux_forward import Flux, Runtime, make_inputs, unmerged_runtime
from suite_harness import Suite
from suite_measure import Peak

from lora_ops.units import GIB, MIB


def resident_bytes(suite: Suite) -> int:
    """Bytes allocated now (CUDA), or the weights' bytes (CPU, where nothing else is counted)."""
    if suite.device.type == "cuda":
        return torch.cuda.memory_allocated(suite.device)
    return sum(v.numel() * v.element_size() for v in suite.weights.values())


def forward_once(suite: Suite, label: str, runtime: Runtime, width: int, height: int, batch: int) -> dict:
    """A warm forward, then the measured one: what the warm one leaves resident is the autocast cache."""
    inputs = make_inputs(suite.shape, width, height, batch, suite.text_tokens, suite.device)
    model = Flux(suite.weights, suite.shape, runtime)
    # One outer autocast context that stays *disabled*: the per-branch autocast inside (kohya's fp32
    # LoRA) then keeps its weight cache across forwards, as one autocast context over sampling does.
    outer = torch.autocast(suite.device.type, dtype=torch.bfloat16, enabled=False)
    with torch.no_grad(), outer:
        with Peak(suite.device) as warm:
            model.forward(*inputs)  # warm: workspaces, autocast cache (what stays is the cache)
        with Peak(suite.device) as mem:
            y = model.forward(*inputs)
        del y
    del inputs
    return {"label": label, "width": width, "height": height, "batch": batch, "activation_bytes": mem.extra,
            "seconds": mem.seconds, "resident_after_warm_bytes": warm.end}


def measure_forwards(suite: Suite) -> dict:
    """Section "forward": no LoRA (batch 1, batch 2 = CFG, half size), unmerged per rank, merged smallest rank."""
    from lora_ops import merge_loras, restore

    out = {}
    w, h = suite.width, suite.height
    base_alloc = resident_bytes(suite)
    # warm-up at a small size: cuBLAS workspace and kernels exist before anything is measured
    forward_once(suite, "warm-up", Runtime(), 64, 64, 1)
    runs = [("none", None, w, h, 1), ("none", None, w, h, 2), ("none", None, w // 2, h // 2, 1)]
    for label, _, rw, rh, b in runs:
        r = forward_once(suite, label, Runtime(), rw, rh, b)
        r["total_bytes"] = resident_bytes(suite) + r["activation_bytes"]
        out[f"none {rw}x{rh} b{b}"] = r
        suite.say(f"forward no LoRA {rw}x{rh} batch {b}: activations {r['activation_bytes'] / MIB:.0f} MiB, "
                  f"total {r['total_bytes'] / GIB:.2f} GiB, {r['seconds'] * 1e3:.0f} ms")
    for rank, lora in suite.loras.items():
        before = resident_bytes(suite)
        runtime, params = unmerged_runtime(lora, suite.device)
        fp32_bytes = sum(p.numel() * p.element_size() for p in params)
        r = forward_once(suite, f"unmerged r{rank}", runtime, w, h, 1)
        r["lora_fp32_bytes"] = fp32_bytes
        r["lora_resident_bytes"] = fp32_bytes + r["resident_after_warm_bytes"]
        r["total_bytes"] = before + r["lora_resident_bytes"] + r["activation_bytes"]
        out[f"unmerged r{rank}"] = r
        suite.say(f"forward unmerged rank {rank}: LoRA resident {r['lora_resident_bytes'] / MIB:.0f} MiB "
                  f"(fp32 {fp32_bytes / MIB:.0f} + autocast cache {r['resident_after_warm_bytes'] / MIB:.0f}), "
                  f"activations {r['activation_bytes'] / MIB:.0f} MiB, total {r['total_bytes'] / GIB:.2f} GiB, "
                  f"{r['seconds'] * 1e3:.0f} ms")
        del runtime, params
        if suite.device.type == "cuda":
            torch.cuda.empty_cache()
        if suite.left() < 60:
            suite.say("  (time budget: skipping further LoRA forwards)")
            break
    rank = min(suite.loras)
    state = merge_loras(suite.weights, [(suite.loras[rank], 1.0)])
    r = forward_once(suite, f"merged r{rank}", Runtime(), w, h, 1)
    r["total_bytes"] = resident_bytes(suite) + r["activation_bytes"]
    out[f"merged r{rank}"] = r
    restore(suite.weights, state)
    del state
    none = out[f"none {w}x{h} b1"]["activation_bytes"]
    r["vs_none"] = r["activation_bytes"] / none - 1
    suite.say(f"forward merged rank {rank}: activations {r['activation_bytes'] / MIB:.0f} MiB "
              f"({100 * r['vs_none']:+.2f} % vs no LoRA; target within 1 %: "
              f"{'met' if abs(r['vs_none']) <= 0.01 else 'MISSED'}), {r['seconds'] * 1e3:.0f} ms")
    out["weights_allocated_bytes"] = base_alloc
    return out
