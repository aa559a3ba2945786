"""`python -m lora_ops demo`: the main job on a built-in default, with its own check.

Builds a real-width (3072) Flux-shaped model and a rank-32 kohya LoRA from seeds, merges the LoRA
in place tile by tile, and prints time, memory and whether the merged weights are right (compared
with an independent dense fp32 computation on a sample of layers).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from .flux import FluxShape, parameter_count
from .formats import load_lora
from .merge import MergeReport, merge_loras, restore
from .synthetic import flux_state_dict, kohya_lora_tensors
from .units import GIB, MIB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MIB


def run_demo(blocks: int = 1, rank: int = 32, device: str = "cpu") -> int:
    shape = FluxShape(depth=blocks, depth_single=blocks)
    print(f"Building a Flux-shaped model: width {shape.hidden}, {blocks} double + {blocks} single blocks, "
          f"{parameter_count(shape) / 1e6:.0f} M params, bf16, on {device} ...")
    weights = {k: v.to(device) for k, v in flux_state_dict(shape, seed=0).items()}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        path = Path(tmp) / f"demo_rank{rank}.safetensors"
        tensors = kohya_lora_tensors(shape, rank, seed=1, alpha=rank / 2)
        save_file(tensors, str(path))
        lora = load_lora(path)
    sample = ["double_blocks.0.img_attn.qkv.weight", f"single_blocks.{blocks - 1}.linear1.weight"]
    originals = {k: weights[k].clone() for k in sample}
    print(f"LoRA: kohya format, rank {rank}, {len(lora.targets)} layers, {lora.nbytes / MIB:.0f} MiB")

    report = MergeReport()
    rss_before = _rss_mib()
    start = time.perf_counter()
    state = merge_loras(weights, [(lora, 1.0)], report=report)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    merged_gib = report.elements * 2 / GIB
    print(f"Merged {report.keys} weights ({merged_gib:.2f} GiB) in place in {seconds:.2f} s "
          f"({merged_gib / seconds:.2f} GiB/s).")
    print(f"Working memory: tiles of up to {report.tile_rows_max} rows, {report.peak_tile_bytes / MIB:.1f} MiB; "
          f"exact-undo journal {state.journal_bytes / MIB:.1f} MiB "
          f"({state.journal_bytes / (report.elements * 2):.1%} of the merged weights); "
          f"process RSS {rss_before:.0f} -> {_rss_mib():.0f} MiB.")

    worst = 0
    exact = 0
    total = 0
    for key in sample:
        module = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        up = tensors[f"{module}.lora_up.weight"].float()
        down = tensors[f"{module}.lora_down.weight"].float()
        alpha = float(tensors[f"{module}.alpha"])
        expected = (originals[key].float().cpu() + (alpha / rank) * (up @ down)).to(torch.bfloat16)
        got = weights[key].cpu()
        ulps = (expected.view(torch.int16).int() - got.view(torch.int16).int()).abs()
        worst = max(worst, int(ulps.max()))
        exact += int((ulps == 0).sum())
        total += ulps.numel()
    ok = worst <= 1 and exact / total > 0.999
    print(f"Check against an independent dense fp32 merge of {len(sample)} layers: max {worst} ulp, "
          f"{exact / total:.4%} bit-exact -> {'OK' if ok else 'WRONG'}")

    restore(weights, state)
    back = all(torch.equal(weights[k], originals[k]) for k in sample)
    print(f"Restore without a backup copy: original bits back -> {'OK' if back else 'WRONG'}")
    return 0 if ok and back else 1
