"""fp8 Flux: scaled float8_e4m3fn weights, layer policies, merge-then-quantise, reading and in-memory layers.

File format (what ComfyUI 0.3.64 calls "scaled fp8", `model_detection.py` / `ops.scaled_fp8_ops`):

* marker key `<prefix>scaled_fp8`, dtype float8_e4m3fn. Its element count picks ComfyUI's matmul: 2 elements
  (what we write by default) = "full precision matmul": every layer is dequantised to the compute dtype
  (`weight.to(dtype) * scale_weight.to(dtype)`), so what runs is exactly what we measured; 0 elements (what
  ComfyUI's own saves write; `fp8_matmul=True` here) lets GPUs with fp8 compute run `torch._scaled_mm` with the
  activations cast to fp8 too (scale_input 1.0), which is faster and adds activation error.
* per fp8 Linear `<layer>.weight` (float8_e4m3fn) and `<layer>.scale_weight` (float32, shape ()): the real
  weight is `weight.float() * scale_weight`. Newer ComfyUI (`utils.convert_old_quants`) turns each
  `scale_weight` into a `comfy_quant` float8_e4m3fn layer with `weight_scale` and leaves every other layer in
  its stored dtype, so policies that keep layers bf16 load as intended there.
* ComfyUI 0.3.64 itself creates *every* Linear (weight and bias) of a scaled-fp8 model in fp8, with a scalar
  `scale_weight` Parameter that defaults to 1.0. Measured (bench/fp8_fidelity.py with COMFYUI_ROOT, real-width
  1+1-block Flux written by `merge_checkpoint_fp8`, loaded by `comfy.sd.load_diffusion_model` on CPU): our fp8
  layers dequantise bit-identically to ours (max |diff| 0); a Linear we keep bf16 (img_in, final_layer.linear
  under `default`) is plain-cast to fp8 with scale 1 on load: 3.3 % relative error instead of 0; biases are
  plain-cast to fp8 in every case (5.7 % relative error; nothing in the file can avoid it). So for 0.3.x use the
  `all` preset (those layers then get their own scale: 2.6 % instead of 3.3 %); `default`/`quality` pay off in
  newer ComfyUI and in our own loaders (`load_fp8_state_dict`, `load_fp8_into_module`, FP8Linear).

Granularity: one scale per tensor. ComfyUI 0.3.64 cannot load anything finer: `scale_weight` is a 0-dim
Parameter (a per-row (out, 1) tensor fails `load_state_dict` with a size mismatch, and its forward multiplies
the *input* by the scale when the weight is larger than the input). Finer scales would buy little anyway:
e4m3 is a floating format, so the scale only decides which values clip or fall into the subnormals; every
normal value keeps 3 mantissa bits whatever the scale. Measured on a 2048x3072 N(0, 0.02) bf16 weight, relative
error: per-tensor power of two 2.657 %, per-tensor amax/448 2.648 %, per-row amax/448 2.645 %, per-64-block
amax/448 2.505 % (-6 %, not loadable by 0.3.64), no scale 3.309 %.

Scale = the smallest power of two >= amax / 448 (`scale_mode="pow2"`, default), computed fresh from the
merged tensor. A power of two makes dequantisation exact in every compute dtype: fp8 values have 4
significant bits, so `weight.to(bf16) * scale.to(bf16)` in ComfyUI (which rounds the scale to the compute
dtype) is bit-identical to our fp32 `weight.float() * scale` (measured: 0 difference), and requantising to an
unchanged scale is lossless. `scale_mode="exact"` (scale = amax/448) measures the same to 0.1 % (benchmark
column "(a)ex") but ComfyUI then rounds the scale to bf16, a gain error of up to 0.4 %.

Rounding: round-to-nearest-even by default (the lowest error any one rounding can reach on the e4m3 grid).
Stochastic rounding (`rounding="stochastic"`) uses a counter-based hash of (seed, key name without prefix, flat
element index): deterministic for a seed and key, independent of tile sizes and devices, unbiased in
expectation, and 1.41x the error of nearest (E[err^2] = ulp^2/6 instead of ulp^2/12; measured 1.415x).

Merging into fp8 (merge-then-quantise is the recommended path): tile by tile, decode the stored rows to fp32
(dequantise fp8 with its scale), add every adapter's change in fp32, then a first pass finds the merged
tensor's amax, the fresh scale is fixed, and a second pass recomputes each tile and writes it rounded once.
Extra memory is a few fp32 tiles; the output tensor is the only weight-sized allocation. The result is the
e4m3 floor (the fp32 merge quantised once), e.g. error/‖ΔW‖ 2.65 / 0.88 / 0.27 for ΔW = 1 / 3 / 10 % of ‖W‖
(9216x3072 qkv), against 4.67 / 1.56 / 0.47 for ComfyUI's rounding into unscaled fp8 (0.567x) and 3.32 / 1.11 /
0.33 for kohya's plain cast. The issue's target of 0.45x is below what one e4m3 rounding can reach: RNE has
1/sqrt(2) the error of stochastic rounding and ComfyUI's unscaled subnormals add 25 %, 0.707 / 1.25 = 0.567.

In-place merges into fp8 weights go through the engine (`merge_loras`) with `ScaledFP8Codec`
(`fp8_merge_options` / `merge_loras_fp8`): its `begin` hook does the amax pass (`job.merged_rows`), tiles are
then written with the fresh scale, and the live scale tensor is updated in `commit` (restored in `rollback`), so
a failure anywhere leaves weights and scales bit-identical. The engine's exact-undo journal works because the
codec decodes and encodes per *role*: "base" with the scale the weight had before any LoRA (kept in
`MergeState.codec_state`), "current" with the scale before this call, "new" with the fresh scale; recovery
always rounds to nearest. The journal holds the elements where round(decode_new(out) - ΔW) misses the original
fp8 bits (5 bytes each, or the tile's bytes when that is smaller): measured on real-width qkv / mlp weights,
7.4 % / 19 % / 42 % of the fp8 weight's bytes for ΔW = 1 / 3 / 10 % of ‖W‖ (system RAM). With stochastic rounding
about 1/4 of the elements miss, so the journal is a full copy of the fp8 weight: for in-place merges with
undo prefer nearest, or pass `MergeOptions(exact_undo=False)` and reload to undo.

Layer policies (`PRESETS`): `default` = every Linear weight of double and single blocks in fp8 (attention qkv /
proj, MLPs, modulation); embedders (img_in, txt_in, time_in, vector_in, guidance_in), final_layer, norms and
biases stay bf16. `quality` = like default, but the modulation Linears (`_mod.lin`, `modulation.lin`) stay bf16
too. `all` = every Linear weight in fp8 (for ComfyUI 0.3.x, see above). Flux-dev: default 11.97 GB, quality
15.20 GB, all 11.90 GB (bf16 23.80 GB); `policy_size` / `preset_sizes` compute them for any FluxShape.

For the nodes: `cast_module_fp8(module, policy)` (swap Linears for FP8Linear in place), `merge_to_fp8(sd, loras,
policy)` / `quantize_merged(weight, terms)` (merge-then-quantise), `merge_loras_fp8(module_or_sd, loras, state=)`
(LoRAs into an fp8 model, fresh scales, exact undo), `load_fp8_state_dict` / `load_fp8_into_module` (read any
fp8 file), `write_fp8_checkpoint` / `merge_checkpoint_fp8` (files, streamed).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, DoRA
from .errors import LoRAFormatError, LoRAOpsError, ModelMismatchError
from .flux import FluxShape, flux_weight_shapes, is_block_linear, is_modulation, strip_model_prefix
from .formats import LoRAFile, check_fits
from .merge import Codec, MergeOptions, MergeReport, MergeState, merge_loras, terms_by_target
from .safetensors_io import SafetensorsFile, StreamingWriter

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
MARKER = "scaled_fp8"
SCALE_SUFFIX = ".scale_weight"
INPUT_SCALE_SUFFIX = ".scale_input"
#: newer ComfyUI (`comfy_quant`) names
NEW_SCALE_SUFFIX = ".weight_scale"
NEW_QUANT_SUFFIX = ".comfy_quant"
NEW_INPUT_SCALE_SUFFIX = ".input_scale"

DEFAULT_TILE_BYTES = 64 * 1024 * 1024
#: fp32-sized buffers alive per tile element (base, merged, scaled, stochastic-rounding temporaries).
_TILE_BUFFERS = 12
ROUNDINGS = ("nearest", "stochastic")
SCALE_MODES = ("pow2", "exact")

Term = tuple[Adapter, float]


class FP8FormatError(LoRAOpsError):
    """An fp8 checkpoint (or fp8 tensor) is unusable: missing, zero or non-finite scales, wrong dtypes."""


# ---------------------------------------------------------------------------------------------
# Scales and rounding
# ---------------------------------------------------------------------------------------------


def fresh_scale(amax: float, mode: str = "pow2") -> float:
    """The per-tensor scale for a tensor whose largest magnitude is `amax` (values/scale stay within ±448)."""
    if mode not in SCALE_MODES:
        raise LoRAOpsError(f"scale mode {mode!r}: use one of {SCALE_MODES}")
    amax = float(amax)
    if not math.isfinite(amax):
        raise FP8FormatError(f"cannot quantise a tensor whose largest value is {amax}")
    if amax == 0.0:
        return 1.0
    if mode == "exact":
        return amax / FP8_MAX
    scale = 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
    while amax / scale > FP8_MAX:  # guard against log2 rounding
        scale *= 2.0
    return scale


def key_seed(key: str, seed: int = 0) -> int:
    """A 32-bit seed from a weight's name (prefix ignored) and the user's seed."""
    name = strip_model_prefix(key)[1]
    return (zlib.crc32(name.encode()) ^ _mul32_int(int(seed) & 0xFFFFFFFF, 0x9E3779B9)) & 0xFFFFFFFF


def _mul32_int(x: int, c: int) -> int:
    return (x * c) & 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & 0xFFFFFFFF


def uniform_noise(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) fp32 values for flat element indices offset..offset+numel (murmur3 finaliser).

    A pure function of (seed, index): the same element gets the same number whatever the tiling or device.
    """
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = (_mul32(idx & 0xFFFFFFFF, 0x9E3779B1) ^ (idx >> 32) ^ (seed & 0xFFFFFFFF)) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32).mul_(2.0**-24)


