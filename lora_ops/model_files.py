"""Opening a Flux checkpoint for a streamed rewrite, and refusing to write over an input file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import LoRAOpsError, ModelMismatchError
from .flux import is_flux_state_dict
from .safetensors_io import SafetensorsFile


def open_flux_checkpoint(path: str | Path) -> SafetensorsFile:
    """Open and validate a checkpoint, refusing files that are not Flux."""
    model = SafetensorsFile(path)
    if not is_flux_state_dict(model.keys()):
        raise ModelMismatchError(
            f"{path}: not a Flux checkpoint (no double_blocks.0.img_attn.norm.key_norm.scale / img_in.weight "
            f"among its {len(model.keys())} tensors). Give the Flux diffusion model file (flux1-dev.safetensors)."
        )
    return model


def refuse_overwriting_inputs(out: Path, inputs: Sequence[Path]) -> None:
    for path in inputs:
        if out.resolve() == Path(path).resolve() or (out.exists() and os.path.samefile(out, path)):
            raise LoRAOpsError(f"{out}: refusing to write over an input file; choose another --out")
