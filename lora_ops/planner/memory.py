"""Bytes of each part of a sampling run: weights under a dtype policy, merge temporaries, encoders."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from .. import fp8
from ..errors import LoRAOpsError
from ..flux import FluxShape
from ..rows import tile_rows_for, working_bytes
from ..transition import rollback_bytes
from ..units import GIB
from .companions import CLIP_L_WIDTH, clip_l_text_params, text_encoder_for, vae_params
from .inputs import WEIGHT_POLICIES, LoRAInfo, ModelInfo, PlanRequest

#: CUDA context, cuBLAS/cuDNN workspaces and allocator slack that a card's total never offers.
CUDA_RESERVE_BYTES = GIB // 2

_FP8 = torch.float8_e4m3fn
_DTYPE_OF_POLICY = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": _FP8}


def _numel(dims: Iterable[int]) -> int:
    return math.prod(dims)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_label(dtype: torch.dtype) -> str:
    return {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float8_e4m3fn: "fp8_e4m3fn",
        torch.float8_e5m2: "fp8_e5m2",
    }.get(dtype, str(dtype).removeprefix("torch."))


def fp8_policy_dtype(name: str, policy: str, dims: tuple[int, ...] | None = None) -> torch.dtype:
    """Storage dtype of Flux tensor `name` under a weight policy (see WEIGHT_POLICIES)."""
    if policy in _DTYPE_OF_POLICY:
        return _DTYPE_OF_POLICY[policy]
    if policy in WEIGHT_POLICIES:
        return _FP8 if fp8.get_policy(policy.removeprefix("fp8-")).selects(name, dims) else torch.bfloat16
    raise LoRAOpsError(f"unknown weight dtype {policy!r}; choose one of {', '.join(WEIGHT_POLICIES)}")


def weight_dtypes(info: ModelInfo, policy: str | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every resident tensor with its dtype under `policy` (None: as stored)."""
    if policy is None:
        return {**info.tensors, **info.extra}
    out = {n: (dims, fp8_policy_dtype(n, policy, dims)) for n, (dims, _) in info.tensors.items()}
    if policy.startswith("fp8-"):  # lora_ops.fp8 layout: a 0-dim fp32 scale per fp8 weight + the marker
        for n, (_, dtype) in list(out.items()):
            if dtype == _FP8:
                out[n.removesuffix(".weight") + fp8.SCALE_SUFFIX] = ((), torch.float32)
        out[fp8.MARKER] = ((2,), _FP8)
    return out


def weights_by_dtype(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, tuple[int, int]]:
    """dtype label -> (elements, bytes)."""
    out: dict[str, tuple[int, int]] = {}
    for dims, dtype in tensors.values():
        n = _numel(dims)
        label = _dtype_label(dtype)
        count, size = out.get(label, (0, 0))
        out[label] = (count + n, size + n * _itemsize(dtype))
    return out


def merge_temporaries(
    shape_of: Mapping[str, tuple[tuple[int, ...], torch.dtype]], lora: LoRAInfo, tile_bytes: int
) -> dict[str, object]:
    """Peak merge transients on the compute device: this package's tiles vs a full-layer fp32 merge."""
    tile = full = full_comfy = factors_max = reserve = 0
    tile_key = full_key = ""
    for target, factor_elems in lora.targets.items():
        if target not in shape_of:
            continue
        dims, _ = shape_of[target]
        rows = dims[0]
        cols = _numel(dims[1:]) if len(dims) > 1 else 1
        factors = factor_elems * 4  # the adapters in fp32 on the compute device
        factors_max = max(factors_max, factors)
        tile_rows = min(rows, tile_rows_for(cols, tile_bytes))
        this_tile = working_bytes(tile_rows, cols, 1)  # what MergeReport.peak_tile_bytes reports
        if this_tile > tile:
            tile, tile_key = this_tile, target
        reserve = max(reserve, rollback_bytes(cols, factor_elems, 1))
        dense = 2 * rows * cols * 4 + factors  # fp32 copy of W + dense fp32 delta
        if dense > full:
            full, full_key = dense, target
            full_comfy = 3 * rows * cols * 4 + factors  # ComfyUI also makes (strength*alpha)*diff in fp32
    # The engine copies one weight's adapters to the compute device at a time (transition.py KeyJob), and holds
    # a rollback reserve for the whole call (transition.py RollbackReserve).
    ours = tile + factors_max + reserve
    return {
        "ours_bytes": ours,
        "tile_bytes": tile,
        "tile_key": tile_key,
        "factors_bytes": factors_max,
        "reserve_bytes": reserve,
        "full_layer_bytes": full,
        "full_layer_key": full_key,
        "full_layer_comfy_bytes": full_comfy,
        "tile_budget_bytes": tile_bytes,
    }


def encoder_bytes(req: PlanRequest, shape: FluxShape) -> dict[str, int]:
    """The companions that stay on the GPU while sampling: the family's text encoder(s) and its VAE."""
    out = {}
    encoder = text_encoder_for(shape.context_dim)
    if encoder is not None and req.text_encoder == "bf16":
        out[f"{encoder.name} bf16"] = encoder.bytes("bf16")
    elif encoder is not None and req.text_encoder == "fp8":
        out[f"{encoder.name} fp8 (embedding, norms bf16)"] = encoder.bytes("fp8")
    if shape.vec_dim == CLIP_L_WIDTH and req.clip == "bf16":
        out["CLIP-L bf16"] = clip_l_text_params() * 2
    if req.vae == "bf16":
        out["VAE bf16"] = vae_params(shape.in_channels) * 2
    return out
