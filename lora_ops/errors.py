"""Errors a user can act on: each names the file or key and says what to do."""

from __future__ import annotations

import torch

#: The advice for a file whose contents cannot be right.
FIX_BROKEN = "The file is corrupt or was saved by a broken tool: download or export it again."


class LoRAOpsError(ValueError):
    """Base class: something about the input is wrong; nothing was changed."""


class UnsafeFileError(LoRAOpsError):
    """The file is not a well-formed safetensors file (or is a pickle, which is never loaded)."""


class LoRAFormatError(LoRAOpsError):
    """The file is a safetensors file, but not a LoRA this pack can apply to Flux."""


class ModelMismatchError(LoRAOpsError):
    """The LoRA does not fit the model it is applied to (shapes, missing weights, not Flux)."""


class UndoError(RuntimeError):
    """Undo could not give back the exact bits it promised; `keys` names the weights concerned.

    `unchanged` tells whether those weights still hold the bits they had before the call (True), or are in
    an unknown state (False: the rollback itself failed). Either way: reload them from the model file;
    `originals` (when known) has the fingerprints of their original bits, to check the file against
    (`lora_ops.reload_weights`).
    """

    def __init__(self, message: str, keys: list[str], unchanged: bool,
                 originals: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(message)
        self.keys = keys
        self.unchanged = unchanged
        self.originals = originals or {}


class LoRAFormatWarning(UserWarning):
    """A LoRA file loaded, but part of it was skipped or reinterpreted."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError, Python MemoryError; torch's CPU allocator a plain RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)
