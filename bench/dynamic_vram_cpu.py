"""Dynamic VRAM on the CPU: our cast-time merge vs core LoraLoaderModelOnly on the same ModelPatcherDynamic.

ComfyUI 0.33's ModelPatcherDynamic is driven through its own methods with the class forced onto a CPU device (as in
tests/comfyui/test_dynamic_vram.py). Per strength change it times the load (what a re-queue with another strength
pays before sampling) and the first cast of every weight (what the first step pays; with enough VRAM ComfyUI keeps
the cast copy, otherwise every step pays it), for us and for core, and checks our cast bits against a fresh merge.
Host memory: bytes we add beside the base weights (merged copies of the small weights ComfyUI loads whole).

    COMFYUI_ROOT=../shared/comfyui/0.33.0 python bench/dynamic_vram_cpu.py [--hidden 1024 --rank 16]

Timings are ratios within one run on one machine; they are not GPU figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "comfyui")]

from lora_ops.units import MIB  # noqa: E402


def _comfy(root: str):
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    return comfy


def _effective(patcher) -> tuple[dict[str, torch.Tensor], float]:
    """Every weight as the cast gives it (through its `_lowvram_function`), and the seconds that took."""
    out = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name, module in patcher.model.diffusion_model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                fn = getattr(module, pname + "_lowvram_function", None)
                value = p.data.clone()
                out[f"{name}.{pname}" if name else pname] = fn(value) if fn is not None else value
    return out, time.perf_counter() - t0


def _timed_load(comfy, patcher) -> float:
    t0 = time.perf_counter()
    comfy.model_management.load_models_gpu([patcher])
    return time.perf_counter() - t0


def _core_clone(comfy, patcher, lora_sd: dict, strength: float):
    """What LoraLoaderModelOnly does: ComfyUI's own LoRA loader on the kohya keys, patches on a clone."""
    key_map = {}
    for key in patcher.model.state_dict():
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            key_map["lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = key
    clone = patcher.clone()
    clone.add_patches(comfy.lora.load_lora(lora_sd, key_map, log_missing=False), strength)
    return clone


def _measure(comfy, setup: Setup, s: float) -> dict:
    """One strength: load and first-cast seconds for ours and for core, our bit-exactness and host copies."""
    pack, rt, dyn, base, lora = setup.pack, setup.rt, setup.dyn, setup.base, setup.lora
    ours = rt.attach_plan(dyn, [rt.StackEntry("lora", s, lora)])
    t_load = _timed_load(comfy, ours)
    touched = {"diffusion_model." + k for k in lora.targets}
    copies = sum(e.weight.numel() * e.weight.element_size() for k, e in dyn.backup.items() if k in touched)
    got, t_cast = _effective(ours)
    fresh = {k: v.clone() for k, v in base.items()}
    with torch.inference_mode():
        pack.lora_ops.merge_loras(fresh, [(lora, s)])
    exact = all(torch.equal(got[k], fresh[k]) for k in fresh)
    core = _core_clone(comfy, dyn, setup.lora_sd, s)
    c_load = _timed_load(comfy, core)
    _, c_cast = _effective(core)
    return {
        "strength": s,
        "ours_load_s": t_load,
        "ours_first_cast_s": t_cast,
        "core_load_s": c_load,
        "core_first_cast_s": c_cast,
        "ours_bit_exact": exact,
        "ours_host_copies_bytes": copies,
    }


class Setup:
    """The pack imported as ComfyUI does, the model on a ModelPatcherDynamic forced onto the CPU, and one kohya LoRA
    (ours parsed, core's the raw state dict)."""

    def __init__(self, comfy: ModuleType, hidden: int, depth: int, depth_single: int, rank: int) -> None:
        from inprocess import CPU0, build_model, force_dynamic_on_cpu, import_pack
        from lora_factory import base_state_dict
        from safetensors.torch import load_file

        self.rank = rank
        self.pack = import_pack("flux_lora_ops_bench")
        self.rt = sys.modules[self.pack.__name__ + ".nodes.runtime"]
        synthetic = importlib.import_module(self.pack.__name__ + ".lora_ops.synthetic")
        self.shape = self.pack.lora_ops.FluxShape(
            hidden=hidden,
            depth=depth,
            depth_single=depth_single,
            heads=max(1, hidden // 128),
            context_dim=256,
            vec_dim=256,
            time_dim=256,
        )
        self.base = base_state_dict(self.shape, 0)
        with tempfile.TemporaryDirectory() as tmp:  # read into memory, then deleted: the bench leaves no file
            lora_path = synthetic.write_kohya_lora(Path(tmp) / "dyn_bench_lora.safetensors", self.shape, rank)
            self.lora = self.pack.lora_ops.load_lora(lora_path)
            self.lora_sd = load_file(str(lora_path))
        force_dynamic_on_cpu(comfy)
        with torch.inference_mode():
            model = build_model(comfy, self.base)
        self.dyn = comfy.model_patcher.ModelPatcherDynamic(model, load_device=CPU0, offload_device=torch.device("cpu"))


def _figures(setup: Setup, rows: list[dict]) -> dict:
    """What --out writes: the shape, the model's and the LoRA's bytes, and one row per strength."""
    return {
        "shape": setup.shape.__dict__,
        "rank": setup.rank,
        "model_bytes": sum(t.numel() * t.element_size() for t in setup.base.values()),
        "lora_bytes": sum(t.numel() * t.element_size() for t in setup.lora_sd.values()),
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }


def _print_figures(setup: Setup, result: dict) -> None:
    # What a private merged host copy of every weight the LoRA changes would hold (the rejected alternative).
    touched_bytes = sum(setup.base[k].numel() * setup.base[k].element_size() for k in setup.lora.targets)
    print(
        f"model {result['model_bytes'] / MIB:.0f} MiB, LoRA rank {result['rank']} {result['lora_bytes'] / MIB:.1f} "
        f"MiB; private merged copies would hold {touched_bytes / MIB:.0f} MiB of host RAM"
    )
    print("strength  ours load  ours 1st cast  core load  core 1st cast  ours/core cast  bit-exact  our copies")
    for r in result["rows"]:
        print(
            f"{r['strength']:8g}  {r['ours_load_s']:8.3f}s  {r['ours_first_cast_s']:12.3f}s  {r['core_load_s']:8.3f}s"
            f"  {r['core_first_cast_s']:12.3f}s  {r['ours_first_cast_s'] / r['core_first_cast_s']:14.2f}"
            f"  {str(r['ours_bit_exact']):9}  {r['ours_host_copies_bytes'] / 2**10:.0f} KiB"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--depth-single", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--strengths", default="1.0,0.5,-0.25")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        print("set COMFYUI_ROOT to a ComfyUI with ModelPatcherDynamic (e.g. ../shared/comfyui/0.33.0)")
        return 2
    comfy = _comfy(str(Path(root).resolve()))
    setup = Setup(comfy, args.hidden, args.depth, args.depth_single, args.rank)
    rows = [_measure(comfy, setup, float(strength)) for strength in args.strengths.split(",")]
    result = _figures(setup, rows)
    _print_figures(setup, result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(r["ours_bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
