"""Which file a MODEL was loaded from, and putting merged weights back from it when an exact undo is impossible.

The reload itself is `lora_ops.restore_from_file` (every weight checked against the fingerprint of its original
bits before any is written); this module only finds the file:

* ComfyUI 0.33 keeps the loader's call on the patcher: UNETLoader's `comfy.sd.load_diffusion_model` sets
  `cached_patcher_init = (load_diffusion_model, (unet_path, model_options))` (comfy/sd.py:2361) and
  CheckpointLoaderSimple's `load_checkpoint_guess_config` sets `(load_checkpoint_guess_config, (ckpt_path, ...), 0)`
  (comfy/sd.py:2094). The path is noted on the Record when the stack is merged.
* Otherwise (0.3.x, or when that file does not match) the .safetensors files of ComfyUI's `diffusion_models` and
  `checkpoints` folders are searched (`lora_ops.find_model_file`: headers, then one small weight); the file found is
  remembered on the model for the next time.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import folder_paths
import torch

from ..lora_ops import LoRAOpsError, MergeState, UndoError, find_model_file, merged_keys, restore_from_file

log = logging.getLogger("flux_lora_ops")

#: Attribute of the shared BaseModel remembering the file its weights were found to come from.
SOURCE_ATTR = "flux_lora_ops_source"
_LOADERS = ("load_diffusion_model", "load_checkpoint_guess_config")
_FOLDERS = ("diffusion_models", "checkpoints")
_SAFETENSORS = (".safetensors", ".sft")


def source_of(patcher) -> str | None:
    """The file ComfyUI's loader read (0.33: cached_patcher_init), else the one found earlier; None if unknown."""
    init = getattr(patcher, "cached_patcher_init", None)
    if init and getattr(init[0], "__name__", "") in _LOADERS and init[1] and isinstance(init[1][0], (str, os.PathLike)):
        return os.fspath(init[1][0])
    return patcher.model.__dict__.get(SOURCE_ATTR)


def candidates() -> list[str]:
    """Every .safetensors file in ComfyUI's diffusion_models and checkpoints folders (full paths)."""
    out = []
    for folder in _FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        for name in names:
            if name.lower().endswith(_SAFETENSORS):
                full = folder_paths.get_full_path(folder, name)
                if full:
                    out.append(full)
    return out


def reload_merged(model, weights: dict[str, torch.Tensor], state: MergeState, source: str | None,
                  error: UndoError) -> bool:
    """After `error`: every weight `state` merged, and every weight the failed call had begun merging afresh
    (`error.originals`), reloaded from the model file (checked); False when no file fits (nothing changed then, and
    the caller raises `error`). Quantized or scaled fp8 weights are never reloaded."""
    if error.originals:
        state = dataclasses.replace(state, fingerprints={**error.originals, **state.fingerprints})
    keys = merged_keys(state)
    problems = [f"{k!r} is not one of the merged weights, so it cannot be checked" for k in error.keys if k not in keys]
    found = None if problems else _reload_first(weights, state, source, problems)
    if found is None:
        why = "; ".join(problems) or "no file in ComfyUI's diffusion_models or checkpoints folders is its model file"
        log.error(
            "Flux LoRA Ops: %d merged weights (e.g. %s) cannot be taken out exactly (%s), and they could not be "
            "reloaded from the model file: %s. Reload the model",
            len(keys), ", ".join(keys[:3]), error, why,
        )
        return False
    model.__dict__[SOURCE_ATTR] = found
    log.warning(
        "Flux LoRA Ops: the merged LoRAs could not be taken out exactly (%s); reloaded the %d merged weights from %s "
        "instead (each checked against the fingerprint of its original bits)", error, len(keys), found,
    )
    return True


def _reload_first(weights: dict[str, torch.Tensor], state: MergeState, source: str | None,
                  problems: list[str]) -> str | None:
    """The known file if it fits, else the one found in ComfyUI's model folders, reloaded; None when none fits."""
    if source is not None and _reload(weights, source, state, problems):
        return source
    found = find_model_file([p for p in candidates() if p != source], weights, state.fingerprints)
    if found is not None and _reload(weights, os.fspath(found), state, problems):
        return os.fspath(found)
    return None


def _reload(weights: dict[str, torch.Tensor], path: str, state: MergeState, problems: list[str]) -> bool:
    try:
        with torch.inference_mode():
            restore_from_file(weights, path, state)
    except LoRAOpsError as refused:
        problems.append(str(refused))
        return False
    return True
