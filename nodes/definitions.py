"""The pack's nodes, declared once: inputs with tooltips, outputs, and what each node does.

`v3.py` and `v1.py` turn these declarations into ComfyUI node classes (V3 schema / V1 INPUT_TYPES), so
both registration paths expose the same nodes. The work itself is in `runtime.py` (what a node asks of a
MODEL; merged at load by `lifecycle.py`), `library.py` (parsed LoRA files) and `vram.py` (report); the math is in
`lora_ops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths

from ..lora_ops import BLOCK_SPEC_GRAMMAR, GIB, MIB, LoRAOpsError, describe_blocks, parse_block_spec, resize_lora
from ..lora_ops.fp8 import PRESETS, ROUNDINGS
from . import library, runtime, text_encoder, vram
from .fit import FitRequest, fit_lines

CATEGORY = "Flux LoRA Ops"
STACK_TYPE = "FLUX_LORA_STACK"
ANY_TYPE = "*"


@dataclass(frozen=True)
class In:
    name: str
    type: str  # MODEL, CLIP, FLOAT, INT, BOOLEAN, STRING, COMBO, FLUX_LORA_STACK, *
    tooltip: str
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Callable[[], list[str]] | None = None  # COMBO choices, read each time the UI asks
    multiline: bool = False


@dataclass(frozen=True)
class Out:
    type: str  # MODEL, CLIP, STRING, IMAGE, FLUX_LORA_STACK, *
    name: str
    tooltip: str


@dataclass
class Result:
    values: tuple
    text: str | None = None  # shown on the node ({"ui": {"text": [...]}})


@dataclass(frozen=True)
class NodeDef:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    run: Callable[..., Result]
    output_node: bool = False
    always_run: bool = False


class LoRAStack(tuple):
    """The value of a FLUX_LORA_STACK socket: a tuple of runtime.StackEntry, in merge order."""

    def __repr__(self) -> str:
        return "LoRAStack(" + ", ".join(f"{e.name}@{e.strength:g}" for e in self) + ")"


# --------------------------------------------------------------------------------------------- LoadFluxLoRA


def _lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def _coverage_text(name: str, strength: float, lora, messages: tuple[str, ...], blocks: str) -> str:
    ranks = ", ".join(f"rank {r} x{n}" for r, n in sorted(lora.ranks.items())) or "no low-rank factors"
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(lora.kinds().items()))
    lines = [
        f"{name} @ strength {strength:g}" + (f", block strengths: {blocks}" if blocks else ""),
        f"format: {lora.format}; {len(lora.targets)} Flux weights changed ({kinds}; {ranks}); "
        f"{lora.nbytes / MIB:.1f} MiB of factors",
        describe_blocks(lora),
        lora.coverage.summary(),
    ]
    lines.extend(f"warning: {m}" for m in messages)
    return "\n".join(lines)


#: Block counts large enough for any model: the Load node checks a spec's grammar; the Merge node checks its
#: block numbers against the model it merges into.
_ANY_MODEL = {"double": 10**6, "single": 10**6}


def run_load_lora(
    lora_name: str,
    strength: float = 1.0,
    lora_stack=None,
    legacy_split_qkv: bool = False,
    blocks: str = "",
    clip=None,
    strength_clip: float = 1.0,
) -> Result:
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    lora, messages = library.load_cached(path, legacy_split_qkv=legacy_split_qkv)
    blocks = (blocks or "").strip()
    try:
        parse_block_spec(blocks, _ANY_MODEL)
    except LoRAOpsError as error:
        raise LoRAOpsError(f"{lora_name}: {error}") from None
    entry = runtime.StackEntry(lora_name, float(strength), lora, block_spec=blocks)
    stack = LoRAStack((*(lora_stack or ()), entry))
    text = _coverage_text(lora_name, float(strength), lora, messages, blocks)
    clip_out, clip_text = text_encoder.apply_to_clip(clip, lora, float(strength_clip), lora_name)
    if clip_text:
        text += "\n" + clip_text
    if len(stack) > 1:
        text = f"stack: {', '.join(e.describe() for e in stack)}\n" + text
    return Result((stack, text, clip_out), text)


LOAD_LORA = NodeDef(
    node_id="LoadFluxLoRA",
    display_name="Load Flux LoRA",
    description=(
        "Reads a Flux LoRA in any known key format (kohya, BFL/ComfyUI, diffusers/PEFT, OneTrainer, XLabs, "
        "LyCORIS LoKr/LoHa, DoRA, full diffs) and adds it with a strength to a LoRA stack. Nothing is merged "
        "here: connect the stack to 'Merge LoRA Into Model'. The text output lists where every key of the file "
        "went and every key that could not be applied."
    ),
    inputs=(
        In("lora_name", "COMBO", "LoRA file from models/loras.", options=_lora_names),
        In(
            "strength",
            "FLOAT",
            "How strongly the LoRA changes the model (1.0 = as trained; negative subtracts it).",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
        ),
        In(
            "lora_stack",
            STACK_TYPE,
            "Optional stack from another 'Load Flux LoRA' node; this LoRA is appended to it.",
            optional=True,
        ),
        In(
            "legacy_split_qkv",
            "BOOLEAN",
            "Read kohya split-qkv files the old way (3-4x weaker, as older tools did). Leave off unless you need "
            "to reproduce old results.",
            optional=True,
            default=False,
        ),
        In(
            "blocks",
            "STRING",
            "Per-block strengths of this LoRA (empty = every block at 1), multiplied with 'strength': "
            + BLOCK_SPEC_GRAMMAR
            + ". Block numbers are checked against the model at 'Merge LoRA Into Model' (Flux.1: double 0-18, "
            "single 0-37). Changing it re-merges in place, like a strength change.",
            optional=True,
            default="",
        ),
        In(
            "clip",
            "CLIP",
            "Optional: the text encoders (CLIP-L/T5). The LoRA's text-encoder keys (lora_te1_/lora_te2_...) are "
            "applied to it through ComfyUI's own patching, as the core LoRA loader does.",
            optional=True,
        ),
        In(
            "strength_clip",
            "FLOAT",
            "How strongly the LoRA's text-encoder part changes the CLIP (only with a CLIP connected).",
            optional=True,
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
        ),
    ),
    outputs=(
        Out(STACK_TYPE, "lora_stack", "The stack: earlier LoRAs plus this one, with strengths."),
        Out("STRING", "coverage", "Which weights the file changes, its format and ranks, and every unmapped key."),
        Out("CLIP", "clip", "The CLIP with this LoRA's text-encoder part applied (the input if it has none)."),
    ),
    run=run_load_lora,
)


# --------------------------------------------------------------------------------------------- MergeLoRAIntoModel

COMPUTE_CHOICES = ["auto", "weight", "cpu"]


def run_merge(model, lora_stack, compute: str = "auto", tile_mb: int = 64) -> Result:
    entries = tuple(lora_stack or ())
    merged = runtime.attach_plan(model, entries, compute=compute, tile_mb=tile_mb)
    plan = merged.attachments.get(runtime.ATTACHMENT) if hasattr(merged, "attachments") else None
    if plan is None:
        return Result((merged,), "empty stack: the model is passed through unchanged")
    text = (
        f"merges at load, in place: {plan.describe()}\n"
        f"(undone exactly when another branch of this model loads; a strength change updates in place)"
    )
    return Result((merged,), text)


MERGE = NodeDef(
    node_id="MergeLoRAIntoModel",
    display_name="Merge LoRA Into Model",
    description=(
        "Merges a LoRA stack into the model's weights in place, tile by tile, when ComfyUI loads the model for "
        "sampling or saving: no backup copy of the weights, no per-step LoRA cost. Other branches of the same "
        "model get the exact original weights back; re-queueing with other strengths updates the merged "
        "weights in one pass instead of reloading."
    ),
    inputs=(
        In("model", "MODEL", "The Flux diffusion model (e.g. from Load Diffusion Model)."),
        In(
            "lora_stack",
            STACK_TYPE,
            "LoRAs and strengths from 'Load Flux LoRA'. Merged after any stack this model already has.",
        ),
        In(
            "compute",
            "COMBO",
            "Where the merge math runs: auto = the model's load device (GPU if any), weight = where each weight "
            "lives, cpu = always on the CPU (no VRAM used by the merge).",
            optional=True,
            default="auto",
            options=lambda: list(COMPUTE_CHOICES),
        ),
        In(
            "tile_mb",
            "INT",
            "Working memory per tile of rows, in MiB (the merge never holds more than this in fp32).",
            optional=True,
            default=64,
            min=1,
            max=4096,
            step=1,
        ),
    ),
    outputs=(Out("MODEL", "model", "The model with the LoRAs merged at load (same weights storage, no copy)."),),
    run=run_merge,
)


# --------------------------------------------------------------------------------------------- CastFluxFP8


def run_cast_fp8(model, policy: str = "default", rounding: str = "nearest", fp8_matmul: bool = False) -> Result:
    cast = runtime.attach_fp8(model, policy=policy, rounding=rounding, fp8_matmul=fp8_matmul)
    plan = cast.attachments[runtime.ATTACHMENT]
    before = model.model_size()
    text = (
        f"at load: {plan.describe()}\n"
        f"model size {before / GIB:.2f} GiB -> {cast.model_size() / GIB:.2f} GiB; the 16-bit originals are "
        "not modified (ComfyUI swaps them back for other branches)"
    )
    return Result((cast,), text)


def _policy_help() -> str:
    return " ".join(f"{name}: {p.description}." for name, p in PRESETS.items())


CAST_FP8 = NodeDef(
    node_id="CastFluxFP8",
    display_name="Cast Flux To FP8",
    description=(
        "Stores the model's big Linear layers in fp8 (float8_e4m3fn with a fresh per-tensor scale) when ComfyUI "
        "loads it, about halving their memory. Any LoRA stack merged into this model (before or after this node) "
        "is merged first in fp32 and the result rounded to fp8 once (merge-then-quantise). The 16-bit weights "
        "stay untouched in system RAM; other branches of the model keep using them."
    ),
    inputs=(
        In("model", "MODEL", "The Flux model (bf16/fp16), e.g. after 'Merge LoRA Into Model'."),
        In(
            "policy",
            "COMBO",
            "Which Linears go to fp8. " + _policy_help(),
            default="default",
            options=lambda: list(PRESETS),
        ),
        In(
            "rounding",
            "COMBO",
            "nearest: lowest error (recommended). stochastic: unbiased on average, about 1.4x the error.",
            optional=True,
            default="nearest",
            options=lambda: list(ROUNDINGS),
        ),
        In(
            "fp8_matmul",
            "BOOLEAN",
            "Run the fp8 layers with torch._scaled_mm on GPUs that support it (compute capability 8.9+): faster, "
            "but the activations are quantised too. Off: the weights are dequantised for each matmul.",
            optional=True,
            default=False,
        ),
    ),
    outputs=(Out("MODEL", "model", "The model, cast to fp8 at load (with any merged LoRAs)."),),
    run=run_cast_fp8,
)


# --------------------------------------------------------------------------------------------- VRAMReport


def run_vram_report(
    label: str = "", passthrough=None, width: int = 1024, height: int = 1024, batch_size: int = 1, cfg: bool = False
) -> Result:
    snap = vram.take_snapshot(reset_peak=True)
    card = snap.gpu_total if snap.has_gpu else None
    fit = fit_lines(passthrough, FitRequest(width, height, batch_size, cfg), card)
    text = vram.format_report(snap, label) + "\n" + "\n".join(fit)
    chart = vram.draw_chart(snap, label)
    return Result((passthrough, text, chart), text)


VRAM_REPORT = NodeDef(
    node_id="VRAMReport",
    display_name="VRAM Report",
    description=(
        "Reports GPU memory (total, free, torch allocated/reserved, peak since the previous report), each model "
        "ComfyUI has loaded, the process RSS and system RAM, as text and as a bar chart; and, next to what is used, "
        "whether sampling the Flux model at the given size fits the card (the pack's planner, on the model as "
        "loaded) with the cheapest change if not. Runs every time the prompt runs. Connect anything to "
        "'passthrough' to place it in the graph (e.g. after a sampler); a MODEL there is the one planned."
    ),
    inputs=(
        In("label", "STRING", "A name for this report (e.g. 'before merge').", optional=True, default=""),
        In(
            "passthrough",
            ANY_TYPE,
            "Anything; it is passed on unchanged and makes the report run after it. A Flux MODEL here is the one "
            "'will this fit' plans (otherwise the Flux model ComfyUI has loaded).",
            optional=True,
        ),
        In("width", "INT", "Image width to plan for.", optional=True, default=1024, min=64, max=16384, step=16),
        In("height", "INT", "Image height to plan for.", optional=True, default=1024, min=64, max=16384, step=16),
        In("batch_size", "INT", "Images per batch to plan for.", optional=True, default=1, min=1, max=64, step=1),
        In("cfg", "BOOLEAN", "Plan for true CFG (a negative prompt doubles the batch).", optional=True, default=False),
    ),
    outputs=(
        Out(ANY_TYPE, "passthrough", "The 'passthrough' input, unchanged."),
        Out("STRING", "report", "The report as text."),
        Out("IMAGE", "chart", "A bar chart of where the memory goes."),
    ),
    run=run_vram_report,
    output_node=True,
    always_run=True,
)


# --------------------------------------------------------------------------------------------- ResizeFluxLoRA


def run_resize(lora_name: str, rank: int = 16, energy: float = 0.99, output_name: str = "") -> Result:
    source = Path(folder_paths.get_full_path_or_raise("loras", lora_name))
    size = f"rank{rank}" if rank > 0 else f"energy{energy:g}"
    out = source.with_name(Path(output_name).name if output_name.strip() else f"{source.stem}_{size}.safetensors")
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    if out.exists():
        raise LoRAOpsError(f"{out} already exists; delete it or give another output_name")
    report = resize_lora(source, out, rank=rank if rank > 0 else None, energy=None if rank > 0 else energy)
    return Result((report.format_table(),), report.format_table())


RESIZE = NodeDef(
    node_id="ResizeFluxLoRA",
    display_name="Resize Flux LoRA",
    description=(
        "Writes a smaller copy of a LoRA next to it in your loras folder: each layer's change cut to its best "
        "low-rank approximation (truncated SVD), at a fixed rank or keeping a share of each layer's energy. "
        "A smaller rank needs less GPU memory when a LoRA is applied unmerged. The report lists each layer's "
        "relative error and the memory saved. Refresh the page (R) to see the new file in the LoRA lists."
    ),
    inputs=(
        In("lora_name", "COMBO", "LoRA file from models/loras to shrink (it is not changed).", options=_lora_names),
        In(
            "rank",
            "INT",
            "Cut every layer to this rank. 0 = use 'energy' instead.",
            default=16,
            min=0,
            max=4096,
            step=1,
        ),
        In(
            "energy",
            "FLOAT",
            "With rank 0: per layer, keep the fewest singular values holding this share of the change's energy.",
            default=0.99,
            min=0.01,
            max=1.0,
            step=0.001,
        ),
        In(
            "output_name",
            "STRING",
            "File name of the result (in the same folder). Empty: <name>_rank16.safetensors or "
            "<name>_energy0.99.safetensors. An existing file is never overwritten.",
            optional=True,
            default="",
        ),
    ),
    outputs=(Out("STRING", "report", "Per layer: old and new rank, relative error, GPU memory saved unmerged."),),
    run=run_resize,
    output_node=True,
)


def always_changed(**_kwargs) -> float:
    return math.nan


NODE_DEFS: tuple[NodeDef, ...] = (LOAD_LORA, MERGE, CAST_FP8, VRAM_REPORT, RESIZE)
