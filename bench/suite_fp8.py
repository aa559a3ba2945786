"""GPU suite, fp8 section: the cast to scaled fp8 (lora_ops.fp8.merge_to_fp8) and a merge into it in place
(merge_loras_fp8) against the fp8 copy floor, when lora_ops.fp8 provides them.
"""

from __future__ import annotations

import statistics

import torch
from suite_harness import Suite
from suite_measure import Peak, timed

from lora_ops.units import GIB, MIB


def measure_fp8(suite: Suite) -> dict:
    """Section "fp8", on the smallest rank; the fp8 copy is dropped after it, the bf16 model stays."""
    try:
        from lora_ops import fp8
        cast = fp8.merge_to_fp8
        merge_fp8 = fp8.merge_loras_fp8
    except (ImportError, AttributeError) as e:
        suite.say(f"fp8: not available ({e})")
        return {"available": False, "reason": str(e)}
    from lora_ops import MergeReport

    rank = min(suite.loras)
    lora = suite.loras[rank]
    with Peak(suite.device) as mem:
        fp8_sd = cast(suite.weights, [], "default")
    fp8_keys = [k for k, v in fp8_sd.items() if v.dtype == torch.float8_e4m3fn and v.dim() == 2]
    fp8_bytes = sum(fp8_sd[k].numel() for k in fp8_keys)
    out = {"available": True, "cast_seconds": mem.seconds, "cast_extra_bytes": mem.extra,
           "cast_kept_bytes": mem.end, "fp8_weight_bytes": fp8_bytes, "fp8_tensors": len(fp8_keys)}
    suite.say(f"fp8 cast (policy default): {len(fp8_keys)} weights, {fp8_bytes / GIB:.2f} GiB fp8 in "
              f"{mem.seconds:.2f} s, peak {mem.extra / GIB:.2f} GiB above the bf16 model "
              f"(kept {mem.end / GIB:.2f} GiB)")
    targets = [k for k in lora.targets if k in fp8_sd and fp8_sd[k].dtype == torch.float8_e4m3fn]
    scratch = torch.empty(max(fp8_sd[k].numel() for k in targets), dtype=torch.uint8, device=suite.device)

    def copy_all():
        for k in targets:
            scratch[: fp8_sd[k].numel()].copy_(fp8_sd[k].view(torch.uint8).reshape(-1))

    copy_all()
    floor = statistics.median(timed(suite.device, copy_all) for _ in range(3))
    scratch = None  # noqa: F841 - free it before the merges
    runs = []
    for _ in range(max(1, min(suite.args.repeats, 2))):
        report = MergeReport()
        with Peak(suite.device) as m:
            state = merge_fp8(fp8_sd, [(lora, 1.0)], report=report)
        back = timed(suite.device, lambda st=state: merge_fp8(fp8_sd, [], state=st))
        runs.append({"seconds": m.seconds, "extra_bytes": m.extra, "restore_seconds": back,
                     "journal_bytes": state.journal_bytes})
        del state
        if suite.left() < 150:
            break
    med = statistics.median(r["seconds"] for r in runs)
    out.update(merge_rank=rank, merge_runs=runs, merge_median_seconds=med, copy_floor_seconds=floor,
               merge_over_floor=med / floor)
    suite.say(f"fp8 merge rank {rank} into scaled fp8 in place: {med:.3f} s ({med / floor:.1f}x the fp8 copy floor "
              f"{floor * 1e3:.1f} ms), extra VRAM {runs[0]['extra_bytes'] / MIB:.0f} MiB, journal "
              f"{runs[0]['journal_bytes'] / MIB:.0f} MiB, restore {runs[0]['restore_seconds']:.3f} s")
    fp8_sd.clear()  # the fp8 copy goes; the bf16 model stays for the forwards
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()
    return out
