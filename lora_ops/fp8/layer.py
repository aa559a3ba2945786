"""FP8Linear (a Linear holding float8_e4m3fn + one scale) and casting or loading a module into it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ModelMismatchError
from ..flux import strip_model_prefix
from ..rows import DEFAULT_TILE_BYTES, FP8_BUFFERS, tile_rows_for, tiles
from .checkpoint import (
    NEW_QUANT_SUFFIX,
    NEW_SCALE_SUFFIX,
    SCALE_SUFFIX,
    FP8Checkpoint,
    comfy_quant_layer,
    comfy_quant_tensor,
    load_fp8_state_dict,
)
from .merged_rows import Term, _check_finite_tile, merge_rows_to, quantize_merged
from .policies import FP8Policy, get_policy
from .quantize import E4M3, FP8_MAX, FP8FormatError, check_rounding, check_scale, is_fp8, round_fp8


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
    there falls back to the dequantising path for good.

    The state dict (what ComfyUI's ModelSave writes) is in `file_format`: "comfy_quant" (`weight`, `weight_scale`,
    `comfy_quant`, `bias`: what ComfyUI with quantized tensors loads natively) or "scaled_fp8" (`weight`,
    `scale_weight`, `bias`: ComfyUI 0.3.x's per-layer names). Both are read back.
    """

    file_format = "comfy_quant"

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

    @classmethod
    def empty(cls, in_features: int, *, fp8_matmul: bool = False) -> FP8Linear:
        """A slot with no rows yet (a few bytes): `fill` gives it its weight, `release` frees it again."""
        return cls.from_quantized(torch.empty((0, in_features), dtype=E4M3), 1.0, None, fp8_matmul=fp8_matmul)

    @property
    def is_empty(self) -> bool:
        return self.out_features == 0

    def fill(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        terms: Sequence[Term] = (),
        bias_terms: Sequence[Term] = (),
        name: str = "",
        rounding: str = "nearest",
        seed: int = 0,
        scale_mode: str = "pow2",
        tile_bytes: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Become quantise(weight + Σ coeff·ΔW): a fresh scale, rounded once, tile by tile.

        `weight` is the 16-bit original (never changed); `bias` (+ `bias_terms`) keeps its own dtype. `name` is
        the layer's name: it seeds stochastic rounding and names the layer in errors. Everything is computed
        before anything is assigned, so an error leaves the slot as it was. The result lives on `device`
        (default: the weight's).
        """
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ModelMismatchError(
                f"{name or 'FP8Linear'}: a weight of shape {tuple(weight.shape)} does not fit a slot with "
                f"{self.in_features} input features"
            )
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        q, scale = quantize_merged(weight, terms, key=wkey, rounding=rounding, seed=seed, scale_mode=scale_mode,
                                   tile_bytes=tile_bytes, device=device)
        b = None
        if bias is not None:
            b = merge_rows_to(bias, bias_terms, bias.dtype, key=bkey, tile_bytes=tile_bytes, device=device)
        elif bias_terms:
            raise ModelMismatchError(f"{bkey!r}: the LoRA changes a bias this layer does not have")
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.scale_weight = scale.to(q.device)
        self.bias = None if b is None else torch.nn.Parameter(b, requires_grad=False)
        self.out_features = q.shape[0]

    def release(self) -> None:
        """Free the weight and bias (the slot keeps its input width and can be filled again)."""
        self.weight = torch.nn.Parameter(torch.empty((0, self.in_features), dtype=E4M3), requires_grad=False)
        self.scale_weight = torch.ones((), dtype=torch.float32)
        self.bias = None
        self.out_features = 0

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.file_format == "comfy_quant":
            destination[prefix + NEW_SCALE_SUFFIX[1:]] = destination.pop(prefix + SCALE_SUFFIX[1:])
            destination[prefix + NEW_QUANT_SUFFIX[1:]] = comfy_quant_tensor(comfy_quant_layer(self.fp8_matmul))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + NEW_SCALE_SUFFIX[1:] in state_dict:  # the comfy_quant names
            state_dict[prefix + SCALE_SUFFIX[1:]] = state_dict.pop(prefix + NEW_SCALE_SUFFIX[1:])
        state_dict.pop(prefix + NEW_QUANT_SUFFIX[1:], None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        q = round_fp8(scaled, "nearest" if seed is None else "stochastic", 0 if seed is None else int(seed))
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
    check_rounding(rounding)
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
        tile_rows = tile_rows_for(w.shape[1], tile_bytes or DEFAULT_TILE_BYTES, 0, FP8_BUFFERS)
        for r0, r1 in tiles(w.shape[0], tile_rows):
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
        if full is None or not is_fp8(ckpt.tensors[full].dtype):
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


