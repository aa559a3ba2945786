"""`python -m lora_ops`: inspect LoRAs, merge them into Flux checkpoints, resize LoRAs, run the demo.

Errors print one line on stderr and exit with code 2; no traceback, no output file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable

import torch

from .blocks import (
    BLOCK_SPEC_GRAMMAR,
    block_counts,
    blocks_touched,
    describe_blocks,
    parse_block_spec,
    with_block_weights,
)
from .errors import LoRAOpsError, UndoError, is_out_of_memory
from .formats import LoRAFile, describe, load_lora
from .model_files import open_flux_checkpoint
from .units import GIB

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `configure` adds its arguments, the decorated function runs it."""

    def register(run: Command) -> Command:
        COMMANDS[name] = (configure, run)
        return run

    return register


def parse_lora_arg(text: str) -> tuple[str, float]:
    """PATH or PATH:STRENGTH (a Windows drive letter is not mistaken for a strength)."""
    path, sep, tail = text.rpartition(":")
    if sep and path and not tail.startswith(("\\", "/")):
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


class _BlocksOfLastLoRA(argparse.Action):
    """`--blocks SPEC` belongs to the `--lora` given just before it: stored as {lora index: spec}."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        loras = getattr(namespace, "lora", None) or []
        if not loras:
            parser.error("--blocks belongs to the --lora before it; give --lora PATH[:STRENGTH] first")
        specs = dict(getattr(namespace, self.dest, None) or {})
        if len(loras) - 1 in specs:
            parser.error(f"two --blocks after --lora {loras[-1]}; join them into one spec (later rules win)")
        specs[len(loras) - 1] = value
        setattr(namespace, self.dest, specs)


def _with_blocks(stack: list[tuple[LoRAFile, float]], specs: dict[int, str] | None, model_path: str):
    """Apply each LoRA's --blocks spec, checked against the model's block counts (read from its header)."""
    if not specs:
        return stack
    counts = block_counts(open_flux_checkpoint(model_path).keys())
    return [
        (with_block_weights(lora, parse_block_spec(specs[i], counts)) if i in specs else lora, strength)
        for i, (lora, strength) in enumerate(stack)
    ]


def _load_stack(specs: list[str], legacy_split_qkv: bool = False) -> list[tuple[LoRAFile, float]]:
    stack = []
    for spec in specs:
        path, strength = parse_lora_arg(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora = load_lora(path, legacy_split_qkv=legacy_split_qkv)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        stack.append((lora, strength))
    return stack


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lora", help="LoRA .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("inspect", _inspect_args)
def _inspect(args: argparse.Namespace) -> int:
    lora = load_lora(args.lora)
    info = {**describe(lora), "blocks": blocks_touched(lora)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{lora.path}: {info['format']} LoRA, {info['targets']} Flux weights, kinds {info['kinds']}")
        print(f"  made for {info['family']}")
        print(f"  ranks {info['ranks']}; alphas {info['alphas']}; {info['file_mib']:.1f} MiB of factors")
        print(f"  unmerged at run time it adds about {info['unmerged_runtime_mib']:.0f} MiB of GPU memory "
              "(fp32 factors + bf16 autocast cache, as kohya's flux_minimal_inference keeps them); merged: 0")
        print("  " + describe_blocks(lora))
        print("  " + lora.coverage.summary().replace("\n", "\n  "))
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Flux checkpoint (.safetensors, BFL names with or without diffusion_model.)")
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:STRENGTH]", help="repeat for a stack")
    p.add_argument("--blocks", action=_BlocksOfLastLoRA, metavar="SPEC",
                   help=f"per-block strengths of the --lora before it: {BLOCK_SPEC_GRAMMAR}")
    p.add_argument("--out", required=True, help="output .safetensors (never an input file)")
    p.add_argument("--dtype", default="keep", help="keep | bf16 | fp16 | fp32 | fp8 (see --format)")
    p.add_argument("--policy", default="default", help="fp8 layer policy (with --dtype fp8): default | quality | all")
    _fp8_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where the merge math runs")
    p.add_argument("--legacy-split-qkv", action="store_true", help="read kohya split_qkv files the old, weak way")


def _device(name: str) -> str | None:
    """--device: None for the CPU, else a device torch has (checked before anything is read or written)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if name == "cpu":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LoRAOpsError(f"--device {name}: not a device; use auto, cpu or cuda (cuda:1 for a second GPU)") from None
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise LoRAOpsError(f"--device {name}: this torch has no usable {device.type} device; use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise LoRAOpsError(f"--device {name}: there are only {backend.device_count()} {device.type} devices")
    return name


@command("merge", _merge_args)
def _merge(args: argparse.Namespace) -> int:
    from .offline import merge_checkpoint

    device = _device(args.device)
    stack = _with_blocks(_load_stack(args.lora, args.legacy_split_qkv), args.blocks, args.model)
    start = time.perf_counter()
    if args.dtype == "fp8":
        from .fp8 import merge_checkpoint_fp8

        summary = merge_checkpoint_fp8(args.model, stack, args.out, policy=args.policy, device=device,
                                       rounding=args.rounding, seed=args.seed, fp8_matmul=args.fp8_matmul,
                                       file_format=args.file_format)
    else:
        summary = merge_checkpoint(args.model, stack, args.out, dtype=args.dtype, device=device)
    print(f"wrote {summary['out']}: {summary['merged']} of {summary['tensors']} tensors merged "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, default=1, help="double and single blocks at real width 3072 (default 1+1)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


@command("demo", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(blocks=args.blocks, rank=args.rank, device=_device(args.device) or "cpu")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="flux-dev", help="flux-dev | flux-schnell | a checkpoint (header only)")
    p.add_argument("--dtype", default=None,
                   help="bf16 | fp16 | fp32 | fp8 | fp8-default | fp8-quality (default: bf16, or as stored)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH", help="LoRA file; repeat for a stack")
    p.add_argument("--lora-rank", type=int, default=None, help="or: a kohya LoRA of this rank on the block Linears")
    p.add_argument("--mode", default="unmerged", help="unmerged (kohya runtime LoRA) | merged")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", action="store_true", help="true CFG with a negative prompt (doubles the batch)")
    p.add_argument("--text-encoder", "--t5", dest="text_encoder", default="bf16",
                   help="the model's text encoder (T5-XXL, Mistral Small 3.1, Qwen3): bf16 | fp8 | offload")
    p.add_argument("--clip", default="bf16", help="bf16 | offload")
    p.add_argument("--vae", default="bf16", help="bf16 | offload")
    p.add_argument("--card", type=float, default=None, help="card memory in GiB (default: the current CUDA device)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("plan", _plan_args)
def _plan(args: argparse.Namespace) -> int:
    from .planner import PlanRequest, plan

    result = plan(PlanRequest(
        model=args.model, dtype=args.dtype, loras=tuple(args.lora), lora_rank=args.lora_rank, mode=args.mode,
        width=args.width, height=args.height, batch=args.batch, cfg=args.cfg, text_encoder=args.text_encoder,
        clip=args.clip, vae=args.vae, card_gib=args.card, text_tokens=args.text_tokens,
    ))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    return 0


def _fp8_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"), help="fp8 rounding")
    p.add_argument("--seed", type=int, default=0, help="seed for --rounding stochastic (mixed with each key name)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="mark the file so ComfyUI may run fp8 matmuls (activations cast to fp8 too)")
    p.add_argument("--format", default="comfy_quant", choices=("comfy_quant", "scaled_fp8"), dest="file_format",
                   help="fp8 file format: comfy_quant (default; per-layer weight_scale + _quantization_metadata, "
                        "what ComfyUI 0.33 and later read natively) or scaled_fp8 (ComfyUI 0.3.x, e.g. 0.3.64, "
                        "which reads comfy_quant files without their scales)")


def _cast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Flux checkpoint (bf16/fp16/fp32, or fp8 to re-cast)")
    p.add_argument("--out", required=True, help="output fp8 .safetensors (never the input)")
    p.add_argument("--policy", default="default", help="default | quality | all (see lora_ops.fp8.BLOCK_PRESETS)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where the quantisation math runs")
    _fp8_args(p)


@command("cast", _cast_args)
def _cast(args: argparse.Namespace) -> int:
    from .fp8 import merge_checkpoint_fp8

    device = _device(args.device)
    start = time.perf_counter()
    summary = merge_checkpoint_fp8(args.model, [], args.out, policy=args.policy, device=device,
                                   rounding=args.rounding, seed=args.seed, fp8_matmul=args.fp8_matmul,
                                   file_format=args.file_format)
    print(f"wrote {summary['out']}: {summary['fp8_tensors']} of {summary['tensors']} tensors in fp8 "
          f"(policy {summary['policy']}, {summary['format']} format), {summary['bytes'] / GIB:.2f} GiB in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def _resize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lora", help="LoRA .safetensors file (any supported format)")
    p.add_argument("--out", required=True, help="output .safetensors (never the input)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="cut every layer to this rank")
    size.add_argument("--energy", type=float, help="per layer, keep this share of the singular-value energy (0.99)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line, not one line per layer")


@command("resize", _resize_args)
def _resize(args: argparse.Namespace) -> int:
    from .resize import resize_lora

    report = resize_lora(args.lora, args.out, rank=args.rank, energy=args.energy)
    table = report.format_table()
    print(table.splitlines()[-1 - len(report.notes)] if args.quiet else table)
    return 0


def _error_line(e: BaseException) -> str:
    """One line for stderr: what went wrong, with the file it concerns."""
    if isinstance(e, (LoRAOpsError, UndoError)):
        text = str(e)
    elif isinstance(e, OSError):
        text = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    elif is_out_of_memory(e):
        detail = " ".join(str(e).split())[:200] or "no details"
        text = (f"out of memory ({detail}); nothing was written. Free memory (close other programs) and run again, "
                "or use --device cpu if it ran on the GPU")
    else:  # not an input problem: say what it was so that it can be reported
        text = f"unexpected {type(e).__name__}: {e}; nothing was written. Please report this with the command line"
    return " ".join(text.split())


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 2 like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m lora_ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (configure, _) in COMMANDS.items():
        configure(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except Exception as e:  # every error: one line, exit code 2 (no traceback, no output file)
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
