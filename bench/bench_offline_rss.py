"""Offline merge, whole process: `python -m lora_ops merge` against ComfyUI's load → LoRA patch → save, and
our peak RSS as the checkpoint grows.

Run by hand (never a unit test), on an otherwise idle machine:

    COMFYUI_ROOT=../shared/comfyui/0.3.64 COMFYUI_PYTHON=<ComfyUI's venv>/bin/python \
        PYTHONPATH=. python bench/bench_offline_rss.py [--rounds 3] [--blocks 2 4 8] [--json out.json]

**Against ComfyUI** (when COMFYUI_ROOT is set): on the 2-block checkpoint (1 double + 1 single block at width
3072, 1.02 GiB bf16), ours and a child in ComfyUI's own venv that does what a user's load → LoraLoaderModelOnly →
ModelSave does (`comfy.sd.load_diffusion_model`, `comfy.sd.load_lora_for_models`, `comfy.sd.save_checkpoint`
with `--cpu --bf16-unet`, the model kept in bf16 as stored) and the I/O floor (copy the file, fsync) run
alternately, `--rounds` times each, every one a fresh process timed from start to exit. Prints the medians,
the ratio ours / ComfyUI (target <= 0.6) and ours' peak RSS (target <= 1 GiB), and checks that both files hold
the same bits for every merged weight.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_ops.units import GIB, MIB

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


#: What ComfyUI does for load → LoraLoaderModelOnly → ModelSave, as a script (run in ComfyUI's venv).
_COMFY_CHILD = r"""
import logging, os, sys
ckpt, lora, out = sys.argv[1:4]
sys.path.insert(0, os.environ["COMFYUI_ROOT"])
sys.argv = [sys.argv[0], "--cpu", "--bf16-unet"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args, comfy.model_management, comfy.sd, comfy.utils
logging.disable(logging.WARNING)
import torch
model = comfy.sd.load_diffusion_model(ckpt, model_options={"dtype": torch.bfloat16})
patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora, safe_load=True), 1.0, 0)
comfy.sd.save_checkpoint(out, patched)
"""


#: The I/O floor: copy the checkpoint to a new file and fsync it, as both merges must read and write it.
_COPY_CHILD = r"""
import os, shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
with open(sys.argv[2], "rb+") as f:
    os.fsync(f.fileno())
"""


def ours_argv(ckpt: Path, lora: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lora_ops",
        "merge",
        str(ckpt),
        "--lora",
        str(lora),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]


def compare_outputs(ours: Path, theirs: Path, merged_keys: list[str]) -> tuple[int, int]:
    """(merged weights compared, how many differ in any bit) between our file and ComfyUI's saved one."""
    import torch

    from lora_ops.safetensors_io import SafetensorsFile

    a, b = SafetensorsFile(ours), SafetensorsFile(theirs)
    names = {k.removeprefix("model.diffusion_model."): k for k in b.keys()}
    differ = 0
    for key in merged_keys:
        x, y = a.get(key), b.get(names[key])
        differ += int(x.dtype != y.dtype or not torch.equal(x.view(torch.int16), y.view(torch.int16)))
    return len(merged_keys), differ


