"""The cheapest fix: the changes that make a plan fit, cheapest first, and what is left when none does.

Tried in this order: merge the LoRA, fp8 weights, offload the text encoder, fp8 text encoder, no CFG,
smaller batches; for a LoRA applied unmerged, the largest rank that fits (`python -m lora_ops resize`);
and when nothing fits, how many GiB of the weights must stay in system RAM (ComfyUI's lowvram /
dynamic VRAM loading streams them to the GPU for every step, which is slower).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..flux import is_block_linear
from .companions import text_encoder_for
from .evaluate import evaluate
from .inputs import LoRAInfo, ModelInfo, PlanRequest, check_request, read_loras, read_model
from .memory import weight_dtypes
from .result import Plan

Change = tuple[str, dict[str, object]]
#: Ranks offered for `resize`, largest first.
RESIZE_RANKS = (128, 96, 64, 48, 32, 24, 16, 8, 4)


def _changes(req: PlanRequest, model: ModelInfo, has_lora: bool, stored_policy: str) -> list[Change]:
    """Candidate changes, cheapest first."""
    out: list[Change] = []
    if has_lora and req.mode == "unmerged":
        out.append(("merge the LoRA", {"mode": "merged"}))
    current = req.dtype or stored_policy
    # fp8-quality differs from fp8-default only where blocks have their own modulation (Flux.1)
    quality = weight_dtypes(model, "fp8-quality") != weight_dtypes(model, "fp8-default")
    if not current.startswith("fp8") and quality:
        out.append(("fp8 weights (fp8-quality: modulation stays bf16)", {"dtype": "fp8-quality"}))
    if not current.startswith("fp8") or (current == "fp8-quality" and quality):
        out.append(("fp8 weights (fp8-default)", {"dtype": "fp8-default"}))
    encoder = text_encoder_for(model.shape.context_dim)
    if encoder is not None and req.text_encoder != "offload":
        out.append((f"offload {encoder.short}", {"text_encoder": "offload"}))
    if encoder is not None and req.text_encoder == "bf16":
        out.append((f"fp8 {encoder.short}", {"text_encoder": "fp8"}))
    if req.cfg:
        out.append(("no CFG", {"cfg": False}))
    batch = req.batch
    while batch > 1:
        batch //= 2
        out.append((f"batch {batch}", {"batch": batch}))
    return out


def _attempt(req: PlanRequest, model: ModelInfo, lora: LoRAInfo | None, chosen: list[Change]) -> Plan:
    kw: dict[str, object] = {}
    for _, change in chosen:
        kw.update(change)
    return evaluate(dataclasses.replace(req, **kw), model, lora)


def _accumulate(plan: Plan, model: ModelInfo, lora: LoRAInfo | None, candidates: list[Change]) -> list[Change]:
    """Add changes in order (keeping those that lower the peak) until it fits; then drop the dearest unneeded."""
    req = plan.request
    chosen: list[Change] = []
    trial = plan
    for candidate in candidates:
        keys = set(candidate[1])
        option = [c for c in chosen if not keys & set(c[1])] + [candidate]  # a later fp8/encoder/batch step replaces
        better = _attempt(req, model, lora, option)
        if better.peak_bytes < trial.peak_bytes:
            chosen, trial = option, better
        if trial.fits:
            break
    if trial.fits:
        for candidate in reversed(list(chosen)):
            rest = [c for c in chosen if c is not candidate]
            if rest and _attempt(req, model, lora, rest).fits:
                chosen = rest
    return chosen


def _suggest(plan: Plan, model: ModelInfo, lora: LoRAInfo | None) -> None:
    req = plan.request
    linears = [d for n, (_, d) in model.tensors.items() if is_block_linear(n)]
    stored = "fp8" if linears and all(d.itemsize == 1 for d in linears) else "bf16"
    candidates = _changes(req, model, lora is not None, stored)
    for candidate in candidates:  # one change alone, cheapest first
        trial = _attempt(req, model, lora, [candidate])
        if trial.fits:
            plan.suggestion, plan.suggestion_peak_bytes, plan.suggestion_fits = [candidate[0]], trial.peak_bytes, True
            return
    chosen = _accumulate(plan, model, lora, candidates)
    trial = _attempt(req, model, lora, chosen)
    plan.suggestion = [name for name, _ in chosen]
    plan.suggestion_peak_bytes = trial.peak_bytes
    plan.suggestion_fits = bool(trial.fits)
    if not trial.fits:
        plan.offload_bytes = _weights_to_offload(trial, model)


def _weights_to_offload(best: Plan, model: ModelInfo) -> int | None:
    """Bytes of weights that must stay in system RAM with every listed change; None if even one block cannot run
    next to the activations (the GPU must hold the block being computed)."""
    over = best.peak_bytes - best.usable_bytes
    tensors = weight_dtypes(model, best.policy if best.policy != "as stored" else None)
    blocks: dict[str, int] = {}
    for name, (dims, dtype) in tensors.items():
        if is_block_linear(name):
            block = ".".join(name.split(".", 2)[:2])
            blocks[block] = blocks.get(block, 0) + dtype.itemsize * math.prod(dims)
    largest = max(blocks.values(), default=0)
    return over if over <= best.weight_bytes - largest else None


def _resize_alternative(plan: Plan, model: ModelInfo, lora: LoRAInfo | None) -> None:
    """For a LoRA kept unmerged: the largest rank (below its own) at which the plan fits as it is."""
    if lora is None or plan.request.mode != "unmerged" or plan.fits is not False:
        return
    for rank in RESIZE_RANKS:
        if rank >= lora.max_rank:
            continue
        smaller = dataclasses.replace(lora, params=lora.params_at_rank(model.shape, rank))
        trial = evaluate(plan.request, model, smaller)
        if trial.fits:
            plan.resize_rank, plan.resize_peak_bytes = rank, trial.peak_bytes
            return


def plan(req: PlanRequest | None = None, **kw) -> Plan:
    """Plan a sampling run; `plan(model="flux2-dev", lora_rank=32, card_gib=24)` or `plan(PlanRequest(...))`."""
    req = dataclasses.replace(req, **kw) if req is not None else PlanRequest(**kw)
    if isinstance(req.loras, (str, Path)):
        req = dataclasses.replace(req, loras=(str(req.loras),))
    else:
        req = dataclasses.replace(req, loras=tuple(str(p) for p in req.loras))
    check_request(req)
    model = read_model(req.model)
    return plan_model(req, model)


def plan_model(req: PlanRequest, model: ModelInfo) -> Plan:
    """Plan for a model already described (a preset, a checkpoint header, or a model loaded in ComfyUI)."""
    lora = read_loras(req, model.shape)
    result = evaluate(req, model, lora)
    if not model.is_preset and req.dtype is None:
        result.notes.append("weights counted as stored (file or loaded model); pass a dtype to plan another storage")
    if result.fits is False:
        _suggest(result, model, lora)
        _resize_alternative(result, model, lora)
    return result
