"""ComfyUI's own LoRA patching, timed in a child process that runs in ComfyUI's venv (bench_merge_cpu.py's
baseline): load the model and the LoRA with ComfyUI, then time `patch_model()` cold and warm, and keep one
patched weight for the bit-for-bit comparison with ours.

    COMFYUI_ROOT=../shared/comfyui/0.3.64 python bench/comfy_patch.py CKPT LORA SAMPLE_OUT [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_merge_cpu import SAMPLE_KEY, PeakRSS


def comfy_child(ckpt: str, lora_path: str, sample_out: str, repeats: int = 1) -> None:
    root = os.environ["COMFYUI_ROOT"]
    sys.path.insert(0, root)
    argv = sys.argv
    sys.argv = [argv[0], "--cpu", "--bf16-unet"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    sys.argv = argv
    import logging

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    model = comfy.sd.load_diffusion_model(ckpt, model_options={"dtype": torch.bfloat16})
    lora_sd = comfy.utils.load_torch_file(lora_path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    load_s = time.perf_counter() - t0
    keys = len(patched.patches)
    runs = []
    for i in range(repeats + 1):  # the first run is cold (fresh pages), the others follow unpatch_model()
        with PeakRSS() as mem:
            start = time.perf_counter()
            patched.patch_model()
            seconds = time.perf_counter() - start
        runs.append({"wall_s": seconds, "extra_rss_bytes": mem.extra, "load1": os.getloadavg()[0]})
        if i < repeats:
            patched.unpatch_model()
    sd = patched.model.diffusion_model.state_dict()
    from safetensors.torch import save_file

    save_file({SAMPLE_KEY: sd[SAMPLE_KEY].contiguous()}, sample_out)
    print(json.dumps({"comfyui_version": _comfy_version(root), "torch": torch.__version__, "load_s": load_s,
                      "runs": runs, "patch_s": statistics.median(r["wall_s"] for r in runs[1:] or runs),
                      "cold_patch_s": runs[0]["wall_s"],
                      "extra_bytes": runs[0]["extra_rss_bytes"], "patched_keys": keys,
                      "weight_dtype": str(sd[SAMPLE_KEY].dtype)}))


def _comfy_version(root: str) -> str:
    try:
        text = Path(root, "comfyui_version.py").read_text()
        return re.search(r'__version__ = "([^"]+)"', text).group(1)
    except (OSError, AttributeError):
        return "unknown"


def run_comfy(shape, lora_path: Path, tmp: Path, ours_sample: torch.Tensor, repeats: int) -> dict | None:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        print("\nComfyUI: skipped (set COMFYUI_ROOT=../shared/comfyui/0.3.64 to time ComfyUI's own patching)")
        return None
    from lora_ops.synthetic import write_flux_checkpoint

    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    ckpt = write_flux_checkpoint(tmp / "model.safetensors", shape, seed=0)
    sample = tmp / "comfy_sample.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([python, __file__, str(ckpt), str(lora_path), str(sample), "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"\nComfyUI: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file

    theirs = load_file(str(sample))[SAMPLE_KEY]
    diff = (theirs.float() - ours_sample.float()).abs()
    result["sample_max_abs_diff_vs_ours"] = float(diff.max())
    result["sample_differing_elements"] = int((theirs != ours_sample).sum())
    result["python"] = python
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("lora")
    parser.add_argument("sample_out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    comfy_child(args.ckpt, args.lora, args.sample_out, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
