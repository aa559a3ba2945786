"""In-place merges into fp8 weights: the merge engine's Codec hooks for scaled and plain float8_e4m3fn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..flux import strip_model_prefix
from ..formats import LoRAFile
from ..merge import Codec, MergeOptions, MergeReport, MergeState, merge_loras
from .checkpoint import SCALE_SUFFIX
from .merged_rows import _check_finite_tile
from .quantize import E4M3, FP8FormatError, check_rounding, check_scale, fresh_scale, is_fp8, key_seed, round_e4m3


class ScaledFP8Codec(Codec):
    """Per-tensor scaled float8_e4m3fn storage whose scale is recomputed from the merged tensor.

    `scale` is the live 0-dim tensor next to the weight (a module buffer / Parameter or a state-dict entry);
    it is updated in `commit` and put back in `rollback`. Decoding/encoding use the scale of the role (see
    Codec); "new" is rounded as configured, the others to nearest.
    """

    def __init__(self, key: str, scale: torch.Tensor, *, rounding: str = "nearest", seed: int = 0,
                 scale_mode: str = "pow2") -> None:
        super().__init__(E4M3)
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
        if is_fp8(weight.dtype):
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