def against_comfyui(ckpt: Path, lora: Path, tmp: Path, env: dict[str, str], rounds: int) -> dict | None:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        print("ComfyUI: skipped (set COMFYUI_ROOT and COMFYUI_PYTHON to measure the baseline)")
        return None
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    ours_out, comfy_out = tmp / "ours.safetensors", tmp / "comfy.safetensors"
    runs: dict[str, list[dict]] = {"ours": [], "comfyui": [], "copy": []}
    argvs = {
        "ours": ours_argv(ckpt, lora, ours_out),
        "comfyui": [python, "-c", _COMFY_CHILD, str(ckpt), str(lora), str(comfy_out)],
        "copy": [sys.executable, "-c", _COPY_CHILD, str(ckpt), str(tmp / "copy.safetensors")],
    }
    for i in range(rounds):
        for name in ("comfyui", "copy", "ours") if i % 2 else ("ours", "copy", "comfyui"):
            argv = argvs[name]
            result = measure(argv, dict(env, COMFYUI_ROOT=root))
            result["load1"] = os.getloadavg()[0]
            runs[name].append(result)
            print(
                f"  round {i + 1} {name:8s} {result['seconds']:6.2f} s  peak RSS {result['maxrss'] / MIB:6.0f} MiB"
                f"  (load {result['load1']:.1f})",
                flush=True,
            )
    from lora_ops.formats import load_lora

    compared, differ = compare_outputs(ours_out, comfy_out, sorted(load_lora(lora).targets))
    ours_s = statistics.median(r["seconds"] for r in runs["ours"])
    comfy_s = statistics.median(r["seconds"] for r in runs["comfyui"])
    ours_rss = max(r["maxrss"] for r in runs["ours"])
    comfy_rss = max(r["maxrss"] for r in runs["comfyui"])
    print(
        f"whole process, median of {rounds}: ours {ours_s:.2f} s, ComfyUI {comfy_s:.2f} s -> ratio "
        f"{ours_s / comfy_s:.2f} (target <= 0.6: {'met' if ours_s / comfy_s <= 0.6 else 'MISSED'})"
    )
    print(
        f"peak RSS: ours {ours_rss / MIB:.0f} MiB (target <= 1024: {'met' if ours_rss <= GIB else 'MISSED'}), "
        f"ComfyUI {comfy_rss / MIB:.0f} MiB"
    )
    copy_s = statistics.median(r["seconds"] for r in runs["copy"])
    print(
        f"I/O floor (copy the checkpoint + fsync): {copy_s:.2f} s; ours = {ours_s / copy_s:.2f} x, "
        f"ComfyUI = {comfy_s / copy_s:.2f} x of it"
    )
    print(f"bits: {compared - differ} of {compared} merged weights identical to ComfyUI's file")
    (tmp / "copy.safetensors").unlink(missing_ok=True)
    ours_out.unlink(missing_ok=True)
    comfy_out.unlink(missing_ok=True)
    return {
        "runs": runs,
        "ours_seconds": ours_s,
        "comfyui_seconds": comfy_s,
        "ratio": ours_s / comfy_s,
        "copy_seconds": copy_s,
        "ours_maxrss": ours_rss,
        "comfyui_maxrss": comfy_rss,
        "merged_compared": compared,
        "merged_differing": differ,
    }


def child_env() -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, so that every child merges with this tree's lora_ops."""
    root = Path(__file__).resolve().parent.parent
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(root), os.environ.get("PYTHONPATH", "")] if p))


def set_up(tmp: Path, rank: int, env: dict[str, str]) -> tuple[Path, int]:
    """The LoRA every checkpoint gets (on double block 0 and single block 0, which every size has), and the peak
    RSS of a child that only imports python + torch + lora_ops, the floor under every merge's figure."""
    from lora_ops.flux import FluxShape
    from lora_ops.synthetic import write_kohya_lora

    lora = write_kohya_lora(tmp / "lora.safetensors", FluxShape(depth=1, depth_single=1), rank=rank, seed=1)
    print(f"LoRA: kohya rank {rank} on double block 0 + single block 0, {lora.stat().st_size / MIB:.1f} MiB")
    base = measure([sys.executable, "-c", "import torch, lora_ops.offline, lora_ops.cli"], env)
    print(f"baseline (python + torch + lora_ops imported): {base['maxrss'] / MIB:.0f} MiB")
    return lora, base["maxrss"]


def run_against_comfyui(tmp: Path, lora: Path, env: dict[str, str], rounds: int) -> dict | None:
    """Write the 2-block checkpoint, time ours and ComfyUI's merge of it (against_comfyui), then delete it."""
    from lora_ops.flux import FluxShape
    from lora_ops.synthetic import write_flux_checkpoint

    first = write_flux_checkpoint(tmp / "flux_vs_comfyui.safetensors", FluxShape(depth=1, depth_single=1), seed=0)
    print(f"\nAgainst ComfyUI: {first.stat().st_size / GIB:.2f} GiB checkpoint (1 double + 1 single block)")
    comfy = against_comfyui(first, lora, tmp, env, rounds)
    first.unlink()
    return comfy


