"""The real-ComfyUI server matrix for a GPU: dynamic VRAM on and off × branch, re-queue, quantized, core LoRA.

For each mode a ComfyUI server (default tree: ../shared/comfyui/0.33.0) starts with `--enable-dynamic-vram` or
`--disable-dynamic-vram` on the tiny Flux checkpoint of the tests (3072 wide, 1 + 1 blocks) and runs:

- branch: one queue, a merged and a plain branch of one UNETLoader, each sampled and saved by ModelSave; the
  merged file must equal a fresh merge bit for bit, the plain one the checkpoint.
- requeue: the same prompt at another strength (the loader stays cached): the saved file equals the new fresh
  merge; its wall time is the strength-change latency. Then core LoraLoaderModelOnly at both strengths, timed.
- steps: 8-step sampling with our merge and with core's LoRA (seconds per step from 8 vs 1 step).
- quantized: the comfy_quant fp8 version of the checkpoint through UNETLoader + our merge: the sample must be
  finite and differ from the unmerged one (dynamic VRAM merges at the cast; classic merges the fp8 payload).
- VRAM: the server's GPU memory (nvidia-smi) and RSS after each step.

    python bench/gpu_comfy_matrix.py --out DIR [--comfyui-root PATH] [--cpu-rehearsal]

`--cpu-rehearsal` runs the classic mode with `--cpu` (what this script can check without a GPU). Results:
DIR/comfy_matrix.json and .txt; a missing prerequisite (tree, ComfyUI's requirements) is recorded, not raised.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfyui")]

from lora_ops.units import MIB  # noqa: E402

NEEDED = ("aiohttp", "requests", "safetensors", "torchsde", "comfy_aimdo", "comfy_kitchen", "psutil")
S1, S2 = 0.8, -0.4


def _missing(root: Path) -> str | None:
    if not (root / "main.py").is_file():
        return f"no ComfyUI tree at {root}"
    absent = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return f"ComfyUI's requirements are not installed here: {', '.join(absent)}" if absent else None


def _vram_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(line.split(",")[1]) for line in out.splitlines() if line.split(",")[0].strip() == str(pid)]
    return sum(used) if used else None


class Matrix:
    """One server mode: prompts, checks and figures."""

    def __init__(self, server, base: dict, lora_name: str, lora_path: Path, fp8_name: str) -> None:
        import psutil

        self.server, self.base, self.lora_name, self.fp8_name = server, base, lora_name, fp8_name
        from lora_ops import load_lora

        self.lora = load_lora(lora_path)
        self.proc = psutil.Process(server.proc.pid)
        self.out: dict = {"checks": {}, "figures": {}}

    def _sample(self, prompt: dict, model_from: str, tag: str, steps: int = 1) -> str:
        from comfy_harness import ksampler_node

        prompt[f"cond_{tag}"] = {"class_type": "FluxLoRAOpsTestConditioning", "inputs": {}}
        prompt[f"latent_{tag}"] = {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        }
        prompt[f"ks_{tag}"] = ksampler_node([model_from, 0], [f"cond_{tag}", 0], [f"latent_{tag}", 0], 1, steps)
        prompt[f"save_latent_{tag}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"ks_{tag}", 0], "filename_prefix": f"latents/{tag}"},
        }
        return f"save_latent_{tag}"

    def _run(self, prompt: dict, label: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        entry = self.server.run(prompt, timeout=1800)
        seconds = time.perf_counter() - t0
        self.out["figures"][label] = {
            "seconds": round(seconds, 3),
            "vram_mib": _vram_mib(self.server.proc.pid),
            "rss_mib": round(self.proc.memory_info().rss / MIB, 1),
        }
        return entry, seconds

    def _saved(self, prefix: str) -> dict:
        from comfy_harness import read_saved_model

        (path,) = sorted(self.server.output_dir.glob(prefix + "_*_.safetensors"))
        return read_saved_model(path)[0]

    def _fresh(self, strength: float) -> dict:
        import torch

        from lora_ops import merge_loras

        out = {k: v.clone() for k, v in self.base.items()}
        with torch.inference_mode():
            merge_loras(out, [(self.lora, strength)])
        return out

    def _same(self, saved: dict, expected: dict) -> bool:
        import torch

        return set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)

    def _ours(self, strength: float, prefix: str, steps: int = 1, unet: str = "flux_tiny.safetensors") -> dict:
        prompt = {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "lora": {"class_type": "LoadFluxLoRA", "inputs": {"lora_name": self.lora_name, "strength": strength}},
            "merge": {"class_type": "MergeLoRAIntoModel", "inputs": {"model": ["unet", 0], "lora_stack": ["lora", 0]}},
        }
        if prefix:
            prompt["save"] = {"class_type": "ModelSave", "inputs": {"model": ["merge", 0], "filename_prefix": prefix}}
        self._sample(prompt, "merge", f"ours_{uuid.uuid4().hex[:6]}", steps)
        return prompt

    def _core(self, strength: float, steps: int = 1) -> dict:
        prompt = {
            "unet": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": "flux_tiny.safetensors", "weight_dtype": "default"},
            },
            "core": {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": ["unet", 0], "lora_name": self.lora_name, "strength_model": strength},
            },
        }
        self._sample(prompt, "core", f"core_{uuid.uuid4().hex[:6]}", steps)
        return prompt

    def branch_and_requeue(self) -> None:
        merged, plain = f"diffusion_models/m_{uuid.uuid4().hex[:6]}", f"diffusion_models/p_{uuid.uuid4().hex[:6]}"
        prompt = self._ours(S1, merged)
        prompt["save_plain"] = {"class_type": "ModelSave", "inputs": {"model": ["unet", 0], "filename_prefix": plain}}
        self._sample(prompt, "unet", "plain")
        self._run(prompt, "branch_first_queue")
        self.out["checks"]["branch_merged_equals_fresh_merge"] = self._same(self._saved(merged), self._fresh(S1))
        self.out["checks"]["branch_plain_equals_checkpoint"] = self._same(self._saved(plain), self.base)
        again = f"diffusion_models/r_{uuid.uuid4().hex[:6]}"
        _, seconds = self._run(self._ours(S2, again), "requeue_other_strength_ours")
        self.out["checks"]["requeue_equals_fresh_merge"] = self._same(self._saved(again), self._fresh(S2))
        self._run(self._core(S1), "core_first_queue")
        self._run(self._core(S2), "requeue_other_strength_core")

    def steps(self) -> None:
        for who, build in (("ours", lambda n: self._ours(S1, "", n)), ("core", lambda n: self._core(S1, n))):
            _, one = self._run(build(1), f"{who}_1_step")
            _, eight = self._run(build(8), f"{who}_8_steps")
            self.out["figures"][f"{who}_seconds_per_step"] = round((eight - one) / 7, 4)

    def quantized(self) -> None:
        import torch

        plain = {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": self.fp8_name, "weight_dtype": "default"}}
        }
        plain_node = self._sample(plain, "unet", "fp8_plain")
        entry_plain, _ = self._run(plain, "fp8_plain")
        merged = self._ours(S1, "", 1, unet=self.fp8_name)
        merged_node = next(k for k in merged if k.startswith("save_latent_"))
        entry_merged, _ = self._run(merged, "fp8_merged")
        a = self._latent(entry_plain, plain_node)
        b = self._latent(entry_merged, merged_node)
        self.out["checks"]["quantized_merge_changes_the_sample"] = bool(
            torch.isfinite(b).all() and not torch.equal(a, b)
        )

    def _latent(self, entry: dict, node: str):
        from safetensors.torch import load_file

        (path,) = self.server.output_files(entry, node, "latents")
        return load_file(str(path))["latent_tensor"]


def _run_mode(root: Path, work: Path, mode: str, device_args: tuple[str, ...], budget_end: float) -> dict:
    from comfy_harness import FLUX_TINY_SEED, ComfyServer, free_port, make_base_directory, write_flux_tiny
    from safetensors.torch import load_file

    from lora_ops.flux import FluxShape
    from lora_ops.fp8 import merge_checkpoint_fp8
    from lora_ops.synthetic import write_kohya_lora

    cache = Path(os.environ.get("FLUX_LORA_OPS_TEST_CACHE", work / "cache"))
    ckpt = write_flux_tiny(cache / f"flux_tiny_d1s1_seed{FLUX_TINY_SEED}.safetensors")
    base_dir = make_base_directory(work / f"base_{mode}", ckpt)
    fp8_name = "flux_tiny_fp8.safetensors"
    fp8_path = base_dir / "models" / "diffusion_models" / fp8_name
    if not fp8_path.exists():
        merge_checkpoint_fp8(ckpt, [], fp8_path, policy="default")
    lora_path = write_kohya_lora(
        base_dir / "models" / "loras" / "matrix_lora.safetensors", FluxShape(depth=1, depth_single=1), rank=16
    )
    server = ComfyServer(
        comfyui_root=root,
        base_dir=base_dir,
        log_path=work / f"comfyui_{mode}.log",
        port=free_port(),
        device_args=device_args,
    )
    result: dict = {"mode": mode, "args": list(device_args)}
    try:
        server.start(timeout=300)
        m = Matrix(server, load_file(str(ckpt)), lora_path.name, lora_path, fp8_name)
        for part in (m.branch_and_requeue, m.steps, m.quantized):
            if time.monotonic() > budget_end:
                result.setdefault("skipped_for_time", []).append(part.__name__)
                continue
            try:
                part()
            except Exception:  # keep what was measured; record the failure
                m.out["checks"][f"{part.__name__}_ran"] = False
                m.out.setdefault("errors", []).append(traceback.format_exc()[-2000:])
        result |= m.out
    except Exception:
        result["error"] = traceback.format_exc()[-3000:]
    finally:
        server.stop()
        result["log_tail"] = server.log_tail(40) if server.log_path.exists() else ""
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--comfyui-root", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--cpu-rehearsal", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    given = args.comfyui_root or (Path(os.environ["COMFYUI_ROOT"]) if os.environ.get("COMFYUI_ROOT") else None)
    candidates = [given] if given else [REPO.parent / "shared/comfyui/0.33.0", REPO / "shared/comfyui/0.33.0"]
    root = next((c.resolve() for c in candidates if (c / "main.py").is_file()), candidates[0])
    report: dict = {"comfyui_root": str(root), "modes": []}
    problem = _missing(root)
    if problem:
        report["skipped"] = problem
    else:
        modes = (
            [("classic_cpu", ("--cpu",))]
            if args.cpu_rehearsal
            else [("dynamic_vram", ("--enable-dynamic-vram",)), ("classic", ("--disable-dynamic-vram",))]
        )
        end = time.monotonic() + args.budget_s
        for mode, device_args in modes:
            report["modes"].append(_run_mode(root, args.out / "comfy_matrix_work", mode, device_args, end))
            (args.out / "comfy_matrix.json").write_text(json.dumps(report, indent=2))
    (args.out / "comfy_matrix.json").write_text(json.dumps(report, indent=2))
    lines = [f"ComfyUI tree: {root}"] + ([f"SKIPPED: {report['skipped']}"] if "skipped" in report else [])
    for m in report["modes"]:
        lines.append(f"== {m['mode']} {' '.join(m['args'])}" + (f"  ERROR {m['error'][-300:]}" if "error" in m else ""))
        lines += [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in m.get("checks", {}).items()]
        lines += [f"  {name}: {value}" for name, value in m.get("figures", {}).items()]
    (args.out / "comfy_matrix.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = any(not ok for m in report["modes"] for ok in m.get("checks", {}).values())
    return 1 if failed or any("error" in m for m in report["modes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
