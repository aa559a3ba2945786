"""GPU suite: merge speed and memory on a full-size Flux-dev-shaped model, peak VRAM of a Flux forward,
and the planner's predictions against each measurement. One script, written to run first time.

    PYTHONPATH=. python bench/gpu_suite.py --out "$OUT"           # H100/H200: full size, < 8 minutes
    PYTHONPATH=. python bench/gpu_suite.py --tiny --device cpu    # the same code paths on a tiny shape

Sections (each one is guarded: a failure is recorded and the suite goes on; results are written after
every section, so a timeout still leaves what was measured):

1. weights: a Flux-dev-shaped model (19 double + 38 single blocks, 11.9 B params, bf16 random values)
   created directly on the device as a dict of tensors; kohya LoRAs of rank 32 and 128 built with
   lora_ops.synthetic.kohya_lora_tensors, written to a temp file and read back with lora_ops.load_lora.
2. merge: lora_ops.merge_loras in place on the device (exact undo on and off), median of `--repeats`;
   the memory-traffic floor = W.copy_ of every merged weight (read + write) timed in the same run; extra
   VRAM = torch.cuda.max_memory_allocated during the call minus the memory allocated before it. Restore
   after each merge (bit-exactness checked on sample weights). fp8: lora_ops.fp8 cast (merge_to_fp8)
   and merge into scaled fp8 in place (merge_loras_fp8), when that module provides them.
3. forward: a minimal Flux forward written here (the BFL reference structure: double and single blocks,
   RMSNorm q/k, fp32 RoPE, torch.nn.functional.scaled_dot_product_attention), 1024x1024, batch 1 (and
   batch 2 = CFG, and 512x512), with no LoRA, with the LoRA merged, and unmerged as kohya's
   flux_minimal_inference runs it (fp32 factors with requires_grad inside autocast, whose bf16 cache
   stays for the whole run). Peak VRAM above the weights (+ resident LoRA); merged must equal no-LoRA
   within 1 %.
4. planner: lora_ops.planner's prediction for each measurement (weights, resident LoRA, activations,
   total, merge temporaries); target within 10 %.

On the CPU (`--device cpu`) memory is the peak of live tensor bytes from torch.profiler's memory events
instead of torch.cuda.max_memory_allocated.

The harness (configuration, budget, guard, record) is bench/suite_harness.py, the memory and time probes
bench/suite_measure.py, and each section its own module: suite_setup, suite_merge, suite_fp8,
suite_forward, suite_planner.
"""

from __future__ import annotations

import argparse
import sys

import torch
from suite_forward import measure_forwards
from suite_fp8 import measure_fp8
from suite_harness import Suite
from suite_merge import measure_merges
from suite_planner import compare_with_planner
from suite_setup import build_weights_and_loras, describe_environment


def run_sections(suite: Suite) -> int:
    """The sections in order, optional ones skipped when the time budget runs low; 1 when any section failed."""
    suite.results["environment"] = suite.section("environment", describe_environment)
    if suite.section("build", build_weights_and_loras) is None:
        return 1
    merges = suite.section("merge", measure_merges)
    if suite.left() > 150:
        suite.section("fp8", measure_fp8)
    else:
        suite.say("fp8: skipped (time budget)")
    forwards = suite.section("forward", measure_forwards) if suite.left() > 60 else None
    suite.section("planner", compare_with_planner, forwards, merges)
    suite.say(f"done in {suite.elapsed():.0f} s; results in {suite.out}/gpu_suite.json and gpu_suite.txt")
    suite.save()
    suite.tmp.cleanup()
    return 0 if not suite.results["errors"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results directory (default: $OUT, else ./bench_results)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Flux shape (checks the code paths, e.g. on CPU)")
    parser.add_argument("--blocks", type=int, default=0, help="real width 3072 with N double + N single blocks")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default 1024; 256 with --tiny)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450, help="skip optional work past this many seconds")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    return run_sections(Suite(args))


if __name__ == "__main__":
    sys.exit(main())
