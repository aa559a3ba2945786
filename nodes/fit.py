"""'Will this fit' for the VRAM Report: the pack's planner run on the Flux model ComfyUI holds, as loaded.

The report's other half says what is used now; this half says what sampling at a resolution will need: the
diffusion model's weights as they are stored now (merged LoRAs, fp8 layers and scales included), the
activations of one forward at that size, against the card's total. The text encoder and VAE are counted as
unloaded while sampling (ComfyUI frees them when the diffusion model needs the room).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import comfy.model_management
import torch

from ..lora_ops import GIB, planner, shape_from_state_dict
from .quantized import is_quantized


@dataclass(frozen=True)
class FitRequest:
    width: int = 1024
    height: int = 1024
    batch: int = 1
    cfg: bool = False


def _stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    """ComfyUI's QuantizedTensor reports its logical dtype; its payload holds the stored bits."""
    return tensor._qdata.dtype if is_quantized(tensor) else tensor.dtype


def _header(patcher) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]] | None:
    diffusion_model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, torch.nn.Module):
        return None
    tensors = itertools.chain(diffusion_model.named_parameters(), diffusion_model.named_buffers())
    return {name: ("", tuple(t.shape), _stored_dtype(t)) for name, t in tensors}


def flux_model(passthrough) -> object | None:
    """The MODEL to plan: the passthrough if it is a Flux-family model, else the first one ComfyUI has loaded."""
    loaded = [entry.model for entry in list(comfy.model_management.current_loaded_models)]
    for patcher in (passthrough, *loaded):
        header = _header(patcher)
        if header is not None and _shape(header) is not None:
            return patcher
    return None


def _shape(header):
    try:
        return shape_from_state_dict({name: dims for name, (_, dims, _) in header.items()})
    except ValueError:
        return None


def plan_fit(patcher, request: FitRequest, card_bytes: int | None) -> planner.Plan:
    """The planner's verdict for sampling `patcher`'s diffusion model as loaded, on a card of `card_bytes`."""
    header = _header(patcher)
    shape = _shape(header)
    info = planner.model_from_tensors(type(patcher.model).__name__, shape, header)
    info.label = f"{info.label}: {info.description}"
    plan_request = planner.PlanRequest(
        model=info.label,
        width=request.width,
        height=request.height,
        batch=request.batch,
        cfg=request.cfg,
        mode="merged",
        text_encoder="offload",
        clip="offload",
        vae="offload",
        card_gib=None if card_bytes is None else card_bytes / GIB,
    )
    return planner.plan_model(plan_request, info)


def fit_lines(passthrough, request: FitRequest, card_bytes: int | None) -> list[str]:
    """The report's 'Will this fit' section."""
    head = (
        f"Will this fit? Sampling {request.width}x{request.height}, batch {request.batch}, "
        f"CFG {'on' if request.cfg else 'off'} (text encoder and VAE unloaded while sampling):"
    )
    patcher = flux_model(passthrough)
    if patcher is None:
        return [head, "  no Flux-family model loaded or connected to 'passthrough': nothing to plan"]
    plan = plan_fit(patcher, request, card_bytes)
    weights = ", ".join(f"{label} {size / GIB:.2f} GiB" for label, (_, size) in sorted(plan.weights.items()))
    lines = [
        head,
        f"  {plan.model}",
        f"  weights as loaded {plan.weight_bytes / GIB:.2f} GiB ({weights}) + activations "
        f"{plan.activation_bytes / GIB:.2f} GiB = sampling peak {plan.peak_bytes / GIB:.2f} GiB",
    ]
    if card_bytes is None:
        return [*lines, "  no GPU: ComfyUI samples on the CPU from system RAM"]
    return [*lines, *(f"  {line}" for line in plan.verdict_lines())]
