"""GPU suite, setup sections: the environment record, then a Flux-shaped bf16 model made directly on the device
and kohya LoRAs written to a file and read back with lora_ops.load_lora, which the later sections measure on.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from suite_harness import Suite
from suite_measure import allocated, timed

from lora_ops.units import GIB, MIB

if TYPE_CHECKING:
    from lora_ops import FluxShape, LoRAFile


def describe_environment(suite: Suite) -> dict:
    """Section "environment": what ran, where, so that the figures can be read later."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "python": sys.version.split()[0], "device": str(suite.device), "tiny": suite.tiny,
            "shape": str(suite.shape), "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if suite.device.type == "cuda":
        props = torch.cuda.get_device_properties(suite.device)
        info.update(gpu=props.name, gpu_total_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
        suite.say(f"GPU {props.name}, {props.total_memory / GIB:.1f} GiB, CUDA {torch.version.cuda}, "
                  f"torch {torch.__version__}")
    else:
        suite.say(f"CPU run (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return info


def make_weights(shape: FluxShape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 Flux weights made directly on `device` (no host copy)."""
    from lora_ops.flux import flux_weight_shapes

    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, dims in flux_weight_shapes(shape).items():
        t = torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16)
        if name.endswith("_norm.scale"):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.01 if name.endswith(".bias") else 0.02)
        out[name] = t
    return out


def make_lora(shape: FluxShape, rank: int, tmp: Path) -> tuple[LoRAFile, Path]:
    """A kohya LoRA of `rank`, saved to `tmp` and loaded back: the path a user's file takes."""
    from safetensors.torch import save_file

    from lora_ops import load_lora
    from lora_ops.synthetic import kohya_lora_tensors

    path = tmp / f"kohya_rank{rank}.safetensors"
    tensors = kohya_lora_tensors(shape, rank, seed=rank)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    del tensors
    return load_lora(path), path


def lora_params(lora: LoRAFile) -> int:
    return sum(t.numel() for ads in lora.targets.values() for a in ads for t in a.factors().values())


def build_weights_and_loras(suite: Suite) -> dict:
    """Section "build": sets suite.weights and suite.loras; without them no other section can run."""
    from lora_ops.flux import parameter_count

    before = allocated(suite.device)
    t = timed(suite.device, lambda: setattr(suite, "weights", make_weights(suite.shape, suite.device)))
    nbytes = sum(v.numel() * v.element_size() for v in suite.weights.values())
    measured = allocated(suite.device) - before
    suite.say(f"weights: {parameter_count(suite.shape):,} params, {nbytes / GIB:.2f} GiB bf16 made on "
              f"{suite.device} in {t:.1f} s (allocator: {measured / GIB:.2f} GiB)")
    suite.loras = {}
    out = {"params": parameter_count(suite.shape), "bytes": nbytes, "allocated_bytes": measured, "seconds": t,
           "loras": {}}
    for rank in suite.args.ranks:
        t0 = time.perf_counter()
        lora, path = make_lora(suite.shape, rank, Path(suite.tmp.name))
        suite.loras[rank] = lora
        out["loras"][rank] = {"params": lora_params(lora), "targets": len(lora.targets),
                              "file_bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}
        suite.say(f"LoRA rank {rank}: {len(lora.targets)} targets, {lora_params(lora) / 1e6:.1f} M params, "
                  f"file {path.stat().st_size / MIB:.0f} MiB, built + loaded in {time.perf_counter() - t0:.1f} s")
    return out
