"""GPU suite, merge section: lora_ops.merge_loras in place on the device against the memory-traffic floor (a copy
of every merged weight, timed in the same run), with its extra VRAM, restore time and exactness, in three modes.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch
from suite_harness import Suite
from suite_measure import Peak, timed

from lora_ops.units import GIB, MIB

if TYPE_CHECKING:
    from lora_ops import LoRAFile


def merged_bytes(weights: dict[str, torch.Tensor], lora: LoRAFile) -> int:
    return sum(weights[k].numel() * weights[k].element_size() for k in lora.targets)


def copy_floor(suite: Suite, lora: LoRAFile) -> dict:
    """Time to read and write every weight the LoRA touches: no in-place merge can beat it."""
    keys = list(lora.targets)
    biggest = max(suite.weights[k].numel() for k in keys)
    scratch = torch.empty(biggest, dtype=torch.bfloat16, device=suite.device)

    def run():
        for k in keys:
            w = suite.weights[k]
            scratch[: w.numel()].view(w.shape).copy_(w)

    run()  # warm
    times = [timed(suite.device, run) for _ in range(3)]
    scratch = None  # noqa: F841 - free it before the merges
    nbytes = merged_bytes(suite.weights, lora)
    floor = statistics.median(times)
    return {"seconds": floor, "times": times, "bytes_read_plus_written": 2 * nbytes,
            "bandwidth_gbs": 2 * nbytes / floor / 1e9}


def measure_merges(suite: Suite) -> dict:
    """Section "merge": per rank, the copy floor, then exact undo, no journal and exact undo with a 64 MiB tile."""
    from lora_ops import MergeOptions, MergeReport, merge_loras, restore

    out = {}
    sample = ["double_blocks.0.img_attn.qkv.weight", f"single_blocks.{suite.shape.depth_single - 1}.linear1.weight"]
    for rank, lora in suite.loras.items():
        floor = copy_floor(suite, lora)
        suite.say(f"rank {rank}: copy floor {floor['seconds'] * 1e3:.1f} ms for "
                  f"{floor['bytes_read_plus_written'] / GIB:.1f} GiB read+written "
                  f"({floor['bandwidth_gbs']:.0f} GB/s)")
        originals = {k: suite.weights[k].clone() for k in sample}
        per_mode = {}
        # The default tile follows the device's free memory (lora_ops.rows.tile_budget); the fixed 64 MiB tile
        # shows what the time costs when memory is short. Targets: <= 2x the copy floor, <= 64 MiB extra VRAM.
        exact_state = None
        for exact, tile_bytes in ((True, None), (False, None), (True, 64 * MIB)):
            runs = []
            for rep in range(suite.args.repeats):
                if rep and suite.left() < 120:
                    suite.say("  (time budget: fewer repeats)")
                    break
                report = MergeReport()
                with Peak(suite.device) as mem:
                    state = merge_loras(suite.weights, [(lora, 1.0)], report=report,
                                        options=MergeOptions(exact_undo=exact, tile_bytes=tile_bytes))
                check = None
                if rep == 0:
                    check = check_merge(suite, lora, originals, sample)
                # Without a journal restore refuses; the merged bits are the same as with one, so the state
                # of the exact merge (kept from the first mode) takes them out exactly.
                undo_state = state if exact else exact_state
                restore_s = timed(suite.device, lambda st=undo_state: restore(suite.weights, st))
                if exact:
                    exact_state = state
                exact_back = all(torch.equal(suite.weights[k], originals[k]) for k in sample)
                runs.append({"seconds": mem.seconds, "extra_bytes": mem.extra, "restore_seconds": restore_s,
                             "journal_bytes": state.journal_bytes, "peak_tile_bytes": report.peak_tile_bytes,
                             "restore_bit_exact_on_sample": exact_back, "check": check})
                del state, undo_state
            med = statistics.median(r["seconds"] for r in runs)
            mode = ("exact_undo" if exact else "no_journal") + ("" if tile_bytes is None else "_tile_64mib")
            per_mode[mode] = {
                "runs": runs, "median_seconds": med, "median_extra_bytes": statistics.median(r["extra_bytes"]
                                                                                             for r in runs),
                "over_floor": med / floor["seconds"], "tile_bytes": tile_bytes,
                "targets_met": {"time_le_2x_copy_floor": med / floor["seconds"] <= 2,
                                "extra_vram_le_64mib": runs[0]["extra_bytes"] <= 64 * MIB}}
            r0 = runs[0]
            suite.say(f"  merge rank {rank} {mode}: {med:.3f} s median of {len(runs)} "
                      f"({med / floor['seconds']:.1f}x the copy floor), extra VRAM {r0['extra_bytes'] / MIB:.0f} MiB"
                      f" (tile {r0['peak_tile_bytes'] / MIB:.0f} MiB), journal {r0['journal_bytes'] / MIB:.0f} MiB"
                      f" in RAM, restore {r0['restore_seconds']:.3f} s, bit-exact "
                      f"{r0['restore_bit_exact_on_sample']}; check {r0['check']}")
        del originals
        out[rank] = {"floor": floor, **per_mode}
    return out


def check_merge(suite: Suite, lora: LoRAFile, originals: dict[str, torch.Tensor], sample: list[str]) -> dict:
    """Merged sample weights vs an independent dense fp32 computation, in bf16 units."""
    worst, differing, total = 0.0, 0, 0
    for k in sample:
        ref = originals[k].float()
        for a in lora.targets[k]:
            up, down = a.up.to(suite.device, torch.float32), a.down.to(suite.device, torch.float32)
            ref[a.row_offset : a.row_offset + up.shape[0]] += a.scale * (up @ down)
        ref = ref.to(torch.bfloat16)
        diff = (suite.weights[k].float() - ref.float()).abs()
        ulp = ref.float().abs().clamp_min(1e-30) * 2.0**-7
        worst = max(worst, float((diff / ulp).max()))
        differing += int((suite.weights[k] != ref).sum())
        total += ref.numel()
        del ref, diff, ulp
    return {"max_ulps": round(worst, 3), "differing": differing, "of": total}
