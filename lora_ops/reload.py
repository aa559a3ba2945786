"""Put merged weights back from the model file when an exact undo is impossible.

`restore` refuses (UndoError) when taking a stack out would not give back the original bits, and a merge
made with exact_undo=False cannot be taken out at all. The original bits are still in the model file: each
merged weight is read from it one tensor at a time, cast to the live tensor's dtype (as the loader cast it),
and accepted only when its fingerprint equals the one the merge recorded for the original bits. The
fingerprint weighs each row by its absolute position and adds up per tile, so the whole weight's sum is the
sum the merge built tile by tile. A different file, another dtype or a changed file is refused by name
before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .errors import LoRAOpsError
from .flux import strip_model_prefix
from .journal import fingerprint
from .merge import MergeState, terms_by_target, weight_map
from .safetensors_io import SafetensorsFile
from .units import GIB

#: Weights up to this many bytes (cast) are kept in memory between the check and the write; beyond it they
#: are read again (and checked again) for the write, so memory never holds more than this plus one weight.
KEEP_BYTES = GIB

#: What a user does when a reload is refused.
FIX_RELOAD = "Reload the model from the file it was loaded from (in ComfyUI: run the loader again)."

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def weight_fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """The fingerprint of a whole weight as the merge engine records it (rows = first dimension)."""
    matrix = tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 2 else tensor
    return fingerprint(matrix.detach().cpu(), 0)


class _ModelFile:
    """A model file's tensors by bare BFL name (prefixes such as `model.diffusion_model.` stripped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LoRAOpsError(f"{self.path}: the model file to reload from is not there (moved or deleted?). "
                               f"Nothing was changed. {FIX_RELOAD}")
        self.file = SafetensorsFile(self.path)
        self.names: dict[str, str] = {}
        for key in self.file.keys():
            prefix, bare = strip_model_prefix(key)
            if bare not in self.names or prefix:  # a prefixed diffusion-model key wins over a bare namesake
                self.names[bare] = key

    def key_for(self, bare: str) -> str | None:
        """The file's key for a live weight; ComfyUI names Flux's qk-norm scales `..._norm.weight`."""
        found = self.names.get(bare)
        if found is None and bare.endswith("_norm.weight"):
            found = self.names.get(bare[: -len("weight")] + "scale")
        return found

    def fits(self, key: str, live: torch.Tensor) -> str:
        """The file key holding `key` in the live weight's shape; LoRAOpsError naming both otherwise."""
        file_key = self.key_for(key)
        if file_key is None:
            raise LoRAOpsError(f"{self.path}: has no tensor for {key!r}, so it is not the file the model was loaded "
                               f"from. Nothing was changed. {FIX_RELOAD}")
        if self.file.shape(file_key) != tuple(live.shape):
            raise LoRAOpsError(
                f"{self.path}: {file_key!r} has shape {list(self.file.shape(file_key))}, the model's {key!r} "
                f"{list(live.shape)}: not the file the model was loaded from. Nothing was changed. {FIX_RELOAD}"
            )
        return file_key

    def checked(self, key: str, live: torch.Tensor, expected: torch.Tensor | None) -> torch.Tensor:
        """`key` read from the file, cast to the live dtype, with the recorded fingerprint of the original bits."""
        if expected is None:
            raise LoRAOpsError(f"{key!r}: no fingerprint of its original bits was recorded, so a reload from "
                               f"{self.path} cannot be checked. Nothing was changed. {FIX_RELOAD}")
        if type(live) not in _PLAIN:
            raise LoRAOpsError(f"{key!r} is stored as {type(live).__name__}, which cannot be reloaded in place from "
                               f"{self.path}. Nothing was changed. {FIX_RELOAD}")
        file_key = self.fits(key, live)
        value = self.file.get(file_key).to(live.dtype)
        if not torch.equal(weight_fingerprint(value), expected.reshape(1).cpu()):
            raise LoRAOpsError(
                f"{self.path}: {file_key!r} cast to {live.dtype} does not give the original bits of {key!r} (its "
                "fingerprint differs): this is not the file the model was loaded from, or the model was loaded with "
                f"another dtype, or the file changed since. Nothing was changed. {FIX_RELOAD}"
            )
        return value


