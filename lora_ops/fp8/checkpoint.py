"""Reading fp8 checkpoints: our files, ComfyUI's (legacy `scaled_fp8` and `comfy_quant`), plain fp8, 16-bit."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..flux import strip_model_prefix
from ..safetensors_io import SafetensorsFile
from .quantize import FP8FormatError, check_scale, dequantize, is_fp8

MARKER = "scaled_fp8"
SCALE_SUFFIX = ".scale_weight"
INPUT_SCALE_SUFFIX = ".scale_input"
#: newer ComfyUI (`comfy_quant`) names
NEW_SCALE_SUFFIX = ".weight_scale"
NEW_QUANT_SUFFIX = ".comfy_quant"
NEW_INPUT_SCALE_SUFFIX = ".input_scale"
#: the safetensors header entry of comfy_quant files listing each quantized layer and its format
QUANT_METADATA = "_quantization_metadata"


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
    fp8_weights = [k for k, d in dtypes.items() if is_fp8(d) and k not in aux and k != marker]
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
            f"has no {missing[0][:-len('.weight')] + (NEW_SCALE_SUFFIX if has_new else SCALE_SUFFIX)!r}); the file "
            "is incomplete or was edited. "
            "Re-export it, or cast the original bf16 model again."
        )
    return ScaleTable(kind, marker, None, scale_keys, unscaled, aux)


#: comfy_quant layouts that are one fp8 payload with one scale per tensor (the ones this pack reads and merges)
PER_TENSOR_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def comfy_quant_layer(fp8_matmul: bool = False) -> dict[str, object]:
    """The layout entry of one float8_e4m3fn layer, as ComfyUI translates a scaled_fp8 file with the same marker
    (without fp8 matmuls ComfyUI dequantises the weight and multiplies in the compute dtype)."""
    conf: dict[str, object] = {"format": "float8_e4m3fn"}
    if not fp8_matmul:
        conf["full_precision_matrix_mult"] = True
    return conf


def comfy_quant_tensor(conf: Mapping[str, object]) -> torch.Tensor:
    """A layer's `comfy_quant` entry: its layout JSON as uint8 bytes (ComfyUI's own encoding)."""
    return torch.tensor(list(json.dumps(dict(conf)).encode("utf-8")), dtype=torch.uint8)


def comfy_quant_layers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, dict]:
    """Layer name → its comfy_quant entry (`format`, …), from the `_quantization_metadata` header and the
    per-layer `<layer>.comfy_quant` tensors (JSON bytes)."""
    out: dict[str, dict] = {}
    header = metadata.get(QUANT_METADATA)
    if header:
        out.update(json.loads(header).get("layers", {}))
    for key, t in tensors.items():
        if key.endswith(NEW_QUANT_SUFFIX):
            out[key[: -len(NEW_QUANT_SUFFIX)]] = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
    return out


def refuse_other_layouts(layers: Mapping[str, dict], path: object = None) -> None:
    """Raise FP8FormatError naming the first layer whose layout is not per-tensor fp8 (nvfp4, mxfp8, int8, …)."""
    other = {name: str(c.get("format")) for name, c in layers.items() if c.get("format") not in PER_TENSOR_FP8_FORMATS}
    if other:
        layer, fmt = next(iter(other.items()))
        where = f"{path}: " if path is not None else ""
        raise FP8FormatError(
            f"{where}layer {layer!r} is stored as {fmt} ({len(other)} such layer(s)); this pack reads and merges "
            f"per-tensor fp8 only ({', '.join(PER_TENSOR_FP8_FORMATS)}). Use the bf16 model instead."
        )


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
        return [k for k, t in self.tensors.items() if is_fp8(t.dtype)]


def load_fp8_state_dict(source: str | Path | Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu"
                        ) -> FP8Checkpoint:
    """Read our scaled-fp8 files, ComfyUI's scaled-fp8 files (legacy and `comfy_quant`), plain fp8 or 16-bit files.

    Raises FP8FormatError when a scaled checkpoint's fp8 weight has no scale, or a scale is zero, negative,
    NaN or Inf, or a comfy_quant layer has another layout (nvfp4, mxfp8, int8, …). Nothing is changed on disk.
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
    layers = comfy_quant_layers(raw, metadata)
    refuse_other_layouts(layers, path)
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
    elif layers:
        fp8_matmul = not any(c.get("full_precision_matrix_mult") for c in layers.values())
    kind = "comfy_quant" if layers and table.marker is None else table.kind
    return FP8Checkpoint(tensors, scales, kind, fp8_matmul, inputs, metadata)


def dequantize_state_dict(source, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Any checkpoint `load_fp8_state_dict` reads → a plain state dict in `dtype`."""
    return load_fp8_state_dict(source).dequantized(dtype)


