"""In-place merges into fp8 weights: the merge engine's Codec hooks for scaled fp8 (e4m3fn or e5m2 payload with
one fp32 scale per tensor) and plain float8_e4m3fn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..flux import strip_model_prefix
from ..formats import LoRAFile
from ..merge import MergeOptions, MergeReport, MergeState, merge_loras
from ..rows import Codec
from .checkpoint import NEW_SCALE_SUFFIX, SCALE_SUFFIX
from .merged_rows import _check_finite_tile
from .quantize import E4M3, E5M2, FP8FormatError, check_rounding, check_scale, fresh_scale, is_fp8, key_seed, round_fp8


class ScaledFP8Codec(Codec):
    """Per-tensor scaled fp8 storage (`dtype` e4m3fn or e5m2) whose scale is recomputed from the merged tensor.

    `scale` is the live 0-dim tensor next to the weight (a module buffer / Parameter or a state-dict entry);
    it is updated in `commit` and put back in `rollback`. Decoding/encoding use the scale of the role (see
    Codec); "new" is rounded as configured, the others to nearest.
    """

    def __init__(self, key: str, scale: torch.Tensor, *, rounding: str = "nearest", seed: int = 0,
                 scale_mode: str = "pow2", dtype: torch.dtype = E4M3) -> None:
        super().__init__(dtype)
        check_rounding(rounding)
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
            return round_fp8(scaled, "stochastic", self.seed32, row0 * cols, self.dtype)
        return round_fp8(scaled, "nearest", dtype=self.dtype)

    def begin(self, merged, had_terms: bool, kept: dict[str, object]) -> None:
        entry_key = f"fp8_base_scale:{self.key}"
        self.base = float(kept.get(entry_key, self.current)) if had_terms else self.current
        if merged is None:
            self.new = self.base
            kept.pop(entry_key, None)
            return
        amax = 0.0
        for r0, tile in merged():
            amax = max(amax, _check_finite_tile(tile, self.key, r0, True))
        self.new = fresh_scale(amax, self.scale_mode, self.dtype)
        kept[entry_key] = self.base

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
            return round_fp8(values, "stochastic", self.seed32, row0 * cols)
        return round_fp8(values, "nearest")


def _scale_tensors(target: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bare weight name → the live scale tensor of that weight (`scale_weight` of scaled_fp8 files and
    FP8Linear, `weight_scale` of comfy_quant files)."""
    if isinstance(target, torch.nn.Module):
        items = [*target.named_buffers(), *target.named_parameters()]
    else:
        items = list(target.items())
    out = {}
    for name, t in items:
        for suffix in (SCALE_SUFFIX, NEW_SCALE_SUFFIX):
            if name.endswith(suffix):
                out[strip_model_prefix(name)[1][: -len(suffix)] + ".weight"] = t
    return out


def fp8_merge_options(
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    scales: Mapping[str, torch.Tensor] | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    options: MergeOptions | None = None,
) -> MergeOptions:
    """MergeOptions whose codec_for gives fp8 weights a fresh-scale ScaledFP8Codec (others: the default).

    `scales` (weight name → its live 0-dim fp32 scale) names the scaled weights explicitly; without it they are
    found by name (`<layer>.scale_weight` or `<layer>.weight_scale` next to `<layer>.weight`). A model with no
    scales at all is a plain fp8 model: its weights keep scale 1 (`PlainFP8Codec`), as do fp8 biases. In a scaled
    model, an fp8 weight without a (positive, finite) scale raises FP8FormatError.
    """
    scales = _scale_tensors(target) if scales is None else {strip_model_prefix(k)[1]: v for k, v in scales.items()}
    opts = options or MergeOptions()

    def codec_for(key: str, weight: torch.Tensor) -> Codec:
        if key in scales:
            if weight.dtype not in (E4M3, E5M2):
                raise FP8FormatError(f"{key!r} has a scale but is stored as {weight.dtype}, not fp8")
            return ScaledFP8Codec(key, scales[key], rounding=rounding, seed=seed, scale_mode=scale_mode,
                                  dtype=weight.dtype)
        if weight.dtype == E4M3:
            if not scales or not key.endswith(".weight"):
                return PlainFP8Codec(rounding, seed, key)
            raise FP8FormatError(
                f"{key!r} is float8_e4m3fn but has no {key[: -len('.weight')] + SCALE_SUFFIX!r}; without its "
                "scale the weight cannot be merged. Load the model with its scales (scaled fp8)."
            )
        if is_fp8(weight.dtype):
            raise FP8FormatError(f"{key!r} is {weight.dtype} without a scale; in-place merges into unscaled fp8 "
                                 "support float8_e4m3fn only")
        return Codec(weight.dtype)

    return MergeOptions(
        tile_bytes=opts.tile_bytes, compute_device=opts.compute_device, on_tile=opts.on_tile, progress=opts.progress,
        codec_for=codec_for, min_tile_bytes=opts.min_tile_bytes, exact_undo=opts.exact_undo,
    )


def merge_loras_fp8(
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    loras: Sequence[tuple[LoRAFile, float]],
    *,
    scales: Mapping[str, torch.Tensor] | None = None,
    state: MergeState | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    scale_mode: str = "pow2",
    options: MergeOptions | None = None,
    report: MergeReport | None = None,
) -> MergeState:
    """`merge_loras` for a model whose large Linears are per-tensor scaled fp8: fresh scales, exact undo,
    all-or-nothing. Pass the returned state to the next call (other LoRAs / strengths, or `[]` to restore the
    original bits and scales).

    `target` holds the fp8 payloads (float8_e4m3fn or float8_e5m2) next to any 16-bit weights: FP8Linear, a
    state dict with `scale_weight` keys, or any name → tensor mapping with `scales` naming each payload's live
    0-dim fp32 scale (e.g. the parts of another library's quantized tensor). Payloads and scales are changed in
    place: each merged weight is dequantised, the LoRA terms added in fp32, and the sum quantised once into
    the same fp8 dtype with a fresh scale.
    """
    opts = fp8_merge_options(target, scales=scales, rounding=rounding, seed=seed, scale_mode=scale_mode,
                             options=options)
    return merge_loras(target, loras, state=state, options=opts, report=report)