def stochastic_e4m3(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Round fp32 `values` (already divided by the scale) to e4m3fn: up with probability = the fraction.

    `noise` is uniform [0, 1), same shape. Values beyond ±448 saturate. E[result] = values inside the range.
    """
    a = values.abs().clamp_(max=FP8_MAX)
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(a), (exp - 1).clamp_(min=-6) - 3)
    lo = torch.floor(a / ulp).mul_(ulp)
    up = noise.reshape(a.shape) < (a - lo).div_(ulp)
    r = lo.add_(ulp * up).clamp_(max=FP8_MAX)
    return torch.copysign(r, values).to(E4M3)


def round_e4m3(
    scaled: torch.Tensor, rounding: str = "nearest", seed: int = 0, offset: int = 0
) -> torch.Tensor:
    """fp32 values (already divided by the scale) → float8_e4m3fn, saturating at ±448."""
    if rounding == "nearest":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    if rounding == "stochastic":
        return stochastic_e4m3(scaled, uniform_noise(seed, offset, scaled.numel(), scaled.device))
    raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")


def quantize(
    weight: torch.Tensor, scale: float | None = None, *, rounding: str = "nearest", key: str = "", seed: int = 0,
    scale_mode: str = "pow2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole tensor → (float8_e4m3fn tensor, 0-dim fp32 scale). Fresh scale unless `scale` is given."""
    q, s = quantize_merged(weight, (), key=key, rounding=rounding, seed=seed, scale_mode=scale_mode, scale=scale)
    return q, s


def dequantize(q: torch.Tensor, scale: torch.Tensor | float | None = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """`q.float() * scale` (per tensor, or per row for an (out, 1)/(out,) scale), in `dtype`."""
    out = q.to(torch.float32)
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
        if s.numel() > 1 and q.dim() >= 1:
            s = s.reshape(-1, *([1] * (q.dim() - 1)))
        out = out * s
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Layer policies
# ---------------------------------------------------------------------------------------------

#: Linears outside the blocks (embedders and final layer), by their first name component.
OUTSIDE_LINEARS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


@dataclass(frozen=True)
class FP8Policy:
    """Which Linear weights are stored in fp8 (every other tensor keeps its 16-bit dtype)."""

    name: str
    modulation: bool
    outside_blocks: bool
    description: str

    def selects(self, key: str, shape: Sequence[int] | None = None) -> bool:
        """True if the weight `key` (any prefix) goes to fp8 under this policy."""
        name = strip_model_prefix(key)[1]
        if not name.endswith(".weight") or (shape is not None and len(shape) != 2):
            return False
        if is_block_linear(name):
            return self.modulation or not is_modulation(name)
        return self.outside_blocks and name.split(".", 1)[0] in OUTSIDE_LINEARS


PRESETS: dict[str, FP8Policy] = {
    "default": FP8Policy(
        "default", True, False,
        "every Linear weight of double and single blocks (attention, MLP, modulation) in fp8; embedders, "
        "final_layer, norms and biases bf16",
    ),
    "quality": FP8Policy(
        "quality", False, False,
        "like default, but the modulation Linears (_mod.lin, modulation.lin) stay bf16 too",
    ),
    "all": FP8Policy(
        "all", True, True,
        "every Linear weight in fp8 (embedders and final_layer too); norms and biases bf16. Use for ComfyUI "
        "0.3.x, whose scaled-fp8 loader makes every Linear fp8 anyway",
    ),
}


def get_policy(policy: str | FP8Policy) -> FP8Policy:
    if isinstance(policy, FP8Policy):
        return policy
    try:
        return PRESETS[policy]
    except KeyError:
        raise LoRAOpsError(f"unknown fp8 policy {policy!r}; presets: {', '.join(PRESETS)}") from None


def fp8_keys(shapes: Mapping[str, Sequence[int]], policy: str | FP8Policy = "default") -> list[str]:
    """The weight keys a policy stores in fp8."""
    pol = get_policy(policy)
    return [k for k, s in shapes.items() if pol.selects(k, s)]


@dataclass(frozen=True)
class FP8Size:
    """Bytes of a checkpoint's tensors under a policy (header not included)."""

    policy: str
    fp8_tensors: int
    fp8_bytes: int
    other_bytes: int
    scale_bytes: int
    marker_bytes: int
    bf16_bytes: int  # the same model all in bf16

    @property
    def total(self) -> int:
        return self.fp8_bytes + self.other_bytes + self.scale_bytes + self.marker_bytes

    @property
    def ratio(self) -> float:
        return self.total / self.bf16_bytes


def policy_size(shape: FluxShape, policy: str | FP8Policy = "default", *, other_itemsize: int = 2,
                fp8_matmul: bool = False) -> FP8Size:
    """Tensor bytes of a Flux checkpoint of `shape` written with `policy` (other tensors `other_itemsize`)."""
    pol = get_policy(policy)
    fp8 = other = n = total = 0
    for name, dims in flux_weight_shapes(shape).items():
        numel = math.prod(dims)
        total += numel * 2
        if pol.selects(name, dims):
            fp8 += numel
            n += 1
        else:
            other += numel * other_itemsize
    return FP8Size(pol.name, n, fp8, other, 4 * n, 0 if fp8_matmul else 2, total)


def preset_sizes(shape: FluxShape) -> dict[str, FP8Size]:
    return {name: policy_size(shape, name) for name in PRESETS}


# ---------------------------------------------------------------------------------------------
# Merge-then-quantise, one tensor at a time
# ---------------------------------------------------------------------------------------------


def _tile_rows(cols: int, tile_bytes: int | None) -> int:
    return max(1, (tile_bytes or DEFAULT_TILE_BYTES) // (_TILE_BUFFERS * 4 * max(cols, 1)))


class _Rows:
    """fp32 rows of base + Σ coeff·ΔW for one weight, computed tile by tile (no full fp32 copy)."""

    def __init__(self, weight: torch.Tensor, terms: Sequence[Term], key: str, device, in_scale, tile_rows: int):
        self.key = key
        self.matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        self.device = torch.device(device) if device is not None else weight.device
        self.in_scale = None if in_scale is None else torch.as_tensor(in_scale, dtype=torch.float32).to(self.device)
        self.terms = [(a.on(self.device), float(c)) for a, c in terms if c != 0.0]
        cols = self.matrix.shape[1]
        for a, _ in self.terms:
            if a.shape[1] != cols or a.row_offset + a.shape[0] > self.matrix.shape[0]:
                raise ModelMismatchError(
                    f"{a.source_keys[0]!r} makes a {a.shape[0]}x{a.shape[1]} change at row {a.row_offset} of "
                    f"{key!r}, which has shape {tuple(weight.shape)}"
                )
        doras = [a for a, _ in self.terms if isinstance(a, DoRA) and a.per_column]
        if doras:
            for r0, r1 in _tiles(self.matrix.shape[0], tile_rows):
                base = self.base(r0, r1)
                for d in doras:
                    a0, a1 = max(r0, d.row_offset), min(r1, d.row_offset + d.shape[0])
                    if a0 < a1:
                        d.accumulate_norms(a0 - d.row_offset, a1 - d.row_offset, base[a0 - r0 : a1 - r0])

    def base(self, r0: int, r1: int) -> torch.Tensor:
        rows = self.matrix[r0:r1].to(self.device).to(torch.float32)
        if self.in_scale is not None:
            s = self.in_scale
            rows = rows * (s if s.numel() == 1 else s.reshape(-1, 1)[r0:r1])
        return rows

    def merged(self, r0: int, r1: int) -> torch.Tensor:
        base = self.base(r0, r1)
        out = base.clone() if self.terms else base
        for adapter, coeff in self.terms:
            a0, a1 = max(r0, adapter.row_offset), min(r1, adapter.row_offset + adapter.shape[0])
            if a0 < a1:
                adapter.add_delta(out[a0 - r0 : a1 - r0], a0 - adapter.row_offset, a1 - adapter.row_offset, coeff,
                                  base[a0 - r0 : a1 - r0])
        return out


def _tiles(rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, tile_rows):
        yield r0, min(rows, r0 + tile_rows)


def _check_finite_tile(tile: torch.Tensor, key: str, r0: int, has_terms: bool) -> float:
    amax = float(tile.abs().amax()) if tile.numel() else 0.0
    if not math.isfinite(amax):
        if has_terms:
            raise LoRAFormatError(
                f"merging into {key!r} gives NaN or Inf (rows from {r0}): a LoRA factor or strength is too large or "
                "not finite. Nothing was written."
            )
        raise FP8FormatError(f"{key!r} contains NaN or Inf (rows from {r0}); the checkpoint is broken")
    return amax


def quantize_merged(
    weight: torch.Tensor,
    terms: Sequence[Term] = (),
    *,
    key: str = "",
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    weight_scale: torch.Tensor | float | None = None,
    scale: float | None = None,
    tile_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [· weight_scale] + Σ coeff·ΔW) → (float8_e4m3fn tensor, 0-dim fp32 scale), tile by tile.

    `weight` may be bf16/fp16/fp32 or fp8 (then `weight_scale` dequantises it). Pass 1 finds the merged
    tensor's amax, giving a fresh scale (unless `scale` is given: then values beyond 448·scale clip); pass 2
    recomputes each tile and rounds it once. The result lives on `device` (default: the weight's device).
    Stochastic rounding is seeded by `key` and `seed` (see `key_seed`).
    """
    if rounding not in ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")
    for a, _ in terms:
        a.validate(key or None)
    cols = weight.reshape(weight.shape[0], -1).shape[1] if weight.dim() else 1
    tile_rows = _tile_rows(cols, tile_bytes)
    rows = _Rows(weight if weight.dim() else weight.reshape(1), terms, key, device, weight_scale, tile_rows)
    n = rows.matrix.shape[0]
    cached = None
    checked = scale is None  # pass 1 checks finiteness; with a given scale pass 2 does
    if scale is None:
        amax = 0.0
        for r0, r1 in _tiles(n, tile_rows):
            tile = rows.merged(r0, r1)
            amax = max(amax, _check_finite_tile(tile, key, r0, bool(rows.terms)))
            if r1 - r0 == n:
                cached = tile  # one tile: no second computation
        scale = fresh_scale(amax, scale_mode)
    elif not (math.isfinite(scale) and scale > 0):
        raise FP8FormatError(f"{key!r}: scale {scale} must be a positive finite number")
    out = torch.empty(rows.matrix.shape, dtype=E4M3, device=rows.device)
    s = torch.tensor(scale, dtype=torch.float32)
    inv_exact = math.log2(scale).is_integer()  # multiplying by 1/scale is exact only for powers of two
    seed32 = key_seed(key, seed)
    for r0, r1 in _tiles(n, tile_rows):
        tile = cached if cached is not None else rows.merged(r0, r1)
        if not checked:
            _check_finite_tile(tile, key, r0, bool(rows.terms))
        scaled = tile * (1.0 / scale) if inv_exact else tile / scale
        out[r0:r1] = round_e4m3(scaled, rounding, seed32, r0 * cols)
    return out.reshape(weight.shape), s


def merge_rows_to(weight: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype, *, key: str = "",
                  weight_scale=None, tile_bytes: int | None = None, device=None) -> torch.Tensor:
    """base + Σ coeff·ΔW in `dtype` (round to nearest), tile by tile; for tensors a policy keeps 16-bit."""
    for a, _ in terms:
        a.validate(key or None)
    if weight.dim() == 0:
        weight = weight.reshape(1)
    cols = weight.reshape(weight.shape[0], -1).shape[1]
    tile_rows = _tile_rows(cols, tile_bytes)
    rows = _Rows(weight, terms, key, device, weight_scale, tile_rows)
    out = torch.empty(rows.matrix.shape, dtype=dtype, device=rows.device)
    for r0, r1 in _tiles(rows.matrix.shape[0], tile_rows):
        tile = rows.merged(r0, r1)
        if rows.terms:
            _check_finite_tile(tile, key, r0, True)
        out[r0:r1] = tile.to(dtype)
    return out.reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# Reading scaled / plain fp8 checkpoints
# ---------------------------------------------------------------------------------------------


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class ScaleTable:
    """How a checkpoint's weights are stored: its kind, the marker and the scale key of each fp8 weight."""

    kind: str  # "scaled_fp8" (ComfyUI legacy), "comfy_quant" (newer ComfyUI), "plain_fp8", "none"
    marker: str | None
    fp8_matmul: bool | None  # the reader fills it from the marker's element count
    scale_keys: dict[str, str]  # weight key -> its scale key (scaled kinds)
    plain: list[str]  # fp8 tensors with no scale (scale 1): all of a plain model, fp8 biases of a scaled one
    aux: set[str]  # keys that are not model tensors (marker, scales, input scales, comfy_quant)


def scale_table(dtypes: Mapping[str, torch.dtype], path: object = None) -> ScaleTable:
    """Classify a checkpoint from its keys and dtypes; raise FP8FormatError for missing scales."""
    where = f"{path}: " if path is not None else ""
    marker = next((k for k in dtypes if strip_model_prefix(k)[1] == MARKER), None)
    aux: set[str] = set()
    scale_keys: dict[str, str] = {}
    has_new = any(k.endswith(NEW_QUANT_SUFFIX) for k in dtypes)
    for k in dtypes:
        for suffix in (SCALE_SUFFIX, NEW_SCALE_SUFFIX):
            if k.endswith(suffix):
                weight_key = k[: -len(suffix)] + ".weight"
                if weight_key not in dtypes:
                    raise FP8FormatError(f"{where}scale {k!r} has no weight {weight_key!r}; the file is inconsistent")
                scale_keys[weight_key] = k
                aux.add(k)
        if k.endswith((INPUT_SCALE_SUFFIX, NEW_INPUT_SCALE_SUFFIX, NEW_QUANT_SUFFIX)):
            aux.add(k)
    fp8_weights = [k for k, d in dtypes.items() if _is_fp8(d) and k not in aux and k != marker]
    if marker is not None:
        aux.add(marker)
        kind = "scaled_fp8"
    elif has_new:
        kind = "comfy_quant"
    elif scale_keys:
        kind = "scaled_fp8"  # scales without the marker: ComfyUI would ignore them; we apply them
    elif fp8_weights:
        kind = "plain_fp8"
    else:
        kind = "none"
    # ComfyUI 0.3.x saves scaled-fp8 models with fp8 *biases* and no scale for them: those mean scale 1.
    unscaled = [k for k in fp8_weights if k not in scale_keys]
    missing = [k for k in unscaled if k.endswith(".weight")]
    if kind in ("scaled_fp8", "comfy_quant") and missing:
        raise FP8FormatError(
            f"{where}{len(missing)} fp8 weight(s) of this scaled-fp8 checkpoint have no scale (e.g. {missing[0]!r} "
            f"has no {missing[0][:-len('.weight')] + SCALE_SUFFIX!r}); the file is incomplete or was edited. "
            "Re-export it, or cast the original bf16 model again."
        )
    return ScaleTable(kind, marker, None, scale_keys, unscaled, aux)


def check_scale(value: torch.Tensor, key: str, rows: int | None = None, path: object = None) -> torch.Tensor:
    """A scale tensor as fp32; raise FP8FormatError unless every entry is finite and > 0."""
    where = f"{path}: " if path is not None else ""
    s = value.detach().to(torch.float32)
    if s.numel() != 1 and (rows is None or s.numel() != rows):
        raise FP8FormatError(f"{where}scale {key!r} has shape {tuple(value.shape)}; expected one value per tensor")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        bad = s.reshape(-1)[~(torch.isfinite(s.reshape(-1)) & (s.reshape(-1) > 0))][0].item()
        raise FP8FormatError(
            f"{where}scale {key!r} is {bad}: scales must be positive and finite (a zero scale turns the layer "
            "into zeros). The file is broken; re-export it from the bf16 model."
        )
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1)


@dataclass
class FP8Checkpoint:
    """A checkpoint read back: tensors as stored plus the scale of each fp8 weight."""

    tensors: dict[str, torch.Tensor]  # model tensors as stored (no marker / scale keys)
    scales: dict[str, torch.Tensor]  # weight key -> fp32 scale (0-dim; 1.0 for plain fp8)
    kind: str
    fp8_matmul: bool | None = None
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def weight(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor dequantised to `dtype` (non-fp8 tensors are just cast)."""
        t = self.tensors[key]
        return dequantize(t, self.scales.get(key), dtype) if key in self.scales else t.to(dtype)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The whole model in `dtype` (16-bit tensors that need no change are returned as they are)."""
        return {k: (self.weight(k, dtype) if (k in self.scales or t.dtype != dtype) else t)
                for k, t in self.tensors.items()}

    @property
    def fp8_keys(self) -> list[str]:
        return [k for k, t in self.tensors.items() if _is_fp8(t.dtype)]


def load_fp8_state_dict(source: str | Path | Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu"
                        ) -> FP8Checkpoint:
    """Read our scaled-fp8 files, ComfyUI's scaled-fp8 files (legacy and `comfy_quant`), plain fp8 or 16-bit files.

    Raises FP8FormatError when a scaled checkpoint's fp8 weight has no scale, or a scale is zero, negative,
    NaN or Inf. Nothing is changed on disk.
    """
    path = None
    metadata: dict[str, str] = {}
    if isinstance(source, (str, Path)):
        path = Path(source)
        st = SafetensorsFile(path)
        metadata = dict(st.metadata)
        dtypes = {k: st.dtype(k) for k in st.keys()}
        table = scale_table(dtypes, path)
        raw = dict(st.iter_tensors())
    else:
        raw = dict(source)
        dtypes = {k: v.dtype for k, v in raw.items()}
        table = scale_table(dtypes)
    tensors = {k: v.to(device) for k, v in raw.items() if k not in table.aux}
    scales: dict[str, torch.Tensor] = {}
    for wkey, skey in table.scale_keys.items():
        scales[wkey] = check_scale(raw[skey], skey, tensors[wkey].shape[0] if tensors[wkey].dim() else None, path)
    for wkey in table.plain:
        scales[wkey] = torch.ones((), dtype=torch.float32)
    inputs = {k: raw[k] for k in raw if k.endswith((INPUT_SCALE_SUFFIX, NEW_INPUT_SCALE_SUFFIX))}
    fp8_matmul = None
    if table.marker is not None:
        fp8_matmul = raw[table.marker].numel() != 2
    return FP8Checkpoint(tensors, scales, table.kind, fp8_matmul, inputs, metadata)


def dequantize_state_dict(source, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Any checkpoint `load_fp8_state_dict` reads → a plain state dict in `dtype`."""
    return load_fp8_state_dict(source).dequantized(dtype)


# ---------------------------------------------------------------------------------------------
# Writing: plan + per-tensor conversion (streaming), whole-dict and file helpers
# ---------------------------------------------------------------------------------------------


def _prefix_of(keys: Iterable[str]) -> str:
    for k in keys:
        prefix, name = strip_model_prefix(k)
        if name.startswith(("double_blocks.", "single_blocks.", "img_in.")):
            return prefix
    return ""


@dataclass
class FP8Conversion:
    """How one source checkpoint becomes a scaled-fp8 one (the plan and the per-tensor work)."""

    source: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # source key -> (dtype, shape), in file order
    policy: FP8Policy
    table: ScaleTable
    terms: dict[str, list[Term]]  # bare weight name -> adapters
    other_dtype: torch.dtype = torch.bfloat16
    fp8_matmul: bool = False
    rounding: str = "nearest"
    seed: int = 0
    scale_mode: str = "pow2"
    tile_bytes: int | None = None
    device: torch.device | str | None = None
    prefix: str = ""

    def is_fp8_output(self, key: str) -> bool:
        dtype, shape = self.source[key]
        return self.policy.selects(key, shape) and dtype.is_floating_point

    def out_dtype(self, key: str) -> torch.dtype:
        """dtype of a tensor the policy keeps: its own, except that fp8/scaled sources become `other_dtype`."""
        dtype, _ = self.source[key]
        if _is_fp8(dtype) or key in self.table.scale_keys:
            return self.other_dtype
        return dtype

    def plan(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of every output tensor, in writing order (for StreamingWriter)."""
        out: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
            (self.prefix + MARKER, E4M3, (0,) if self.fp8_matmul else (2,))
        ]
        for key, (_, shape) in self.source.items():
            if key in self.table.aux:
                continue
            if self.is_fp8_output(key):
                out.append((key, E4M3, shape))
                out.append((key[: -len(".weight")] + SCALE_SUFFIX, torch.float32, ()))
            else:
                out.append((key, self.out_dtype(key), shape))
        return out

    def convert(self, key: str, tensor: torch.Tensor, get: Callable[[str], torch.Tensor]
                ) -> list[tuple[str, torch.Tensor]]:
        """The output tensor(s) for one source tensor (`get` reads other source keys, e.g. its scale)."""
        name = strip_model_prefix(key)[1]
        terms = self.terms.get(name, [])
        in_scale = None
        if key in self.table.scale_keys:
            skey = self.table.scale_keys[key]
            in_scale = check_scale(get(skey), skey, tensor.shape[0] if tensor.dim() else None)
        if self.is_fp8_output(key):
            q, s = quantize_merged(tensor, terms, key=key, rounding=self.rounding, seed=self.seed,
                                   scale_mode=self.scale_mode, weight_scale=in_scale, tile_bytes=self.tile_bytes,
                                   device=self.device)
            return [(key, q.cpu() if self.device is not None else q),
                    (key[: -len(".weight")] + SCALE_SUFFIX, s)]
        dtype = self.out_dtype(key)
        if not terms and in_scale is None and tensor.dtype == dtype:
            return [(key, tensor)]
        if not terms and in_scale is None:
            return [(key, tensor.to(dtype))]
        merged = merge_rows_to(tensor, terms, dtype, key=key, weight_scale=in_scale, tile_bytes=self.tile_bytes,
                               device=self.device)
        return [(key, merged.cpu() if self.device is not None else merged)]

    def marker(self) -> torch.Tensor:
        return torch.zeros((0,) if self.fp8_matmul else (2,), dtype=E4M3)

    def iter_tensors(self, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) in `plan()` order, reading one source tensor at a time through `get`."""
        yield self.prefix + MARKER, self.marker()
        for key in self.source:
            if key in self.table.aux:
                continue
            yield from self.convert(key, get(key), get)


def fp8_conversion(
    source: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    loras: Sequence[tuple[LoRAFile, float]] = (),
    policy: str | FP8Policy = "default",
    *,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    fp8_matmul: bool = False,
    other_dtype: torch.dtype = torch.bfloat16,
    tile_bytes: int | None = None,
    device: torch.device | str | None = None,
    path: object = None,
) -> FP8Conversion:
    """Plan a conversion of a checkpoint with `source` = {key: (dtype, shape)} (+ LoRAs) to scaled fp8.

    Checks up front (raising before anything is written): the policy and rounding names, that every LoRA fits
    the model, that LoRA factors are finite, and that a scaled source has a scale for every fp8 weight.
    """
    if rounding not in ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")
    if scale_mode not in SCALE_MODES:
        raise LoRAOpsError(f"scale mode {scale_mode!r}: use one of {SCALE_MODES}")
    pol = get_policy(policy)
    source = {k: (d, tuple(s)) for k, (d, s) in source.items()}
    table = scale_table({k: d for k, (d, _) in source.items()}, path)
    named = {strip_model_prefix(k)[1]: s for k, (_, s) in source.items() if k not in table.aux}
    for lora, _ in loras:
        check_fits(lora, named.get)
        for adapters in lora.targets.values():
            for a in adapters:
                a.validate(lora.path)
    terms = terms_by_target(list(loras))
    for name, adapter_terms in terms.items():
        for _, coeff in adapter_terms:
            if not math.isfinite(coeff):
                raise LoRAFormatError(f"strength {coeff} for {name!r} is not a finite number")
    return FP8Conversion(source, pol, table, terms, other_dtype, fp8_matmul, rounding, seed, scale_mode, tile_bytes,
                         device, _prefix_of(k for k in source if k not in table.aux))


def merge_to_fp8(
    state_dict: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoRAFile, float]] = (),
    policy: str | FP8Policy = "default",
    **kw,
) -> dict[str, torch.Tensor]:
    """bf16 (or fp8) Flux state dict + LoRAs → a new scaled-fp8 state dict, one tensor at a time.

    Each fp8 tensor gets a fresh scale from base + every LoRA's change, rounded once (`rounding=` "nearest"
    or "stochastic"; `seed=`). Tensors the policy keeps are merged in fp32 and stored in their 16-bit dtype;
    untouched ones are shared, not copied. The input is never modified; on an error nothing is returned.
    Keyword options as `fp8_conversion`.
    """
    conv = fp8_conversion({k: (v.dtype, tuple(v.shape)) for k, v in state_dict.items()}, loras, policy, **kw)
    return dict(conv.iter_tensors(state_dict.__getitem__))


def write_fp8_checkpoint(
    src: str | Path,
    dst: str | Path,
    loras: Sequence[tuple[LoRAFile, float]] = (),
    policy: str | FP8Policy = "default",
    *,
    metadata: Mapping[str, str] | None = None,
    **kw,
) -> Path:
    """Stream a checkpoint file (+ LoRAs) into a scaled-fp8 file: one source tensor in memory at a time.

    The output appears only when complete (StreamingWriter renames a temporary file); on any error there is
    no output. Keyword options as `fp8_conversion`.
    """
    st = SafetensorsFile(src)
    conv = fp8_conversion({k: (st.dtype(k), st.shape(k)) for k in st.keys()}, loras, policy, path=src, **kw)
    meta = dict(st.metadata)
    meta.update(metadata or {})
    meta["lora_ops.fp8"] = f"policy={conv.policy.name} rounding={conv.rounding} scale={conv.scale_mode}"
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f, StreamingWriter(dst, conv.plan(), meta) as out:
        for key, tensor in conv.iter_tensors(f.get_tensor):
            out.write(key, tensor)
    return Path(dst)


def merge_checkpoint_fp8(
    model_path: str | Path,
    loras: Sequence[tuple[LoRAFile, float]],
    out_path: str | Path,
    *,
    policy: str | FP8Policy = "default",
    rounding: str = "nearest",
    seed: int = 0,
    fp8_matmul: bool = False,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """The CLI's `merge --dtype fp8` and `cast` (no LoRAs): a Flux checkpoint (+ LoRAs) → a scaled-fp8 file.

    The source may be bf16/fp16/fp32, scaled fp8 or plain fp8. Returns a summary (counts and bytes).
    """
    from .offline import open_flux_checkpoint, refuse_overwriting_inputs

    out_path = Path(out_path)
    pol = get_policy(policy)
    refuse_overwriting_inputs(out_path, [Path(model_path), *(lora.path for lora, _ in loras)])
    model = open_flux_checkpoint(model_path)
    conv = fp8_conversion({k: (model.dtype(k), model.shape(k)) for k in model.keys()}, loras, pol,
                          rounding=rounding, seed=seed, fp8_matmul=fp8_matmul, device=device, path=model_path)
    plan = conv.plan()
    meta = dict(model.metadata)
    meta["lora_ops.fp8"] = f"policy={pol.name} rounding={rounding} seed={seed} scale={conv.scale_mode}"
    if loras:
        meta["lora_ops.merged"] = json.dumps(
            [{"file": lora.path.name, "format": lora.format, "strength": s} for lora, s in loras]
        )
    from safetensors import safe_open

    sources = [k for k in conv.source if k not in conv.table.aux]
    done = 0
    with safe_open(str(model_path), framework="pt") as f, StreamingWriter(out_path, plan, meta) as out:
        out.write(conv.prefix + MARKER, conv.marker())
        for key in sources:
            for out_key, tensor in conv.convert(key, f.get_tensor(key), f.get_tensor):
                out.write(out_key, tensor)
            done += 1
            if progress is not None:
                progress(done, len(sources))
    merged = sum(1 for k in sources if strip_model_prefix(k)[1] in conv.terms)
    fp8_count = sum(1 for k in sources if conv.is_fp8_output(k))
    nbytes = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in plan)
    return {"out": str(out_path), "tensors": len(sources), "merged": merged, "dtype": "fp8", "policy": pol.name,
            "fp8_tensors": fp8_count, "bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# In memory: FP8Linear and casting a module by policy
# ---------------------------------------------------------------------------------------------


def _scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_scaled_mm")):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    out_f, in_f = weight.shape
    return in_f % 16 == 0 and out_f % 16 == 0


class FP8Linear(torch.nn.Module):
    """A Linear whose weight is float8_e4m3fn with one fp32 scale; bias stays in its 16-bit dtype.

    forward: dequantise the weight to the input's dtype (`weight.to(dtype) * scale.to(dtype)`, exact for the
    power-of-two scales we write) and run `F.linear`. With `fp8_matmul=True` on CUDA with compute capability
    >= 8.9 it instead runs `torch._scaled_mm` with the input quantised per tensor (scale = amax/448); any error
    there falls back to the dequantising path for good. The state dict keys (`weight`, `scale_weight`, `bias`)
    are those of ComfyUI's scaled-fp8 format.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16, fp8_matmul: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.zeros((out_features, in_features), dtype=E4M3, device=device),
                                         requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.fp8_matmul = fp8_matmul

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, key: str = "", rounding: str = "nearest", seed: int = 0,
                    scale_mode: str = "pow2", fp8_matmul: bool = False, tile_bytes: int | None = None) -> FP8Linear:
        w = linear.weight.data
        q, s = quantize_merged(w, (), key=key, rounding=rounding, seed=seed, scale_mode=scale_mode,
                               tile_bytes=tile_bytes)
        return cls.from_quantized(q, s, None if linear.bias is None else linear.bias.data, fp8_matmul=fp8_matmul)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                       *, fp8_matmul: bool = False) -> FP8Linear:
        if weight.dtype != E4M3 or weight.dim() != 2:
            raise FP8FormatError(
                f"FP8Linear needs a 2-D float8_e4m3fn weight, got {weight.dtype} {tuple(weight.shape)}"
            )
        s = check_scale(torch.as_tensor(scale), "scale_weight")
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.out_features, m.in_features = weight.shape
        m.weight = torch.nn.Parameter(weight, requires_grad=False)
        m.register_buffer("scale_weight", s.to(weight.device))
        m.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        m.fp8_matmul = fp8_matmul
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8_matmul={self.fp8_matmul}")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        w = self.weight.to(device=device or self.weight.device)
        return w.to(dtype) * self.scale_weight.to(device=w.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and _scaled_mm_ok(x, self.weight):
            try:
                return self._forward_scaled_mm(x)
            except (RuntimeError, TypeError):
                self.fp8_matmul = False
        w = self.dequantized_weight(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return torch.nn.functional.linear(x, w, b)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = (x2.abs().amax().float() / FP8_MAX).clamp_(min=1e-12)
        xq = (x2.float() / sx).clamp_(-FP8_MAX, FP8_MAX).to(E4M3)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale_weight.to(x.device), bias=b,
                               out_dtype=x.dtype)
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(*shape[:-1], self.out_features)

    # ComfyUI's weight-patching protocol (model_patcher.get_key_weight): LoRAs ComfyUI itself patches in go
    # through these. set_weight keeps the current scale, like ComfyUI's scaled_fp8 ops, because ComfyUI's unpatch
    # restores only the weight; use lora_ops merges (fresh scales, exact undo) instead where possible.
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        s = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(s) if inplace else weight * s

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs):
        scaled = weight.float() / self.scale_weight.to(weight.device)
        q = round_e4m3(scaled, "nearest" if seed is None else "stochastic", 0 if seed is None else int(seed))
        if return_weight:
            return q
        if inplace_update:
            self.weight.data.copy_(q)
        else:
            self.weight = torch.nn.Parameter(q, requires_grad=False)
        return None