def measure_growth(sizes: list[int], tmp: Path, lora: Path, env: dict[str, str], baseline: int) -> list[dict]:
    """Our merge alone on each checkpoint size, one child each; a size's checkpoint and output are deleted before
    the next is written, so the disk holds one at a time."""
    from lora_ops.flux import FluxShape, parameter_count
    from lora_ops.synthetic import write_flux_checkpoint

    print("\nGrowth (ours only):")
    rows = []
    for blocks in sizes:
        shape = FluxShape(depth=blocks // 2, depth_single=blocks - blocks // 2)
        ckpt = write_flux_checkpoint(tmp / f"flux_{blocks}.safetensors", shape, seed=0)
        out = tmp / f"merged_{blocks}.safetensors"
        result = measure(ours_argv(ckpt, lora, out), env)
        size = ckpt.stat().st_size
        rows.append(
            {
                "blocks": blocks,
                "depth": shape.depth,
                "depth_single": shape.depth_single,
                "params": parameter_count(shape),
                "checkpoint_bytes": size,
                "maxrss_bytes": result["maxrss"],
                "above_baseline_bytes": result["maxrss"] - baseline,
                "seconds": result["seconds"],
                "output_bytes": out.stat().st_size,
            }
        )
        print(
            f"{blocks} blocks ({shape.depth}+{shape.depth_single}): checkpoint {size / GIB:.2f} GiB, peak RSS "
            f"{result['maxrss'] / MIB:.0f} MiB ({(result['maxrss'] - baseline) / MIB:.0f} MiB above baseline),"
            f" {result['seconds']:.1f} s"
        )
        ckpt.unlink()
        out.unlink()
    return rows


def flatness(rows: list[dict]) -> dict:
    """Least-squares slope of peak RSS over checkpoint bytes, and the spread: a streamed merge's slope is ~0,
    loading the whole checkpoint would make it >= 1. Keys as the JSON file has them."""
    xs = [r["checkpoint_bytes"] for r in rows]
    ys = [r["maxrss_bytes"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"slope_bytes_per_byte": slope, "spread_bytes": max(ys) - min(ys), "flat": slope < 0.05}


def print_flatness(rows: list[dict], figures: dict) -> None:
    slope, spread = figures["slope_bytes_per_byte"], figures["spread_bytes"]
    grew = max(r["checkpoint_bytes"] for r in rows) - min(r["checkpoint_bytes"] for r in rows)
    print(
        f"slope (least squares): {slope * GIB / MIB:.1f} MiB of peak RSS per GiB of checkpoint "
        f"({slope:.3f} bytes per byte; loading the whole checkpoint would be >= 1.0); spread {spread / MIB:.0f} MiB "
        f"while the checkpoint grew {grew / GIB:.2f} GiB"
    )
    print(f"flat (slope < 0.05): {'yes' if figures['flat'] else 'NO'}")
    largest_tensor = 21504 * 3072 * 2
    print(
        f"for scale: the largest tensor (linear1, bf16) is {largest_tensor / MIB:.0f} MiB; its fp32 working copy "
        f"{2 * largest_tensor / MIB:.0f} MiB"
    )


def write_json(path: Path, baseline: int, rows: list[dict], figures: dict, comfy: dict | None) -> None:
    from bench.bench_merge_cpu import machine

    path.write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
                "baseline_bytes": baseline,
                "runs": rows,
                **figures,
                "against_comfyui": comfy,
            },
            indent=2,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8], help="total blocks (even)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of ours and ComfyUI's each")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tmp", default=None, help="directory for the checkpoints (needs ~2x the largest)")
    args = parser.parse_args()

    from bench.bench_merge_cpu import machine

    env = child_env()
    tmp_dir = tempfile.TemporaryDirectory(dir=args.tmp)
    tmp = Path(tmp_dir.name)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    lora, baseline = set_up(tmp, args.rank, env)
    comfy = run_against_comfyui(tmp, lora, env, args.rounds)
    rows = measure_growth(args.blocks, tmp, lora, env, baseline)
    figures = flatness(rows)
    print_flatness(rows, figures)
    if args.json:
        write_json(Path(args.json), baseline, rows, figures, comfy)
    tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
