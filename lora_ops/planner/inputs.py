"""What to plan: the request, its checks, and the model and LoRA facts read for it (headers only)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import fp8
from ..errors import LoRAOpsError, ModelMismatchError
from ..flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    TOP_LEVEL_MODULES,
    FluxShape,
    flux_weight_shapes,
    is_block_linear,
    shape_from_state_dict,
    strip_model_prefix,
)
from ..merge import DEFAULT_TILE_BYTES

PRESETS: dict[str, FluxShape] = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}

#: Weight dtype policies. "fp8" is kohya's `model.to(fp8)` (every tensor, no scales); "fp8-<name>" is a
#: lora_ops.fp8 policy (scaled fp8, one fp32 scale per fp8 weight): fp8-default = the block Linear
#: weights in fp8, everything else bf16; fp8-quality = also the modulation Linears bf16.
WEIGHT_POLICIES = ("bf16", "fp16", "fp32", "fp8", *(f"fp8-{name}" for name in fp8.PRESETS))
TEXT_ENCODER_CHOICES = ("bf16", "fp8", "offload")
RESIDENT_CHOICES = ("bf16", "offload")
MODES = ("unmerged", "merged")

_TOP_LEVEL = tuple(f"{m}." for m in TOP_LEVEL_MODULES)


def kohya_lora_params(shape: FluxShape, rank: int) -> int:
    """Parameters of a kohya LoRA of `rank` on every block Linear (the 304 default modules of Flux-dev)."""
    return rank * sum(sum(dims) for name, dims in flux_weight_shapes(shape).items() if is_block_linear(name))


@dataclass(frozen=True)
class PlanRequest:
    """What to plan. `model` is a preset name (flux-dev, flux-schnell) or a checkpoint path."""

    model: str = "flux-dev"
    dtype: str | None = None  # a WEIGHT_POLICIES entry; None: bf16 for a preset, as stored for a file
    loras: tuple[str, ...] = ()  # LoRA files
    lora_rank: int | None = None  # or: a kohya LoRA of this rank on every block Linear
    mode: str = "unmerged"  # unmerged (kohya runtime LoRA) | merged
    width: int = 1024
    height: int = 1024
    batch: int = 1
    cfg: bool = False  # true CFG with a negative prompt doubles the batch
    text_encoder: str = "bf16"  # the family's big text encoder (T5-XXL, Mistral, Qwen3): bf16 | fp8 | offload
    clip: str = "bf16"  # bf16 | offload
    vae: str = "bf16"  # bf16 | offload
    card_gib: float | None = None  # None: the current CUDA device, if there is one
    text_tokens: int = 512
    tile_bytes: int = DEFAULT_TILE_BYTES


@dataclass
class ModelInfo:
    label: str
    shape: FluxShape
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # Flux name -> (shape, stored dtype)
    extra: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)  # scales etc.
    notes: list[str] = field(default_factory=list)
    is_preset: bool = True


@dataclass
class LoRAInfo:
    label: str
    params: int
    targets: dict[str, int]  # target weight -> factor elements on it
    notes: list[str] = field(default_factory=list)


def check_request(req: PlanRequest) -> None:
    def positive_int(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LoRAOpsError(f"{name} must be a positive whole number, got {value!r}")

    positive_int("width", req.width)
    positive_int("height", req.height)
    positive_int("batch", req.batch)
    positive_int("tile bytes", req.tile_bytes)
    if isinstance(req.text_tokens, bool) or not isinstance(req.text_tokens, int) or req.text_tokens < 0:
        raise LoRAOpsError(f"text tokens must be 0 or more, got {req.text_tokens!r}")
    if req.lora_rank is not None:
        positive_int("LoRA rank", req.lora_rank)
    if req.mode not in MODES:
        raise LoRAOpsError(f"unknown mode {req.mode!r}; choose unmerged or merged")
    if req.dtype is not None and req.dtype not in WEIGHT_POLICIES:
        raise LoRAOpsError(f"unknown weight dtype {req.dtype!r}; choose one of {', '.join(WEIGHT_POLICIES)}")
    if req.text_encoder not in TEXT_ENCODER_CHOICES:
        choices = ", ".join(TEXT_ENCODER_CHOICES)
        raise LoRAOpsError(f"unknown text-encoder setting {req.text_encoder!r}; choose one of {choices}")
    for name, value in (("CLIP", req.clip), ("VAE", req.vae)):
        if value not in RESIDENT_CHOICES:
            raise LoRAOpsError(f"unknown {name} setting {value!r}; choose one of {', '.join(RESIDENT_CHOICES)}")
    if req.card_gib is not None and not (
        isinstance(req.card_gib, (int, float)) and math.isfinite(req.card_gib) and req.card_gib > 0
    ):
        raise LoRAOpsError(f"card size must be a positive number of GiB, got {req.card_gib!r}")


def read_model(model: str) -> ModelInfo:
    """A preset's shapes, or a checkpoint's header (shapes and dtypes; no tensor data is read)."""
    if model in PRESETS:
        shape = PRESETS[model]
        tensors = {n: (d, torch.bfloat16) for n, d in flux_weight_shapes(shape).items()}
        return ModelInfo(model, shape, tensors)
    path = Path(model)
    if not path.exists() and not model.endswith(".safetensors"):
        raise LoRAOpsError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    from ..safetensors_io import SafetensorsFile

    st = SafetensorsFile(path)  # raises UnsafeFileError (a LoRAOpsError) on unreadable/bad files
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    extra: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    ignored = 0
    for key in st.keys():
        prefix, name = strip_model_prefix(key)
        dims, dtype = st.shape(key), st.dtype(key)
        if name.startswith(_TOP_LEVEL):
            tensors[name] = (dims, dtype)
        elif prefix or name in ("scaled_fp8",):
            extra[name] = (dims, dtype)
        else:
            ignored += 1
    try:
        shape = shape_from_state_dict({k: v[0] for k, v in tensors.items()})
    except ValueError as e:
        raise ModelMismatchError(
            f"{path}: {e}. Give the Flux diffusion model file (e.g. flux1-dev.safetensors)."
        ) from None
    expected = flux_weight_shapes(shape)
    known = {n: v for n, v in tensors.items() if n in expected}
    extra.update({n: v for n, v in tensors.items() if n not in expected})  # scale_weight, comfy_quant, ...
    notes = []
    if ignored:
        notes.append(f"{ignored} tensors outside the diffusion model (VAE / text encoders) are not counted here")
    missing = [n for n in expected if n not in known and is_block_linear(n)]
    if missing:
        notes.append(f"{len(missing)} block Linear weights of this shape are not in the file")
    return ModelInfo(str(path), shape, known, extra, notes, is_preset=False)


def read_loras(req: PlanRequest, shape: FluxShape) -> LoRAInfo | None:
    if not req.loras and req.lora_rank is None:
        return None
    from ..formats import describe, load_lora

    params = 0
    targets: dict[str, int] = {}
    labels, notes = [], []
    if req.lora_rank is not None:
        for name, dims in flux_weight_shapes(shape).items():
            if is_block_linear(name):
                targets[name] = targets.get(name, 0) + req.lora_rank * sum(dims)
        params += kohya_lora_params(shape, req.lora_rank)
        labels.append(
            f"kohya rank {req.lora_rank} on {sum(1 for n in flux_weight_shapes(shape) if is_block_linear(n))}"
            " block Linears"
        )
    for path in req.loras:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora = load_lora(path)
        notes.extend(f"{path}: {w.message}" for w in caught)
        info = describe(lora)
        params += int(info["params"])
        for target, adapters in lora.targets.items():
            targets[target] = targets.get(target, 0) + sum(t.numel() for a in adapters for t in a.factors().values())
        ranks = ",".join(str(r) for r in sorted(lora.ranks)) or "-"
        labels.append(f"{Path(path).name} ({info['format']}, rank {ranks}, {len(lora.targets)} weights)")
        if info["text_encoder_keys"]:
            notes.append(f"{path}: {info['text_encoder_keys']} text-encoder keys are not counted")
    return LoRAInfo(" + ".join(labels), params, targets, notes)