@dataclass
class CastReport:
    converted: list[str] = field(default_factory=list)  # bare weight names now fp8
    bytes_before: int = 0  # of the converted weights
    bytes_after: int = 0

    @property
    def saved_bytes(self) -> int:
        return self.bytes_before - self.bytes_after


def _parent(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (module.get_submodule(parent_name) if parent_name else module), child


def cast_module_fp8(
    module: torch.nn.Module,
    policy: str | FP8Policy = "default",
    *,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    fp8_matmul: bool = False,
    tile_bytes: int | None = None,
) -> CastReport:
    """Swap the Linears a policy selects for FP8Linear, in place (fresh per-tensor scale each).

    Module names may carry ComfyUI's prefixes (`diffusion_model.`). Every selected weight is checked first
    (finite, 2-D) so that a bad weight raises before anything is swapped; then layers are converted one at a
    time, so the extra memory is one layer's fp8 copy. Layers that are already FP8Linear are left alone.
    """
    pol = get_policy(policy)
    if rounding not in ROUNDINGS:
        raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")
    chosen: list[tuple[str, str, torch.nn.Linear]] = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and not isinstance(m, FP8Linear):
            key = strip_model_prefix(f"{name}.weight")[1]
            if pol.selects(key, m.weight.shape):
                chosen.append((name, key, m))
    for _, key, m in chosen:  # validate everything before changing anything
        w = m.weight.data
        if not w.dtype.is_floating_point:
            raise FP8FormatError(f"{key!r} has dtype {w.dtype}; only float weights can be cast to fp8")
        tile_rows = _tile_rows(w.shape[1], tile_bytes)
        for r0, r1 in _tiles(w.shape[0], tile_rows):
            _check_finite_tile(w[r0:r1].float(), key, r0, False)
    report = CastReport()
    for name, key, m in chosen:
        new = FP8Linear.from_linear(m, key=key, rounding=rounding, seed=seed, scale_mode=scale_mode,
                                    fp8_matmul=fp8_matmul, tile_bytes=tile_bytes)
        parent, child = _parent(module, name)
        setattr(parent, child, new)
        report.converted.append(key)
        report.bytes_before += m.weight.numel() * m.weight.element_size()
        report.bytes_after += new.weight.numel() + 4
    return report


def set_fp8_matmul(module: torch.nn.Module, enabled: bool) -> int:
    """Turn the `_scaled_mm` path of every FP8Linear on or off; returns how many layers."""
    n = 0
    for m in module.modules():
        if isinstance(m, FP8Linear):
            m.fp8_matmul = enabled
            n += 1
    return n


def load_fp8_into_module(module: torch.nn.Module, source, *, strict: bool = False) -> CastReport:
    """Replace a module's Linears by FP8Linear wherever a scaled-fp8 checkpoint stores fp8 weights, and load it.

    `source`: a path, a state dict or an FP8Checkpoint. Other tensors are copied into the module as usual.
    """
    ckpt = source if isinstance(source, FP8Checkpoint) else load_fp8_state_dict(source)
    bare = {strip_model_prefix(k)[1]: k for k in ckpt.tensors}
    report = CastReport()
    for name, m in list(module.named_modules()):
        if not isinstance(m, torch.nn.Linear) or isinstance(m, FP8Linear):
            continue
        key = strip_model_prefix(f"{name}.weight")[1]
        full = bare.get(key)
        if full is None or not _is_fp8(ckpt.tensors[full].dtype):
            continue
        q = ckpt.tensors[full]
        if q.dtype != E4M3:
            raise FP8FormatError(f"{full!r} is {q.dtype}; FP8Linear holds float8_e4m3fn only")
        if tuple(q.shape) != tuple(m.weight.shape):
            raise ModelMismatchError(f"{full!r} has shape {tuple(q.shape)}, the module {tuple(m.weight.shape)}")
        bias_key = bare.get(key[: -len(".weight")] + ".bias")
        bias = None
        if m.bias is not None:
            bias = ckpt.weight(bias_key, m.bias.dtype) if bias_key else m.bias.data
        scale = ckpt.scales[full]
        if scale.numel() != 1:  # per-row scales (newer ComfyUI files): one fresh per-tensor scale instead
            q, scale = quantize_merged(q, (), key=full, weight_scale=scale)
        new = FP8Linear.from_quantized(q.to(m.weight.device), scale, bias)
        parent, child = _parent(module, name)
        setattr(parent, child, new)
        report.converted.append(key)
        report.bytes_before += m.weight.numel() * m.weight.element_size()
        report.bytes_after += q.numel() + 4
    rest = {}
    done = set(report.converted) | {k[: -len(".weight")] + ".bias" for k in report.converted}
    own_sd = module.state_dict()
    own = {strip_model_prefix(k)[1]: k for k in own_sd}
    for name, full in bare.items():
        if name in done or name not in own:
            continue
        rest[own[name]] = ckpt.weight(full, own_sd[own[name]].dtype)
    module.load_state_dict(rest, strict=strict)
    return report


# ---------------------------------------------------------------------------------------------
# In-place merges into fp8 weights (the engine's Codec hook)
# ---------------------------------------------------------------------------------------------


class ScaledFP8Codec(Codec):
    """Per-tensor scaled float8_e4m3fn storage whose scale is recomputed from the merged tensor.

    `scale` is the live 0-dim tensor next to the weight (a module buffer / Parameter or a state-dict entry);
    it is updated in `commit` and put back in `rollback`. Decoding/encoding use the scale of the role (see
    Codec); "new" is rounded as configured, the others to nearest.
    """

    def __init__(self, key: str, scale: torch.Tensor, *, rounding: str = "nearest", seed: int = 0,
                 scale_mode: str = "pow2") -> None:
        super().__init__(E4M3)
        if rounding not in ROUNDINGS:
            raise LoRAOpsError(f"rounding {rounding!r}: use one of {ROUNDINGS}")
        self.key = key
        self.scale = scale
        self.current = float(check_scale(scale, key))
        self.base = self.current
        self.new = self.current
        self.rounding = rounding
        self.seed32 = key_seed(key, seed)
        self.scale_mode = scale_mode

    def _scale(self, role: str) -> float:
        return {"current": self.current, "base": self.base, "new": self.new}[role]

    def decode(self, stored: torch.Tensor, role: str = "current") -> torch.Tensor:
        return stored.to(torch.float32) * self._scale(role)

    def encode(self, values: torch.Tensor, key: str, row0: int, role: str = "new") -> torch.Tensor:
        scaled = values / self._scale(role)
        if role == "new" and self.rounding == "stochastic":
            cols = values.shape[1] if values.dim() > 1 else 1
            return round_e4m3(scaled, "stochastic", self.seed32, row0 * cols)
        return round_e4m3(scaled, "nearest")

    def begin(self, job, tile_rows: int) -> None:
        states = job.state.codec_state
        entry_key = f"fp8_base_scale:{self.key}"
        self.base = float(states.get(entry_key, self.current)) if job.old else self.current
        if not job.new:
            self.new = self.base
            states.pop(entry_key, None)
            return
        amax = 0.0
        for r0 in range(0, job.matrix.shape[0], tile_rows):
            r1 = min(job.matrix.shape[0], r0 + tile_rows)
            amax = max(amax, _check_finite_tile(job.merged_rows(r0, r1), self.key, r0, True))
        self.new = fresh_scale(amax, self.scale_mode)
        states[entry_key] = self.base

    def commit(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.new)

    def rollback(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.current)


class PlainFP8Codec(Codec):
    """Unscaled float8_e4m3fn (a plain fp8 model, or ComfyUI's fp8 biases): scale 1, saturating at ±448."""

    def __init__(self, rounding: str = "nearest", seed: int = 0, key: str = "") -> None:
        super().__init__(E4M3)
        self.rounding = rounding
        self.seed32 = key_seed(key, seed)

    def encode(self, values: torch.Tensor, key: str, row0: int, role: str = "new") -> torch.Tensor:
        if role == "new" and self.rounding == "stochastic":
            cols = values.shape[1] if values.dim() > 1 else 1
            return round_e4m3(values, "stochastic", self.seed32, row0 * cols)
        return round_e4m3(values, "nearest")


def _scale_tensors(target: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bare weight name → the live scale tensor of that weight."""
    if isinstance(target, torch.nn.Module):
        items = [*target.named_buffers(), *target.named_parameters()]
    else:
        items = list(target.items())
    out = {}
    for name, t in items:
        if name.endswith(SCALE_SUFFIX):
            out[strip_model_prefix(name)[1][: -len(SCALE_SUFFIX)] + ".weight"] = t
    return out


def fp8_merge_options(
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    options: MergeOptions | None = None,
) -> MergeOptions:
    """MergeOptions whose codec_for gives fp8 weights a fresh-scale ScaledFP8Codec (others: the default).

    A model with no scales at all is a plain fp8 model: its weights keep scale 1 (`PlainFP8Codec`), as do fp8
    biases. In a scaled model, an fp8 weight without a (positive, finite) scale raises FP8FormatError.
    """
    scales = _scale_tensors(target)
    opts = options or MergeOptions()

    def codec_for(key: str, weight: torch.Tensor) -> Codec:
        if weight.dtype == E4M3:
            if key not in scales and (not scales or not key.endswith(".weight")):
                return PlainFP8Codec(rounding, seed, key)
            if key not in scales:
                raise FP8FormatError(
                    f"{key!r} is float8_e4m3fn but has no {key[: -len('.weight')] + SCALE_SUFFIX!r}; without its "
                    "scale the weight cannot be merged. Load the model with its scales (scaled fp8)."
                )
            return ScaledFP8Codec(key, scales[key], rounding=rounding, seed=seed, scale_mode=scale_mode)
        if _is_fp8(weight.dtype):
            raise FP8FormatError(f"{key!r} is {weight.dtype}; in-place fp8 merges support float8_e4m3fn only")
        return Codec(weight.dtype)

    return MergeOptions(
        tile_bytes=opts.tile_bytes, compute_device=opts.compute_device, on_tile=opts.on_tile, progress=opts.progress,
        codec_for=codec_for, min_tile_bytes=opts.min_tile_bytes, exact_undo=opts.exact_undo,
    )


def merge_loras_fp8(
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    loras: Sequence[tuple[LoRAFile, float]],
    *,
    state: MergeState | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    options: MergeOptions | None = None,
    report: MergeReport | None = None,
) -> MergeState:
    """`merge_loras` for a model whose large Linears are scaled fp8 (FP8Linear, ComfyUI scaled-fp8 ops or a
    state dict with `scale_weight` keys): fresh scales, exact undo, all-or-nothing. Pass the returned state to
    the next call (other LoRAs / strengths, or `[]` to restore the original bits and scales)."""
    opts = fp8_merge_options(target, rounding=rounding, seed=seed, scale_mode=scale_mode, options=options)
    return merge_loras(target, loras, state=state, options=opts, report=report)
