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
    VARIANTS,
    FluxShape,
    describe,
    flux_weight_shapes,
    is_block_linear,
    shape_from_state_dict,
    strip_model_prefix,
)
from ..formats import UNMERGED_BYTES_PER_PARAM
from ..rows import DEFAULT_TILE_BYTES

#: Named models (lora_ops.flux.VARIANTS), and the names this planner used before the Flux.2 family.
PRESETS: dict[str, FluxShape] = {**VARIANTS, "flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}

#: Weight dtype policies. "fp8" is kohya's `model.to(fp8)` (every tensor, no scales); "fp8-<name>" is a
#: lora_ops.fp8 policy (scaled fp8, one fp32 scale per fp8 weight): fp8-default = the block Linear
#: weights in fp8, everything else bf16; fp8-quality = also the modulation Linears bf16.
WEIGHT_POLICIES = ("bf16", "fp16", "fp32", "fp8", *(f"fp8-{name}" for name in fp8.PRESETS))
TEXT_ENCODER_CHOICES = ("bf16", "fp8", "offload")
RESIDENT_CHOICES = ("bf16", "offload")
MODES = ("unmerged", "merged")


def kohya_lora_params(shape: FluxShape, rank: int) -> int:
    """Parameters of a kohya LoRA of `rank` on every block Linear (the 304 default modules of Flux-dev)."""
    return rank * sum(sum(dims) for name, dims in flux_weight_shapes(shape).items() if is_block_linear(name))


@dataclass(frozen=True)
class PlanRequest:
    """What to plan. `model` is a preset name (PRESETS: flux1-dev, flux2-dev, chroma, ...) or a checkpoint path."""

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

    @property
    def description(self) -> str:
        """Family, named variants, blocks and width, in a user's words."""
        return describe(self.shape)


@dataclass
class LoRAInfo:
    label: str
    params: int
    targets: dict[str, int]  # target weight -> factor elements on it
    notes: list[str] = field(default_factory=list)
    files: list = field(default_factory=list)  # (path, LoRAFile) as loaded, for the resize arithmetic
    synthetic_rank: int | None = None  # PlanRequest.lora_rank
    max_rank: int = 0

    def params_at_rank(self, shape: FluxShape, rank: int) -> int:
        """Parameters after resizing every layer above `rank` down to it (lora_ops.resize)."""
        from ..resize import unmerged_saving

        params = self.params
        if self.synthetic_rank is not None and self.synthetic_rank > rank:
            params -= kohya_lora_params(shape, self.synthetic_rank) - kohya_lora_params(shape, rank)
        for _, lora in self.files:
            params -= unmerged_saving(lora, rank) // UNMERGED_BYTES_PER_PARAM
        return params


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
        return ModelInfo(model, shape, tensors, notes=_variant_notes(model))
    path = Path(model)
    if not path.exists() and not model.endswith(".safetensors"):
        raise LoRAOpsError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    from ..safetensors_io import SafetensorsFile

    st = SafetensorsFile(path)  # raises UnsafeFileError (a LoRAOpsError) on unreadable/bad files
    header = {}
    for key in st.keys():
        prefix, name = strip_model_prefix(key)
        header[name] = (prefix, st.shape(key), st.dtype(key))
    try:
        shape = shape_from_state_dict({name: dims for name, (_, dims, _) in header.items()})
    except ValueError as e:
        raise ModelMismatchError(
            f"{path}: {e}. Give the diffusion model file (e.g. flux1-dev.safetensors, flux2-dev.safetensors)."
        ) from None
    info = model_from_tensors(str(path), shape, header)
    info.notes.insert(0, info.description)
    return info


def _variant_notes(name: str) -> list[str]:
    if name in ("flux1-kontext", "flux1-krea"):
        return [f"{name} has Flux.1 dev's architecture; its figures are flux1-dev's"]
    return []


def model_from_tensors(
    label: str, shape: FluxShape, header: dict[str, tuple[str, tuple[int, ...], torch.dtype]]
) -> ModelInfo:
    """A model's resident tensors from (BFL name -> (prefix, shape, stored dtype)): its weights by name, the
    tensors that travel with them (fp8 scales, markers), and a note for what is outside the diffusion model."""
    expected = flux_weight_shapes(shape)
    roots = {name.split(".", 1)[0] for name in expected} | {"scaled_fp8"}
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    extra: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    ignored = 0
    for name, (prefix, dims, dtype) in header.items():
        name = _bfl_name(name, expected)
        if name in expected:
            tensors[name] = (dims, dtype)
        elif prefix or name.split(".", 1)[0] in roots:
            extra[name] = (dims, dtype)  # scale_weight, weight_scale, comfy_quant, ...
        else:
            ignored += 1
    notes = []
    if ignored:
        notes.append(f"{ignored} tensors outside the diffusion model (VAE / text encoders) are not counted here")
    missing = [n for n in expected if n not in tensors and is_block_linear(n)]
    if missing:
        notes.append(f"{len(missing)} block Linear weights of this shape are not in the model")
    return ModelInfo(label, shape, tensors, extra, notes, is_preset=False)


def _bfl_name(name: str, expected: dict[str, tuple[int, ...]]) -> str:
    """ComfyUI loads (and saves) the RMSNorm scales as `.weight`; BFL files name them `.scale`."""
    if name not in expected and name.endswith(".weight"):
        scale = name.removesuffix(".weight") + ".scale"
        if scale in expected:
            return scale
    return name


def read_loras(req: PlanRequest, shape: FluxShape) -> LoRAInfo | None:
    if not req.loras and req.lora_rank is None:
        return None
    from .. import formats

    shapes = flux_weight_shapes(shape)
    params = 0
    targets: dict[str, int] = {}
    labels, notes, files = [], [], []
    if req.lora_rank is not None:
        for name, dims in shapes.items():
            if is_block_linear(name):
                targets[name] = targets.get(name, 0) + req.lora_rank * sum(dims)
        params += kohya_lora_params(shape, req.lora_rank)
        labels.append(
            f"kohya rank {req.lora_rank} on {sum(1 for n in shapes if is_block_linear(n))}"
            " block Linears"
        )
    for path in req.loras:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora = formats.load_lora(path)
        formats.check_fits(lora, shapes.get, f"the planned model ({describe(shape)})")
        files.append((path, lora))
        notes.extend(f"{path}: {w.message}" for w in caught)
        info = formats.describe(lora)
        params += int(info["params"])
        for target, adapters in lora.targets.items():
            targets[target] = targets.get(target, 0) + sum(t.numel() for a in adapters for t in a.factors().values())
        ranks = ",".join(str(r) for r in sorted(lora.ranks)) or "-"
        labels.append(f"{Path(path).name} ({info['format']}, rank {ranks}, {len(lora.targets)} weights)")
        if info["text_encoder_keys"]:
            notes.append(f"{path}: {info['text_encoder_keys']} text-encoder keys are not counted")
    ranks = [r for _, lora in files for r in lora.ranks] + ([req.lora_rank] if req.lora_rank else [])
    return LoRAInfo(" + ".join(labels), params, targets, notes, files, req.lora_rank, max(ranks, default=0))