def reload_weights(
    weights: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    keys: Iterable[str],
    fingerprints: Mapping[str, torch.Tensor],
    *,
    keep_bytes: int = KEEP_BYTES,
) -> list[str]:
    """Copy `keys` (bare BFL names of `weights`, e.g. `weight_map(model)`) from the model file at `path` into the
    live tensors, in place; returns the keys reloaded.

    Every key is read and checked against `fingerprints` (a MergeState's) before any is written: a missing
    file, key, a wrong shape or fingerprint raises LoRAOpsError naming the file and key, and nothing changes.
    Only a file that changes between the check and the write (read again for weights beyond `keep_bytes`)
    can leave some weights reloaded and others not; the error then says so. Run under torch.inference_mode
    when the weights are inference tensors.
    """
    model = _ModelFile(path)
    keys = list(dict.fromkeys(keys))
    for key in keys:
        if key not in weights:
            raise LoRAOpsError(f"{key!r}: the model has no such weight to reload from {model.path}. Nothing was "
                               f"changed. {FIX_RELOAD}")
    kept: dict[str, torch.Tensor] = {}
    held = 0
    for key in keys:  # everything checked before anything is written
        value = model.checked(key, weights[key], fingerprints.get(key))
        if held + value.nbytes <= keep_bytes:
            kept[key] = value
            held += value.nbytes
    for done, key in enumerate(keys):
        try:
            value = kept.pop(key, None)
            if value is None:
                value = model.checked(key, weights[key], fingerprints.get(key))
        except LoRAOpsError as error:
            raise LoRAOpsError(f"{error} ({model.path} changed while it was read: {done} of {len(keys)} weights were "
                               f"reloaded already.)") from None
        weights[key].copy_(value)
    return keys


def merged_keys(state: MergeState) -> list[str]:
    """Every weight a state says is merged: those with a recorded fingerprint or a term of its stack."""
    return sorted(set(state.fingerprints) | {k for k, terms in terms_by_target(state.stack).items() if terms})


def restore_from_file(
    target: Mapping[str, torch.Tensor] | torch.nn.Module, path: str | os.PathLike[str], state: MergeState,
    *, keep_bytes: int = KEEP_BYTES,
) -> MergeState:
    """Like `restore`, from the model file: every weight `state` merged is reloaded (checked, see
    `reload_weights`); returns an empty state. For an UndoError, or a merge made with exact_undo=False."""
    keys = merged_keys(state)
    scaled = sorted(k.split(":", 1)[1] for k in state.codec_state if k.startswith("fp8_base_scale:"))
    if scaled:
        raise LoRAOpsError(f"{scaled[0]!r} is a scaled fp8 weight whose scale the merge changed; it is not reloaded "
                           f"from {path}. Nothing was changed. {FIX_RELOAD}")
    reload_weights(weight_map(target), path, keys, state.fingerprints, keep_bytes=keep_bytes)
    return MergeState()


def find_model_file(
    candidates: Sequence[str | os.PathLike[str]],
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    fingerprints: Mapping[str, torch.Tensor],
) -> Path | None:
    """The first candidate the weights were loaded from, or None: it must hold every fingerprinted weight in its
    live shape (headers only), and the smallest of them, read and cast, must give the recorded fingerprint."""
    weights = weight_map(target)
    keys = [k for k in fingerprints if k in weights]
    if not keys:
        return None
    probe = min(keys, key=lambda k: weights[k].numel())
    for path in candidates:
        try:
            model = _ModelFile(path)
            for key in keys:
                model.fits(key, weights[key])
            model.checked(probe, weights[probe], fingerprints[probe])
        except LoRAOpsError:
            continue
        return Path(path)
    return None
