"""Evaluate a request against a card, and search the cheapest changes that make it fit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..flux import FluxShape, is_block_linear
from ..formats import UNMERGED_BYTES_PER_PARAM
from ..units import GIB
from .activations import activation_points, tokens_for
from .companions import text_encoder_for
from .inputs import LoRAInfo, ModelInfo, PlanRequest, check_request, read_loras, read_model
from .memory import encoder_bytes, merge_temporaries, weight_dtypes, weights_by_dtype
from .result import Plan


def _card(req: PlanRequest) -> tuple[int | None, str]:
    if req.card_gib is not None:
        return int(req.card_gib * GIB), "given"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"cuda:{torch.cuda.current_device()} {props.name}"
    return None, "none"


def _evaluate(req: PlanRequest, model: ModelInfo, lora: LoRAInfo | None) -> Plan:
    policy = req.dtype if (req.dtype is not None or not model.is_preset) else "bf16"
    tensors = weight_dtypes(model, policy)
    image_tokens, text_tokens = tokens_for(req.width, req.height, req.text_tokens)
    eff_batch = req.batch * (2 if req.cfg else 1)
    unmerged = lora is not None and req.mode == "unmerged"
    points = activation_points(
        model.shape,
        image_tokens,
        text_tokens,
        eff_batch,
        lora_targets=lora.targets if unmerged else (),
        weight_dtype={n: d for n, (_, d) in tensors.items()},
    )
    at = max(points, key=points.get) if points else "-"
    merge = merge_temporaries(tensors, lora, req.tile_bytes) if lora is not None else None
    card, source = _card(req)
    plan = Plan(
        request=req,
        model=model.label,
        params=sum(math.prod(d) for d, _ in model.tensors.values()),
        weights=weights_by_dtype(tensors),
        lora_label=lora.label if lora else None,
        lora_params=lora.params if lora else 0,
        lora_resident_bytes=lora.params * UNMERGED_BYTES_PER_PARAM if unmerged else 0,
        activation_bytes=points.get(at, 0),
        activation_at=at,
        activation_points=points,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        effective_batch=eff_batch,
        merge=merge,
        encoders=encoder_bytes(req, model.shape),
        card_bytes=card,
        card_source=source,
        notes=[*model.notes, *(lora.notes if lora else [])],
    )
    plan.policy = policy or "as stored"
    if merge is not None and merge["full_layer_key"] in tensors:
        plan.merge_shape = tensors[str(merge["full_layer_key"])][0]
    return plan


def _changes(
    req: PlanRequest, shape: FluxShape, has_lora: bool, stored_policy: str
) -> list[tuple[str, dict[str, object]]]:
    """Candidate changes, cheapest first."""
    out: list[tuple[str, dict[str, object]]] = []
    if has_lora and req.mode == "unmerged":
        out.append(("merge the LoRA", {"mode": "merged"}))
    current = req.dtype or stored_policy
    if not current.startswith("fp8"):
        out.append(("fp8 weights (fp8-quality: modulation stays bf16)", {"dtype": "fp8-quality"}))
        out.append(("fp8 weights (fp8-default)", {"dtype": "fp8-default"}))
    elif current == "fp8-quality":
        out.append(("fp8 weights (fp8-default)", {"dtype": "fp8-default"}))
    encoder = text_encoder_for(shape.context_dim)
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


def _suggest(plan: Plan, model: ModelInfo, lora: LoRAInfo | None) -> None:
    req = plan.request
    if plan.fits is not False:
        return
    linears = [d for n, (_, d) in model.tensors.items() if is_block_linear(n)]
    stored = "fp8" if linears and all(d.itemsize == 1 for d in linears) else "bf16"
    candidates = _changes(req, model.shape, lora is not None, stored)

    def attempt(chosen: list[tuple[str, dict[str, object]]]) -> Plan:
        kw: dict[str, object] = {}
        for _, change in chosen:
            kw.update(change)
        return _evaluate(dataclasses.replace(req, **kw), model, lora)

    for candidate in candidates:  # one change alone, cheapest first
        trial = attempt([candidate])
        if trial.fits:
            plan.suggestion, plan.suggestion_peak_bytes, plan.suggestion_fits = [candidate[0]], trial.peak_bytes, True
            return
    chosen: list[tuple[str, dict[str, object]]] = []
    trial = plan
    for candidate in candidates:  # accumulate in order (keeping what lowers the peak) until it fits
        keys = set(candidate[1])
        option = [c for c in chosen if not keys & set(c[1])] + [candidate]  # a later fp8/encoder/batch step replaces
        better = attempt(option)
        if better.peak_bytes < trial.peak_bytes:
            chosen, trial = option, better
        if trial.fits:
            break
    if trial.fits:
        for candidate in reversed(list(chosen)):  # drop the dearest changes that are not needed
            rest = [c for c in chosen if c is not candidate]
            if rest and attempt(rest).fits:
                chosen = rest
        trial = attempt(chosen)
    plan.suggestion = [name for name, _ in chosen]
    plan.suggestion_peak_bytes = trial.peak_bytes
    plan.suggestion_fits = bool(trial.fits)


def plan(req: PlanRequest | None = None, **kw) -> Plan:
    """Plan a sampling run; `plan(model="flux-dev", lora_rank=32, card_gib=24)` or `plan(PlanRequest(...))`."""
    req = dataclasses.replace(req, **kw) if req is not None else PlanRequest(**kw)
    if isinstance(req.loras, (str, Path)):
        req = dataclasses.replace(req, loras=(str(req.loras),))
    else:
        req = dataclasses.replace(req, loras=tuple(str(p) for p in req.loras))
    check_request(req)
    model = read_model(req.model)
    lora = read_loras(req, model.shape)
    result = _evaluate(req, model, lora)
    if not model.is_preset and req.dtype is None:
        result.notes.append("weights counted as stored in the file; pass a dtype to plan another storage")
    _suggest(result, model, lora)
    return result
