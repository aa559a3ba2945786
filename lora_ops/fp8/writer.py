"""Writing fp8 checkpoints: the output plan and the conversion of each source tensor, streamed by the writer
every offline output shares (`offline.write_converted`).

Two file formats, the same fp8 bits and scales:
- `comfy_quant` (default): what ComfyUI reads natively since it has quantized tensors (0.33 and later): per layer
  `<layer>.weight` (float8_e4m3fn), `<layer>.weight_scale` (fp32) and `<layer>.comfy_quant` (its layout as
  JSON bytes), plus the `_quantization_metadata` header listing the layers. ComfyUI 0.3.64 does not know this
  form and would read the fp8 weights without their scales.
- `scaled_fp8`: ComfyUI 0.3.x's form, a `scaled_fp8` marker tensor and `<layer>.scale_weight`; later ComfyUI
  versions translate it on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoRAFormatError, LoRAOpsError
from ..flux import strip_model_prefix
from ..formats import LoRAFile, check_fits
from ..merge import terms_by_target
from ..offline import merged_stack_metadata, open_for_rewrite, write_converted
from .checkpoint import (
    MARKER,
    NEW_QUANT_SUFFIX,
    NEW_SCALE_SUFFIX,
    QUANT_METADATA,
    SCALE_SUFFIX,
    ScaleTable,
    comfy_quant_layer,
    comfy_quant_tensor,
    scale_table,
)
from .merged_rows import Term, merge_rows_to, quantize_merged
from .policies import FP8Policy, get_policy
from .quantize import E4M3, SCALE_MODES, check_rounding, check_scale, is_fp8

FILE_FORMATS = ("comfy_quant", "scaled_fp8")


def check_file_format(file_format: str) -> None:
    if file_format not in FILE_FORMATS:
        raise LoRAOpsError(
            f"fp8 file format {file_format!r}: use comfy_quant (ComfyUI 0.33 and later) or scaled_fp8 (ComfyUI 0.3.x)"
        )


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
    file_format: str = "comfy_quant"

    def is_fp8_output(self, key: str) -> bool:
        dtype, shape = self.source[key]
        return self.policy.selects(key, shape) and dtype.is_floating_point

    def out_dtype(self, key: str) -> torch.dtype:
        """dtype of a tensor the policy keeps: its own, except that fp8/scaled sources become `other_dtype`."""
        dtype, _ = self.source[key]
        if is_fp8(dtype) or key in self.table.scale_keys:
            return self.other_dtype
        return dtype

    def layer_extras(self, key: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of the tensors written after an fp8 weight: its scale (+ its comfy_quant entry)."""
        layer = key[: -len(".weight")]
        if self.file_format == "scaled_fp8":
            return [(layer + SCALE_SUFFIX, torch.float32, ())]
        size = comfy_quant_tensor(comfy_quant_layer(self.fp8_matmul)).numel()
        return [(layer + NEW_SCALE_SUFFIX, torch.float32, ()), (layer + NEW_QUANT_SUFFIX, torch.uint8, (size,))]

    def plan(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of every output tensor, in writing order."""
        out = [(k, t.dtype, tuple(t.shape)) for k, t in self.leading()]
        for key in self.sources():
            shape = self.source[key][1]
            if self.is_fp8_output(key):
                out.append((key, E4M3, shape))
                out.extend(self.layer_extras(key))
            else:
                out.append((key, self.out_dtype(key), shape))
        return out

    def header(self, source_metadata: Mapping[str, str]) -> dict[str, str]:
        """The file's metadata: the source's, with the layer list of a comfy_quant file (a stale one dropped)."""
        meta = {k: v for k, v in source_metadata.items() if k != QUANT_METADATA}
        if self.file_format == "comfy_quant":
            conf = comfy_quant_layer(self.fp8_matmul)
            layers = {k[: -len(".weight")]: conf for k in self.source if k not in self.table.aux and
                      self.is_fp8_output(k)}
            meta[QUANT_METADATA] = json.dumps({"format_version": "1.0", "layers": layers})
        return meta

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
            extras = self.layer_extras(key)
            out = [(key, q.cpu() if self.device is not None else q), (extras[0][0], s)]
            if len(extras) > 1:
                out.append((extras[1][0], comfy_quant_tensor(comfy_quant_layer(self.fp8_matmul))))
            return out
        dtype = self.out_dtype(key)
        if not terms and in_scale is None and tensor.dtype == dtype:
            return [(key, tensor)]
        if not terms and in_scale is None:
            return [(key, tensor.to(dtype))]
        merged = merge_rows_to(tensor, terms, dtype, key=key, weight_scale=in_scale, tile_bytes=self.tile_bytes,
                               device=self.device)
        return [(key, merged.cpu() if self.device is not None else merged)]

    def leading(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors written before the model's: a scaled_fp8 file's marker (2 elements: no fp8 matmuls)."""
        if self.file_format != "scaled_fp8":
            return []
        return [(self.prefix + MARKER, torch.zeros((0,) if self.fp8_matmul else (2,), dtype=E4M3))]

    def sources(self) -> list[str]:
        """Source keys that become output tensors (scales and markers are read through `get` instead)."""
        return [key for key in self.source if key not in self.table.aux]

    def iter_tensors(self, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) in `plan()` order, reading one source tensor at a time through `get`."""
        yield from self.leading()
        for key in self.sources():
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
    file_format: str = "comfy_quant",
) -> FP8Conversion:
    """Plan a conversion of a checkpoint with `source` = {key: (dtype, shape)} (+ LoRAs) to scaled fp8, written
    in `file_format` ("comfy_quant" or "scaled_fp8", see the module docstring).

    Checks up front (raising before anything is written): the policy, rounding and format names, that every LoRA
    fits the model, that LoRA factors are finite, and that a scaled source has a scale for every fp8 weight.
    """
    check_rounding(rounding)
    check_file_format(file_format)
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
                         device, _prefix_of(k for k in source if k not in table.aux), file_format)


def merge_to_fp8(
    state_dict: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoRAFile, float]] = (),
    policy: str | FP8Policy = "default",
    **kw,
) -> dict[str, torch.Tensor]:
    """bf16 (or fp8) Flux state dict + LoRAs → a new scaled-fp8 state dict, one tensor at a time (`file_format=`
    names the keys, see the module docstring; the comfy_quant header itself exists only in files).

    Each fp8 tensor gets a fresh scale from base + every LoRA's change, rounded once (`rounding=` "nearest"
    or "stochastic"; `seed=`). Tensors the policy keeps are merged in fp32 and stored in their 16-bit dtype;
    untouched ones are shared, not copied. The input is never modified; on an error nothing is returned.
    Keyword options as `fp8_conversion`.
    """
    conv = fp8_conversion({k: (v.dtype, tuple(v.shape)) for k, v in state_dict.items()}, loras, policy, **kw)
    return dict(conv.iter_tensors(state_dict.__getitem__))



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
    file_format: str = "comfy_quant",
) -> dict[str, object]:
    """The CLI's `merge --dtype fp8` and `cast` (no LoRAs): a Flux checkpoint (+ LoRAs) → a scaled-fp8 file in
    `file_format` ("comfy_quant" for ComfyUI 0.33 and later, "scaled_fp8" for ComfyUI 0.3.x).

    The source may be bf16/fp16/fp32, scaled fp8 (either form) or plain fp8. Returns a summary (counts and bytes).
    Streamed by the writer every offline output shares (`offline.write_converted`).
    """
    out_path = Path(out_path)
    pol = get_policy(policy)
    model = open_for_rewrite(model_path, loras, out_path)
    conv = fp8_conversion({k: (model.dtype(k), model.shape(k)) for k in model.keys()}, loras, pol,
                          rounding=rounding, seed=seed, fp8_matmul=fp8_matmul, device=device, path=model_path,
                          file_format=file_format)
    meta = conv.header(model.metadata)
    meta["lora_ops.fp8"] = f"policy={pol.name} rounding={rounding} seed={seed} scale={conv.scale_mode}"
    if loras:
        meta["lora_ops.merged"] = merged_stack_metadata(loras)
    write_converted(model, conv, out_path, meta, progress)
    sources = conv.sources()
    merged = sum(1 for k in sources if strip_model_prefix(k)[1] in conv.terms)
    fp8_count = sum(1 for k in sources if conv.is_fp8_output(k))
    nbytes = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in conv.plan())
    return {"out": str(out_path), "tensors": len(sources), "merged": merged, "dtype": "fp8", "policy": pol.name,
            "fp8_tensors": fp8_count, "bytes": nbytes, "format": file_format}
