"""One request evaluated: every figure of the run and the card it is compared with."""

from __future__ import annotations

import math

import torch

from ..formats import UNMERGED_BYTES_PER_PARAM
from ..units import GIB
from .activations import activation_points, tokens_for
from .inputs import LoRAInfo, ModelInfo, PlanRequest
from .memory import encoder_bytes, merge_temporaries, weight_dtypes, weights_by_dtype
from .result import Plan


def _card(req: PlanRequest) -> tuple[int | None, str]:
    if req.card_gib is not None:
        return int(req.card_gib * GIB), "given"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"cuda:{torch.cuda.current_device()} {props.name}"
    return None, "none"


def evaluate(req: PlanRequest, model: ModelInfo, lora: LoRAInfo | None) -> Plan:
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
