"""Peak RSS of the streamed offline merge (`python -m lora_ops merge`) for growing checkpoints.

Run by hand (never a unit test):

    PYTHONPATH=. python bench/bench_offline_rss.py [--blocks 2 4 8] [--rank 32] [--json out.json]

Checkpoints of 2, 4 and 8 blocks (FluxShape(depth=n/2, depth_single=n/2) at the real width 3072: about
1, 2 and 4 GB in bf16) are written with lora_ops.synthetic.write_flux_checkpoint. The same rank-32 kohya
LoRA (on double block 0 and single block 0, which every size has) is merged into each, so only the
checkpoint grows. Each merge runs in its own child process, measured from a wrapper process with
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, so one figure covers exactly one merge. A streamed merge
holds one tensor at a time: its peak must stay flat as the checkpoint grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30

#: Runs `argv` in a grandchild and prints (exit code, ru_maxrss of the children in bytes, seconds).
_WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
print(json.dumps({"rc": proc.returncode, "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "seconds": seconds, "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}))
"""


def measure(argv: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result['rc']}):\n{result['stderr']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8], help="total blocks (even)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tmp", default=None, help="directory for the checkpoints (needs ~2x the largest)")
    args = parser.parse_args()

    from lora_ops.flux import FluxShape, parameter_count
    from lora_ops.synthetic import write_flux_checkpoint, write_kohya_lora

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_merge_cpu import machine

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(root), os.environ.get("PYTHONPATH", "")] if p))
    tmp_dir = tempfile.TemporaryDirectory(dir=args.tmp)
    tmp = Path(tmp_dir.name)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    lora = write_kohya_lora(tmp / "lora.safetensors", FluxShape(depth=1, depth_single=1), rank=args.rank, seed=1)
    print(f"LoRA: kohya rank {args.rank} on double block 0 + single block 0, {lora.stat().st_size / MIB:.1f} MiB")
    base = measure([sys.executable, "-c", "import torch, lora_ops.offline, lora_ops.cli"], env)
    print(f"baseline (python + torch + lora_ops imported): {base['maxrss'] / MIB:.0f} MiB")
    rows = []
    for blocks in args.blocks:
        shape = FluxShape(depth=blocks // 2, depth_single=blocks - blocks // 2)
        ckpt = write_flux_checkpoint(tmp / f"flux_{blocks}.safetensors", shape, seed=0)
        out = tmp / f"merged_{blocks}.safetensors"
        result = measure([sys.executable, "-m", "lora_ops", "merge", str(ckpt), "--lora", str(lora), "--out", str(out),
                          "--device", "cpu"], env)
        size = ckpt.stat().st_size
        rows.append({"blocks": blocks, "depth": shape.depth, "depth_single": shape.depth_single,
                     "params": parameter_count(shape), "checkpoint_bytes": size, "maxrss_bytes": result["maxrss"],
                     "above_baseline_bytes": result["maxrss"] - base["maxrss"], "seconds": result["seconds"],
                     "output_bytes": out.stat().st_size})
        print(f"{blocks} blocks ({shape.depth}+{shape.depth_single}): checkpoint {size / GIB:.2f} GiB, peak RSS "
              f"{result['maxrss'] / MIB:.0f} MiB ({(result['maxrss'] - base['maxrss']) / MIB:.0f} MiB above baseline),"
              f" {result['seconds']:.1f} s")
        ckpt.unlink()
        out.unlink()
    xs = [r["checkpoint_bytes"] for r in rows]
    ys = [r["maxrss_bytes"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    spread = max(ys) - min(ys)
    print(f"slope (least squares): {slope * GIB / MIB:.1f} MiB of peak RSS per GiB of checkpoint "
          f"({slope:.3f} bytes per byte; loading the whole checkpoint would be >= 1.0); spread {spread / MIB:.0f} MiB "
          f"while the checkpoint grew {(max(xs) - min(xs)) / GIB:.2f} GiB")
    flat = slope < 0.05
    print(f"flat (slope < 0.05): {'yes' if flat else 'NO'}")
    largest_tensor = 21504 * 3072 * 2
    print(f"for scale: the largest tensor (linear1, bf16) is {largest_tensor / MIB:.0f} MiB; its fp32 working copy "
          f"{2 * largest_tensor / MIB:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                               "baseline_bytes": base["maxrss"], "runs": rows,
                                               "slope_bytes_per_byte": slope, "spread_bytes": spread,
                                               "flat": flat}, indent=2))
    tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
