"""Which ComfyUI versions the pack is tested with, and a clear refusal outside them.

The merge-at-load relies on ComfyUI's patcher lifecycle (backup dict, partially_load, dynamic VRAM's cast hooks),
which changes between versions; on an older ComfyUI the nodes refuse with a message instead of merging wrongly.
"""

from __future__ import annotations

import logging

from ..lora_ops import LoRAOpsError

log = logging.getLogger("flux_lora_ops")

#: The oldest ComfyUI tested; pyproject.toml's [tool.comfy] requires-comfyui says the same (checked by a test).
MIN_COMFYUI = "0.3.64"
#: The newest ComfyUI tested (CI runs the real-ComfyUI tests on both).
TESTED_UP_TO = "0.33.0"


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def comfyui_version() -> str | None:
    """ComfyUI's version (comfyui_version.py at its root), or None where that file does not exist (before 0.3.x)."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return str(getattr(comfyui_version, "__version__", "")) or None


def version_problem(version: str | None) -> str | None:
    """Why the nodes cannot run on this ComfyUI, or None."""
    if version is None:
        return (
            f"Flux LoRA Ops needs ComfyUI {MIN_COMFYUI} or newer; this ComfyUI has no comfyui_version.py, so it is "
            "older. Update ComfyUI; the nodes refuse to merge until then."
        )
    if _parse(version) < _parse(MIN_COMFYUI):
        return (
            f"Flux LoRA Ops needs ComfyUI {MIN_COMFYUI} or newer (tested up to {TESTED_UP_TO}); this is ComfyUI "
            f"{version}. Update ComfyUI; the nodes refuse to merge until then."
        )
    return None


def check_at_registration() -> None:
    """Log, once, where this ComfyUI is outside the tested range."""
    version = comfyui_version()
    problem = version_problem(version)
    if problem is not None:
        log.error(problem)
    elif _parse(version) > _parse(TESTED_UP_TO):
        log.warning(
            "Flux LoRA Ops is tested with ComfyUI %s to %s; this is %s. Please report anything that looks wrong.",
            MIN_COMFYUI,
            TESTED_UP_TO,
            version,
        )


def require_supported() -> None:
    """Raise the clear error before a node changes anything, on a ComfyUI the pack does not support."""
    problem = version_problem(comfyui_version())
    if problem is not None:
        raise LoRAOpsError(problem)
