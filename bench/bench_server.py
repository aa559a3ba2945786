"""Inside a ComfyUI server (CPU, default malloc): memory after merge + save, and the time of a strength change,
MergeLoRAIntoModel against ComfyUI's own LoraLoaderModelOnly, over HTTP.

Run by hand (never a unit test), with ComfyUI's venv, on an otherwise idle machine:

    COMFYUI_ROOT=../shared/comfyui/0.3.64 <ComfyUI's venv>/bin/python bench/bench_server.py [--rounds 2]

Model: Flux at the real width, 1 double + 1 single block (1.04 GiB bf16); LoRA: rank-32 kohya on all 13 block
Linears. Each round starts one fresh server per method (`--cpu --bf16-unet`, glibc's default malloc: no
MALLOC_* variables), methods alternating, and runs in it:

1. **merge + save**: UNETLoader → (LoadFluxLoRA → MergeLoRAIntoModel | LoraLoaderModelOnly) → ModelSave at
   strength 1.0. The server's resident memory (VmRSS) after the prompt finished is the figure; target: ours
   <= ComfyUI's - 0.5 x model size.
2. **strength change**: the same chain → KSampler (1 euler step, 64x64) → SaveLatent, queued at 1.0 (warm-up),
   then re-queued at 0.5, 1.0, 0.5 ... (`--changes`), each timed from POST /prompt to its history entry. A
   re-queue that changes only the KSampler seed gives the sampling floor (nothing to re-merge). Target: ours
   <= 0.3 x ComfyUI's time for the same change (printed gross, and net of the sampling floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "comfyui")]

from comfy_harness import (  # noqa: E402
    ComfyServer,
    free_port,
    ksampler_node,
    make_base_directory,
    write_flux_tiny,
)

from lora_ops.units import MIB  # noqa: E402


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def lora_chain(method: str, lora: str, strength: float) -> dict:
    """UNETLoader → the method's LoRA nodes; the model output is node "model"."""
    prompt = {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux_tiny.safetensors", "weight_dtype": "default"},
        }
    }
    if method == "ours":
        prompt["stack"] = {"class_type": "LoadFluxLoRA", "inputs": {"lora_name": lora, "strength": strength}}
        prompt["model"] = {
            "class_type": "MergeLoRAIntoModel",
            "inputs": {"model": ["unet", 0], "lora_stack": ["stack", 0]},
        }
    else:
        prompt["model"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["unet", 0], "lora_name": lora, "strength_model": strength},
        }
    return prompt


def save_prompt(method: str, lora: str) -> dict:
    prompt = lora_chain(method, lora, 1.0)
    prompt["save"] = {
        "class_type": "ModelSave",
        "inputs": {"model": ["model", 0], "filename_prefix": f"bench_{method}"},
    }
    return prompt


