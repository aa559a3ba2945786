"""ComfyUI's quantized weights (`QuantizedTensor` of comfy/quant_ops.py, comfy_kitchen layouts) as the merge engine
sees them, and the check that every merge reached the weights.

A `QuantizedTensor` reports its logical dtype and shape, but its bits live in `_qdata` (the payload) and
`_params.scale`; an in-place write into the wrapper itself is dispatched to a dequantised temporary and lost (the
"merged, nothing changed" failure). So the engine gets the live payload and scale of every per-tensor fp8 layer
(`TensorCoreFP8E4M3Layout` / `…E5M2Layout`): `lora_ops.fp8.merge_loras_fp8` dequantises, adds in fp32 and
requantises once with a fresh scale into the same payload and scale tensors, with exact undo. Every other layout
(nvfp4, mxfp8, int8, …) and any other tensor subclass is refused, naming the layer, before anything changes.
After a fresh merge, every weight the stack names is checked: kept bits are an error unless the same merge on a
copy keeps them too (a change too small to show at that precision).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..lora_ops import LoRAFile, LoRAOpsError, MergeOptions, MergeState, changes_on_copies, checksums
from ..lora_ops.fp8 import merge_loras_fp8

#: comfy_kitchen / ComfyUI layouts holding one fp8 payload with one fp32 scale per tensor
PER_TENSOR_FP8_LAYOUTS = ("TensorCoreFP8Layout", "TensorCoreFP8E4M3Layout", "TensorCoreFP8E5M2Layout")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def native_fp8_format() -> str:
    """The fp8 form this ComfyUI loads natively (what ModelSave should write for a CastFluxFP8 model): comfy_quant
    where it has quantized tensors (0.33 and later), scaled_fp8 on 0.3.x, which reads comfy_quant files unscaled."""
    return "comfy_quant" if importlib.util.find_spec("comfy.quant_ops") is not None else "scaled_fp8"


def is_quantized(tensor) -> bool:
    """A ComfyUI QuantizedTensor (duck-typed: the pack also runs on ComfyUI versions without quant_ops)."""
    return all(hasattr(tensor, a) for a in ("_qdata", "_params", "_layout_cls"))


def _per_tensor_fp8(t) -> bool:
    scale = getattr(t._params, "scale", None)
    return (
        t._layout_cls in PER_TENSOR_FP8_LAYOUTS
        and t._qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        and tuple(t._qdata.shape) == tuple(t.shape)
        and isinstance(scale, torch.Tensor)
        and scale.numel() == 1
    )


def layout_of(tensor, module=None) -> str:
    """How a weight is stored, in the user's words: the comfy_quant format (and layout) or the tensor type."""
    if is_quantized(tensor):
        fmt = getattr(module, "quant_format", None)
        return f"{fmt} ({tensor._layout_cls})" if fmt else tensor._layout_cls
    return type(tensor).__name__


def writable(tensor) -> bool:
    """Whether the engine can merge into this weight in place (plain tensor, or per-tensor fp8 parts)."""
    return _per_tensor_fp8(tensor) if is_quantized(tensor) else type(tensor) in _PLAIN_TYPES


def refuse_unwritable(modules: Mapping[str, torch.nn.Module], keys: Iterable[str], lora_name: str = "") -> None:
    """Raise a clear error naming the first weight in `keys` stored in a layout the pack cannot merge into."""
    for key in sorted(keys):
        layer, _, pname = key.rpartition(".")
        module = modules.get(layer)
        tensor = getattr(module, pname, None) if module is not None else None
        if tensor is None or writable(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor):
            continue
        stored = layout_of(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor, module)
        raise LoRAOpsError(
            f"{lora_name + ': ' if lora_name else ''}layer {layer!r} is stored as {stored}; merging a LoRA into "
            "that layout is not supported (quantized layers: per-tensor fp8 float8_e4m3fn / float8_e5m2 only). "
            "Load the bf16 or an fp8 version of the model. Nothing was changed."
        )


def engine_view(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights as the engine writes them: per-tensor fp8 QuantizedTensors as their live payloads, plus the
    live scale of each; everything else as it is."""
    view, scales = {}, {}
    for key, t in weights.items():
        if is_quantized(t) and _per_tensor_fp8(t):
            view[key], scales[key] = t._qdata, t._params.scale
        else:
            view[key] = t
    return view, scales


def stored_bits(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What each weight really stores, whatever the engine is given: a QuantizedTensor's payload (and its scale,
    when it has one per tensor), any other tensor as it is. The merge check reads these."""
    bits, scales = {}, {}
    for key, t in weights.items():
        if is_quantized(t):
            bits[key] = t._qdata
            scale = getattr(t._params, "scale", None)
            if isinstance(scale, torch.Tensor) and scale.numel() == 1:
                scales[key] = scale
        else:
            bits[key] = t
    return bits, scales


def _claimed(loras: Sequence[tuple[LoRAFile, float]]) -> set[str]:
    return {k for lora, s in loras if s != 0.0 for k in lora.targets}


def merge(
    weights: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoRAFile, float]],
    *,
    state: MergeState | None = None,
    options: MergeOptions | None = None,
) -> MergeState:
    """`merge_loras` on a ComfyUI model's live weights, quantized ones included; a fresh merge (no `state`) is
    verified, and a weight it should have changed but did not is an error (everything put back first)."""
    keys = _claimed(loras) | _claimed(state.stack if state is not None else [])
    bad = sorted(k for k in keys if k in weights and not writable(weights[k]))
    if bad:
        raise LoRAOpsError(
            f"weight {bad[0]!r} is stored as {layout_of(weights[bad[0]])}, which the in-place merge cannot write "
            "(quantized layers: per-tensor fp8 only). Nothing was changed."
        )
    view, scales = engine_view(weights)
    checked = sorted(_claimed(loras) & view.keys()) if state is None else []
    bits, bit_scales = stored_bits(weights)
    before = checksums(bits, checked, bit_scales)
    new_state = merge_loras_fp8(view, loras, scales=scales, state=state, options=options)
    bits, bit_scales = stored_bits(weights)
    after = checksums(bits, checked, bit_scales)
    kept = [k for k in checked if after[k] == before[k]]
    if kept:
        lost = changes_on_copies(bits, loras, kept, bit_scales, options)
        if lost:
            merge_loras_fp8(view, [], scales=scales, state=new_state, options=options)
            raise LoRAOpsError(
                f"{len(lost)} weight(s) kept their bits although the LoRA changes them (e.g. {sorted(lost)[0]!r}, "
                f"stored as {layout_of(weights[sorted(lost)[0]])}): the merge did not reach the model's weights. "
                "Nothing was changed; please report this with your ComfyUI version."
            )
    return new_state


def restore_weights(
    weights: Mapping[str, torch.Tensor], state: MergeState, *, options: MergeOptions | None = None
) -> None:
    """`lora_ops.restore` on a ComfyUI model's live weights, quantized ones included (bits and scales exact)."""
    view, scales = engine_view(weights)
    merge_loras_fp8(view, [], scales=scales, state=state, options=options)
