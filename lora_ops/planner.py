"""Will it fit? A GPU memory plan for Flux + LoRA sampling, from architecture, not from constants.

`plan(PlanRequest(...))` adds up, for one sampling run:

* the diffusion model's weights by dtype (a preset's shapes come from `lora_ops.flux`, a checkpoint's
  from its safetensors header; no tensor is read);
* the LoRA bytes resident on the GPU when it is applied unmerged the way kohya's
  flux_minimal_inference does (fp32 factors + the bf16 copy autocast caches = 6 B/param), 0 merged;
* the peak of the merge temporaries when merged: this package's tile vs a full-layer fp32 merge;
* activations of one forward at the resolution / batch / CFG (model below);
* text encoders (T5-XXL, CLIP-L) and the VAE when they stay on the GPU during sampling;

and compares the peak with the card (usable = total - 0.5 GiB for the CUDA context and
workspaces). When it does not fit it tries, in this order, the cheap changes: merge the LoRA, fp8
weights, offload T5, fp8 T5, no CFG / smaller batch.

Activation model (the BFL reference forward, which kohya's flux_models.py copies, in bf16 with a
fused attention kernel): with B = batch x (2 with CFG), T = (h/16)(w/16) + text tokens, H = hidden,
M = mlp hidden and U = B*T*H*2 bytes, the largest live set is inside a single block at RoPE:
the block input x and the modulated x_mod (2U), linear1's output ((3H+M)/H U = 7U), normed q, k
(2U) and RoPE's fp32 temporaries (q, k as fp32, the rotated q, and two products + their sum for
k: 6 x 2U = 12U), plus the text stream the caller holds (512/T U) and the fp32 RoPE table: about
23.3U = 0.61 GiB at 1024x1024, batch 1. The planner evaluates every such point of both block kinds
(linear1 with an unmerged LoRA's output-sized branch and an fp8 weight's bf16 upcast, the MLP,
linear2) and takes the largest. bench/gpu_suite.py checks it against torch.cuda.max_memory_allocated
on a GPU, and on a tiny shape against the live tensor bytes torch.profiler records on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fp8
from .errors import LoRAOpsError, ModelMismatchError
from .flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    FluxShape,
    flux_weight_shapes,
    is_block_linear,
    shape_from_state_dict,
    strip_model_prefix,
)
from .merge import DEFAULT_TILE_BYTES, tile_rows_for, working_bytes

GIB = 1 << 30
MIB = 1 << 20

PRESETS: dict[str, FluxShape] = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}

#: Weight dtype policies. "fp8" is kohya's `model.to(fp8)` (every tensor, no scales); "fp8-<name>" is a
#: lora_ops.fp8 policy (scaled fp8, one fp32 scale per fp8 weight): fp8-default = the block Linear
#: weights in fp8, everything else bf16; fp8-quality = also the modulation Linears bf16.
WEIGHT_POLICIES = ("bf16", "fp16", "fp32", "fp8", *(f"fp8-{name}" for name in fp8.PRESETS))
T5_CHOICES = ("bf16", "fp8", "offload")
RESIDENT_CHOICES = ("bf16", "offload")
MODES = ("unmerged", "merged")

#: CUDA context, cuBLAS/cuDNN workspaces and allocator slack that a card's total never offers.
CUDA_RESERVE_BYTES = GIB // 2
#: kohya's runtime LoRA: fp32 nn.Linear factors (4 B) + the bf16 copy autocast caches (2 B).
UNMERGED_BYTES_PER_PARAM = 6
#: Output-sized tensors an unmerged LoRA branch adds at its Linear (y += up(down(x))).
LORA_BRANCH_TRANSIENTS = 1
#: Flux packs 2x2 latent patches of an 8x-downsampling VAE: one token per 16x16 pixels.
PIXELS_PER_TOKEN_SIDE = 16

_FP8 = torch.float8_e4m3fn
_DTYPE_OF_POLICY = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": _FP8}
_TOP_LEVEL = ("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.", "double_blocks.", "single_blocks.",
              "final_layer.")


# ---------------------------------------------------------------------------------------------
# Architecture of the companions (parameter counts from their configs, not typed-in totals)
# ---------------------------------------------------------------------------------------------


def t5_xxl_encoder_params(vocab: int = 32128, d_model: int = 4096, d_ff: int = 10240, layers: int = 24,
                          heads: int = 64, d_kv: int = 64, buckets: int = 32) -> int:
    """T5 v1.1 XXL encoder (gated-GELU FF, no biases, relative position bias in layer 0)."""
    attention = 4 * d_model * heads * d_kv
    feed_forward = 3 * d_model * d_ff
    norms = 2 * d_model
    return vocab * d_model + layers * (attention + feed_forward + norms) + buckets * heads + d_model


def t5_xxl_bf16_resident_params(vocab: int = 32128, d_model: int = 4096, layers: int = 24) -> int:
    """Parameters kohya keeps in bf16 when T5 is stored in fp8: the embedding and the layer norms."""
    return vocab * d_model + (2 * layers + 1) * d_model


def clip_l_text_params(vocab: int = 49408, positions: int = 77, width: int = 768, layers: int = 12,
                       mlp: int = 3072) -> int:
    """CLIP ViT-L/14 text tower with its projection, as ComfyUI loads it."""
    per_layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return (vocab + positions) * width + layers * per_layer + 2 * width + width * width


def flux_ae_params(ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                   z_channels: int = 16, io_channels: int = 3) -> int:
    """The Flux autoencoder (encoder + decoder)."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def res(cin: int, cout: int) -> int:
        shortcut = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + shortcut

    def mid(c: int) -> int:
        return 2 * res(c, c) + 2 * c + 4 * conv(c, c, 1)

    n = conv(io_channels, ch, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n += res(block_in, ch * m)
            block_in = ch * m
        if i != len(ch_mult) - 1:
            n += conv(block_in, block_in, 3)
    n += mid(block_in) + 2 * block_in + conv(block_in, 2 * z_channels, 3)
    block_in = ch * ch_mult[-1]
    n += conv(z_channels, block_in, 3) + mid(block_in)
    for i in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n += res(block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            n += conv(block_in, block_in, 3)
    return n + 2 * block_in + conv(block_in, io_channels, 3)


def kohya_lora_params(shape: FluxShape, rank: int) -> int:
    """Parameters of a kohya LoRA of `rank` on every block Linear (the 304 default modules of Flux-dev)."""
    return rank * sum(sum(dims) for name, dims in flux_weight_shapes(shape).items() if is_block_linear(name))


def _numel(dims: Iterable[int]) -> int:
    return math.prod(dims)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8_e4m3fn",
            torch.float8_e5m2: "fp8_e5m2"}.get(dtype, str(dtype).removeprefix("torch."))


def fp8_policy_dtype(name: str, policy: str, dims: tuple[int, ...] | None = None) -> torch.dtype:
    """Storage dtype of Flux tensor `name` under a weight policy (see WEIGHT_POLICIES)."""
    if policy in _DTYPE_OF_POLICY:
        return _DTYPE_OF_POLICY[policy]
    if policy in WEIGHT_POLICIES:
        return _FP8 if fp8.get_policy(policy.removeprefix("fp8-")).selects(name, dims) else torch.bfloat16
    raise LoRAOpsError(f"unknown weight dtype {policy!r}; choose one of {', '.join(WEIGHT_POLICIES)}")


# ---------------------------------------------------------------------------------------------
# Request and inputs
# ---------------------------------------------------------------------------------------------


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
    t5: str = "bf16"  # bf16 | fp8 | offload
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


def _check_request(req: PlanRequest) -> None:
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
    if req.t5 not in T5_CHOICES:
        raise LoRAOpsError(f"unknown T5 setting {req.t5!r}; choose one of {', '.join(T5_CHOICES)}")
    for name, value in (("CLIP", req.clip), ("VAE", req.vae)):
        if value not in RESIDENT_CHOICES:
            raise LoRAOpsError(f"unknown {name} setting {value!r}; choose one of {', '.join(RESIDENT_CHOICES)}")
    if req.card_gib is not None and not (isinstance(req.card_gib, (int, float)) and math.isfinite(req.card_gib)
                                         and req.card_gib > 0):
        raise LoRAOpsError(f"card size must be a positive number of GiB, got {req.card_gib!r}")


def read_model(model: str) -> ModelInfo:
    """A preset's shapes, or a checkpoint's header (shapes and dtypes; no tensor data is read)."""
    if model in PRESETS:
        shape = PRESETS[model]
        tensors = {n: (d, torch.bfloat16) for n, d in flux_weight_shapes(shape).items()}
        return ModelInfo(model, shape, tensors)
    path = Path(model)
    if not path.exists() and not model.endswith(".safetensors"):
        raise LoRAOpsError(
            f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    from .safetensors_io import SafetensorsFile

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
    from .formats import describe, load_lora

    params = 0
    targets: dict[str, int] = {}
    labels, notes = [], []
    if req.lora_rank is not None:
        for name, dims in flux_weight_shapes(shape).items():
            if is_block_linear(name):
                targets[name] = targets.get(name, 0) + req.lora_rank * sum(dims)
        params += kohya_lora_params(shape, req.lora_rank)
        labels.append(f"kohya rank {req.lora_rank} on {sum(1 for n in flux_weight_shapes(shape) if is_block_linear(n))}"
                      " block Linears")
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


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


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


def tokens_for(width: int, height: int, text_tokens: int) -> tuple[int, int]:
    side = PIXELS_PER_TOKEN_SIDE
    return math.ceil(height / side) * math.ceil(width / side), text_tokens


def activation_points(
    shape: FluxShape,
    image_tokens: int,
    text_tokens: int,
    batch: int,
    *,
    lora_targets: Iterable[str] = (),
    weight_dtype: Mapping[str, torch.dtype] | None = None,
) -> dict[str, int]:
    """Bytes live (beyond weights and resident LoRA) at each candidate peak of one Flux forward.

    Follows the BFL reference forward in bf16 (see the module docstring): a block's Python locals
    stay alive until it returns, RMSNorm and RoPE compute in fp32, attention is a fused kernel.
    `lora_targets`: weights with an unmerged LoRA branch (adds an output-sized tensor at the call);
    `weight_dtype`: a weight stored in fp8 is upcast to a bf16 copy for the call.
    """
    b, t, ti = batch, image_tokens + text_tokens, image_tokens
    h, m = shape.hidden, shape.mlp_hidden
    a, f = 2, 4  # bf16, fp32 bytes

    def tok(n: int, width: int, size: int = a) -> int:
        return b * n * width * size

    targets = set(lora_targets)
    dtypes = weight_dtype or {}

    def call_extra(template: str, rows_tokens: int, out_width: int, blocks: int) -> int:
        """Largest transient at the call of a Linear: LoRA branch output and fp8 -> bf16 weight copy."""
        worst = 0
        for i in range(blocks):
            name = template.format(i=i)
            extra = tok(rows_tokens, out_width) * LORA_BRANCH_TRANSIENTS if name in targets else 0
            if dtypes.get(name, torch.bfloat16).itemsize == 1:
                extra += _numel(flux_weight_shapes_cached(shape)[name]) * a
            worst = max(worst, extra)
        return worst

    # pe: RoPE table [B, 1, T, head_dim/2, 2, 2] fp32, held by the caller through all blocks.
    pe = b * t * shape.head_dim // 2 * 4 * f
    points: dict[str, int] = {}
    if shape.depth:
        inputs = tok(t, h)  # img + txt, held by the caller during the call
        attn_state = inputs + tok(t, h) + tok(t, 3 * h) + 2 * tok(t, h) + 3 * tok(t, h)  # mod, qkv, q/k, cat qkv
        qkv_call = call_extra("double_blocks.{i}.img_attn.qkv.weight", ti, 3 * h, shape.depth)
        points["double block: img qkv Linear"] = pe + inputs + tok(ti, h) + tok(ti, 3 * h) + qkv_call
        points["double block: RoPE"] = pe + attn_state + 6 * tok(t, h, f)
        mlp_state = attn_state + tok(t, h) + 2 * tok(ti, h)  # attention out, new img, MLP input
        mlp0 = call_extra("double_blocks.{i}.img_mlp.0.weight", ti, m, shape.depth)
        points["double block: img MLP"] = pe + mlp_state + max(tok(ti, m) + mlp0, 2 * tok(ti, m))
        mlp2 = call_extra("double_blocks.{i}.img_mlp.2.weight", ti, h, shape.depth)
        points["double block: img MLP out"] = pe + mlp_state + tok(ti, m) + tok(ti, h) + mlp2
    if shape.depth_single:
        held = tok(t, h) + tok(text_tokens, h) + tok(t, h)  # x, caller's txt, x_mod
        lin1 = tok(t, 3 * h + m)
        l1 = call_extra("single_blocks.{i}.linear1.weight", t, 3 * h + m, shape.depth_single)
        points["single block: linear1"] = pe + held + lin1 + l1
        points["single block: RoPE"] = pe + held + lin1 + 2 * tok(t, h) + 6 * tok(t, h, f)
        attn_out = held + lin1 + 2 * tok(t, h) + tok(t, h)
        points["single block: GELU + cat"] = pe + attn_out + tok(t, m) + tok(t, h + m)
        l2 = call_extra("single_blocks.{i}.linear2.weight", t, h, shape.depth_single)
        points["single block: linear2"] = pe + attn_out + tok(t, h + m) + tok(t, h) + l2
    return points


_SHAPES_CACHE: dict[FluxShape, dict[str, tuple[int, ...]]] = {}


def flux_weight_shapes_cached(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    if shape not in _SHAPES_CACHE:
        _SHAPES_CACHE[shape] = flux_weight_shapes(shape)
    return _SHAPES_CACHE[shape]


ACTIVATION_FORMULA = (
    "peak over the forward's live sets (BFL reference forward, bf16, fused attention); the usual maximum is "
    "single-block RoPE: U*(2 + (3H+M)/H + 2 + 12) + B*txt*H*2 + RoPE table, U = B*T*H*2 bytes, "
    "B = batch x (2 with CFG), T = (h/16)(w/16) + text tokens; checked against a GPU by bench/gpu_suite.py "
    "when one is available"
)




def merge_temporaries(shape_of: Mapping[str, tuple[tuple[int, ...], torch.dtype]], lora: LoRAInfo,
                      tile_bytes: int) -> dict[str, object]:
    """Peak merge transients on the compute device: this package's tiles vs a full-layer fp32 merge."""
    tile = full = full_comfy = factors_max = 0
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
        dense = 2 * rows * cols * 4 + factors  # fp32 copy of W + dense fp32 delta
        if dense > full:
            full, full_key = dense, target
            full_comfy = 3 * rows * cols * 4 + factors  # ComfyUI also makes (strength*alpha)*diff in fp32
    # The engine copies one weight's adapters to the compute device at a time (merge.py _KeyJob).
    ours = tile + factors_max
    return {"ours_bytes": ours, "tile_bytes": tile, "tile_key": tile_key,
            "factors_bytes": factors_max,
            "full_layer_bytes": full, "full_layer_key": full_key, "full_layer_comfy_bytes": full_comfy,
            "tile_budget_bytes": tile_bytes}


def encoder_bytes(req: PlanRequest) -> dict[str, int]:
    out = {}
    if req.t5 == "bf16":
        out["T5-XXL bf16"] = t5_xxl_encoder_params() * 2
    elif req.t5 == "fp8":
        keep = t5_xxl_bf16_resident_params()
        out["T5-XXL fp8 (embedding, norms bf16)"] = (t5_xxl_encoder_params() - keep) + keep * 2
    if req.clip == "bf16":
        out["CLIP-L bf16"] = clip_l_text_params() * 2
    if req.vae == "bf16":
        out["VAE bf16"] = flux_ae_params() * 2
    return out


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    request: PlanRequest
    model: str
    params: int
    weights: dict[str, tuple[int, int]]  # dtype -> (elements, bytes)
    lora_label: str | None
    lora_params: int
    lora_resident_bytes: int
    activation_bytes: int
    activation_at: str
    activation_points: dict[str, int]
    image_tokens: int
    text_tokens: int
    effective_batch: int
    merge: dict[str, object] | None
    encoders: dict[str, int]
    card_bytes: int | None
    card_source: str
    notes: list[str] = field(default_factory=list)
    suggestion: list[str] | None = None
    suggestion_peak_bytes: int | None = None
    suggestion_fits: bool | None = None
    merge_shape: tuple[int, ...] = ()
    policy: str = "bf16"

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.weights.values())

    @property
    def resident_bytes(self) -> int:
        return self.weight_bytes + sum(self.encoders.values())

    @property
    def sampling_bytes(self) -> int:
        return self.resident_bytes + self.lora_resident_bytes + self.activation_bytes

    @property
    def merge_peak_bytes(self) -> int:
        if self.merge is None or self.request.mode != "merged":
            return 0
        return self.resident_bytes + int(self.merge["ours_bytes"])

    @property
    def peak_bytes(self) -> int:
        return max(self.sampling_bytes, self.merge_peak_bytes)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.card_bytes is None else self.card_bytes - CUDA_RESERVE_BYTES

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.peak_bytes <= self.usable_bytes

    @property
    def verdict(self) -> str:
        return {True: "fits", False: "does not fit", None: "unknown (no card size)"}[self.fits]

    # --- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "request": dataclasses.asdict(self.request),
            "model": self.model,
            "params": self.params,
            "weights": {k: {"params": n, "bytes": b} for k, (n, b) in self.weights.items()},
            "weights_bytes": self.weight_bytes,
            "lora": None if self.lora_label is None else {
                "label": self.lora_label, "params": self.lora_params, "resident_bytes": self.lora_resident_bytes,
                "bytes_per_param_unmerged": UNMERGED_BYTES_PER_PARAM},
            "activations": {"bytes": self.activation_bytes, "at": self.activation_at, "points": self.activation_points,
                            "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                            "effective_batch": self.effective_batch, "formula": ACTIVATION_FORMULA},
            "merge_temporaries": self.merge,
            "encoders": self.encoders,
            "totals": {"resident_bytes": self.resident_bytes, "sampling_bytes": self.sampling_bytes,
                       "merge_peak_bytes": self.merge_peak_bytes, "peak_bytes": self.peak_bytes},
            "card": {"total_bytes": self.card_bytes, "usable_bytes": self.usable_bytes, "source": self.card_source,
                     "reserve_bytes": CUDA_RESERVE_BYTES},
            "verdict": self.verdict,
            "fits": self.fits,
            "suggestion": None if self.suggestion is None else {
                "changes": self.suggestion, "peak_bytes": self.suggestion_peak_bytes, "fits": self.suggestion_fits},
            "notes": self.notes,
        }

    def format_table(self) -> str:
        r = self.request
        rows: list[tuple[str, int | None]] = []
        for label, (n, b) in sorted(self.weights.items(), key=lambda kv: -kv[1][1]):
            rows.append((f"weights {label} ({n / 1e9:.3f} B params)", b))
        if self.lora_label is not None:
            if r.mode == "unmerged":
                rows.append((f"LoRA resident, unmerged ({self.lora_params / 1e6:.1f} M params x "
                             f"{UNMERGED_BYTES_PER_PARAM} B)", self.lora_resident_bytes))
            else:
                rows.append(("LoRA resident, merged (factors stay in system RAM)", 0))
        rows.append((f"activations (peak at {self.activation_at})", self.activation_bytes))
        for label, b in self.encoders.items():
            rows.append((label, b))
        width = max(len(label) for label, _ in rows) + 2
        lines = [
            f"Flux plan: {self.model} ({self.params:,} params), weights {self.policy}, "
            f"{r.width}x{r.height}, batch {r.batch}, CFG {'on' if r.cfg else 'off'} -> "
            f"{self.effective_batch} x {self.image_tokens + self.text_tokens} tokens "
            f"({self.image_tokens} image + {self.text_tokens} text)",
        ]
        if self.lora_label is not None:
            lines.append(f"LoRA: {self.lora_label}, {r.mode}")
        lines.append(f"{'':{width}}{'GiB':>9}")
        lines += [f"{label:{width}}{b / GIB:9.2f}" for label, b in rows]
        lines.append(f"{'sampling peak':{width}}{self.sampling_bytes / GIB:9.2f}")
        if self.merge is not None:
            m = self.merge
            lines.append(
                f"merge temporaries: lora_ops {int(m['ours_bytes']) / MIB:.0f} MiB (tile "
                f"{int(m['tile_bytes']) / MIB:.0f} MiB + fp32 LoRA factors {int(m['factors_bytes']) / MIB:.0f} MiB) "
                f"vs full-layer fp32 at least {int(m['full_layer_bytes']) / MIB:.0f} MiB (fp32 copy + dense fp32 delta "
                f"of {m['full_layer_key']} {'x'.join(map(str, self.merge_shape))}; "
                f"{int(m['full_layer_comfy_bytes']) / MIB:.0f} MiB as ComfyUI computes it)"
            )
            if r.mode == "merged":
                lines.append(f"{'merge peak (weights + merge temporaries)':{width}}{self.merge_peak_bytes / GIB:9.2f}")
        if self.card_bytes is not None:
            lines.append(f"card {self.card_bytes / GIB:.2f} GiB ({self.card_source}), usable "
                         f"{self.usable_bytes / GIB:.2f} GiB (minus {CUDA_RESERVE_BYTES / GIB:.1f} GiB CUDA context)")
            diff = (self.usable_bytes - self.peak_bytes) / GIB
            lines.append(f"verdict: {self.verdict} ({'headroom' if diff >= 0 else 'over by'} {abs(diff):.2f} GiB)")
        else:
            lines.append(f"verdict: {self.verdict}; pass a card size")
        if self.suggestion is not None:
            if self.suggestion_fits:
                lines.append(f"cheapest change that fits: {' + '.join(self.suggestion)} -> "
                             f"{self.suggestion_peak_bytes / GIB:.2f} GiB")
            else:
                lines.append(f"no listed change fits; with all of them ({' + '.join(self.suggestion)}) the peak is "
                             f"{self.suggestion_peak_bytes / GIB:.2f} GiB")
        lines.append(f"activations model: {ACTIVATION_FORMULA}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


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
        model.shape, image_tokens, text_tokens, eff_batch,
        lora_targets=lora.targets if unmerged else (),
        weight_dtype={n: d for n, (_, d) in tensors.items()},
    )
    at = max(points, key=points.get) if points else "-"
    merge = merge_temporaries(tensors, lora, req.tile_bytes) if lora is not None else None
    card, source = _card(req)
    plan = Plan(
        request=req, model=model.label, params=sum(_numel(d) for d, _ in model.tensors.values()),
        weights=weights_by_dtype(tensors), lora_label=lora.label if lora else None,
        lora_params=lora.params if lora else 0,
        lora_resident_bytes=lora.params * UNMERGED_BYTES_PER_PARAM if unmerged else 0,
        activation_bytes=points.get(at, 0), activation_at=at, activation_points=points,
        image_tokens=image_tokens, text_tokens=text_tokens, effective_batch=eff_batch, merge=merge,
        encoders=encoder_bytes(req), card_bytes=card, card_source=source,
        notes=[*model.notes, *(lora.notes if lora else [])],
    )
    plan.policy = policy or "as stored"
    if merge is not None and merge["full_layer_key"] in tensors:
        plan.merge_shape = tensors[str(merge["full_layer_key"])][0]
    return plan


def _changes(req: PlanRequest, has_lora: bool, stored_policy: str) -> list[tuple[str, dict[str, object]]]:
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
    if req.t5 != "offload":
        out.append(("offload T5", {"t5": "offload"}))
    if req.t5 == "bf16":
        out.append(("fp8 T5", {"t5": "fp8"}))
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
    candidates = _changes(req, lora is not None, stored)

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
        option = [c for c in chosen if not keys & set(c[1])] + [candidate]  # a later fp8/T5/batch step replaces
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
    _check_request(req)
    model = read_model(req.model)
    lora = read_loras(req, model.shape)
    result = _evaluate(req, model, lora)
    if not model.is_preset and req.dtype is None:
        result.notes.append("weights counted as stored in the file; pass a dtype to plan another storage")
    _suggest(result, model, lora)
    return result
