"""The GPU suite's harness: its configuration, clock and time budget, the guard around each section, and the
record (gpu_suite.json and gpu_suite.txt), written again after every section so that a timeout keeps what was
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lora_ops import LoRAFile


class Suite:
    """What the sections share: shape, device and image size, the model and LoRAs once built, the clock and the
    record. A section is a function taking the suite; `section` runs it under the guard.
    """

    weights: dict[str, torch.Tensor]  # set by the build section
    loras: dict[int, LoRAFile]  # rank -> LoRA, set by the build section

    def __init__(self, args: argparse.Namespace) -> None:
        from lora_ops.flux import FLUX_DEV, FluxShape

        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        if args.tiny:
            self.shape = FluxShape(hidden=256, depth=2, depth_single=2, heads=2, context_dim=128, vec_dim=64,
                                   time_dim=64)
        elif args.blocks:
            self.shape = FluxShape(depth=args.blocks, depth_single=args.blocks)
        else:
            self.shape = FLUX_DEV
        size = args.size or (256 if args.tiny else 1024)
        self.width = self.height = size
        self.text_tokens = 64 if args.tiny else 512
        self.out = Path(args.out or os.environ.get("OUT") or "bench_results")
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.results: dict[str, object] = {"sections": {}, "errors": {}}
        self.lines: list[str] = []
        self.tmp = tempfile.TemporaryDirectory()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def left(self) -> float:
        """Seconds left of --budget-s: optional work is skipped when this runs low."""
        return self.args.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        """Print a line stamped with the elapsed time and keep it for gpu_suite.txt."""
        line = f"[{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_suite.txt").write_text("\n".join(self.lines) + "\n")

    def section(self, name: str, fn: Callable[..., object], *args: object) -> object:
        """fn(self, *args) recorded under `name`; on an error the error is recorded instead and None returned."""
        try:
            value = fn(self, *args)
            self.results["sections"][name] = value
            return value
        except Exception as e:  # noqa: BLE001 - record and go on: one failing section must not lose the others
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
            self.say(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            self.save()