def sample_prompt(method: str, lora: str, strength: float, seed: int) -> dict:
    prompt = lora_chain(method, lora, strength)
    prompt["cond"] = {"class_type": "FluxLoRAOpsTestConditioning", "inputs": {"seed": 3}}
    prompt["latent"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["ks"] = ksampler_node(["model", 0], ["cond", 0], ["latent", 0], seed)
    prompt["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "latents/b"}}
    return prompt


def timed(server: ComfyServer, prompt: dict) -> float:
    start = time.perf_counter()
    server.run(prompt, timeout=1800)
    return time.perf_counter() - start


def one_server(method: str, root: Path, base: Path, ckpt: Path, lora_file: Path, changes: int) -> dict:
    make_base_directory(base, ckpt)
    server = ComfyServer(comfyui_root=root, base_dir=base, log_path=base / "server.log", port=free_port())
    for var in [k for k in os.environ if k.startswith("MALLOC_")]:
        del os.environ[var]
    server.start(timeout=600)
    try:
        lora = server.add_lora(lora_file)
        pid = server.proc.pid
        idle_kib = _status_kib(pid, "VmRSS")
        save_s = timed(server, save_prompt(method, lora))
        after_kib, peak_kib = _status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM")
        for f in server.output_dir.rglob("*.safetensors"):
            f.unlink()
        timed(server, sample_prompt(method, lora, 1.0, seed=1))  # warm-up at strength 1.0
        change_s, floor_s = [], []
        strength = 1.0
        for i in range(changes):
            strength = 0.5 if strength == 1.0 else 1.0
            change_s.append(timed(server, sample_prompt(method, lora, strength, seed=1)))
            floor_s.append(timed(server, sample_prompt(method, lora, strength, seed=2 + i)))
    finally:
        server.stop()
        if os.environ.get("BENCH_SERVER_LOGS"):  # keep the server's log for a look afterwards
            keep = Path(os.environ["BENCH_SERVER_LOGS"])
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{base.name}.log").write_bytes((base / "server.log").read_bytes())
    return {
        "method": method,
        "idle_rss": idle_kib * 1024,
        "after_save_rss": after_kib * 1024,
        "peak_rss": peak_kib * 1024,
        "merge_save_s": save_s,
        "change_s": change_s,
        "sampling_floor_s": floor_s,
        "load1": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="fresh servers per method")
    parser.add_argument("--changes", type=int, default=3, help="strength changes timed per server")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--methods", nargs="+", default=["ours", "comfyui"], choices=["ours", "comfyui"])
    args = parser.parse_args()
    root = Path(os.environ["COMFYUI_ROOT"])
    from lora_ops.flux import FluxShape
    from lora_ops.synthetic import write_kohya_lora

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        ckpt = write_flux_tiny(tmp / "flux_tiny.safetensors", depth=1, depth_single=1)
        model_bytes = ckpt.stat().st_size
        lora = write_kohya_lora(tmp / "bench_lora.safetensors", FluxShape(depth=1, depth_single=1), rank=32, seed=1)
        print(
            f"ComfyUI {root}; model {model_bytes / MIB:.0f} MiB (1+1 blocks, width 3072); rank-32 kohya LoRA; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            flush=True,
        )
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for r in range(args.rounds):
            for method in args.methods[::-1] if r % 2 else args.methods:
                res = one_server(method, root, tmp / f"base_{method}_{r}", ckpt, lora, args.changes)
                runs[method].append(res)
                print(
                    f"  round {r + 1} {method:8s} RSS after merge+save {res['after_save_rss'] / MIB:6.0f} MiB "
                    f"(idle {res['idle_rss'] / MIB:.0f}, peak {res['peak_rss'] / MIB:.0f}), merge+save "
                    f"{res['merge_save_s']:.1f} s, strength changes "
                    f"{', '.join(f'{s:.2f}' for s in res['change_s'])} s, sampling floor "
                    f"{', '.join(f'{s:.2f}' for s in res['sampling_floor_s'])} s (load {res['load1']:.1f})",
                    flush=True,
                )
        summary = summarize(runs, model_bytes) if len(runs) == 2 else None
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


def summarize(runs: dict[str, list[dict]], model_bytes: int) -> dict:
    def med(method: str, key: str) -> float:
        values = [v for r in runs[method] for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    ours_rss, core_rss = med("ours", "after_save_rss"), med("comfyui", "after_save_rss")
    allowed = core_rss - 0.5 * model_bytes
    print(
        f"\nRSS after merge + ModelSave (median): ours {ours_rss / MIB:.0f} MiB, LoraLoaderModelOnly "
        f"{core_rss / MIB:.0f} MiB; saving {(core_rss - ours_rss) / MIB:.0f} MiB = "
        f"{(core_rss - ours_rss) / model_bytes:.2f} x model (target >= 0.5: "
        f"{'met' if ours_rss <= allowed else 'MISSED'})"
    )
    ours_c, core_c = med("ours", "change_s"), med("comfyui", "change_s")
    ours_f, core_f = med("ours", "sampling_floor_s"), med("comfyui", "sampling_floor_s")
    gross = ours_c / core_c
    net = max(ours_c - ours_f, 0.0) / max(core_c - core_f, 1e-9)
    print(
        f"strength change over HTTP (median): ours {ours_c:.2f} s, LoraLoaderModelOnly {core_c:.2f} s -> ratio "
        f"{gross:.2f} (target <= 0.3: {'met' if gross <= 0.3 else 'MISSED'}); sampling floor ours {ours_f:.2f} s, "
        f"ComfyUI {core_f:.2f} s; net of it {ours_c - ours_f:.2f} vs {core_c - core_f:.2f} s -> {net:.2f}"
    )
    return {
        "ours_after_save_rss": ours_rss,
        "comfyui_after_save_rss": core_rss,
        "model_bytes": model_bytes,
        "rss_saving_x_model": (core_rss - ours_rss) / model_bytes,
        "ours_change_s": ours_c,
        "comfyui_change_s": core_c,
        "change_ratio": gross,
        "ours_floor_s": ours_f,
        "comfyui_floor_s": core_f,
        "change_ratio_net": net,
    }


if __name__ == "__main__":
    sys.exit(main())
