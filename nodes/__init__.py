"""ComfyUI nodes of Flux LoRA Ops: V3 schema when ComfyUI has `comfy_api.latest`, V1 classes otherwise.

Set FLUX_LORA_OPS_FORCE_V1=1 to register the V1 classes even where V3 exists (used by the tests).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("flux_lora_ops")


def force_v1() -> bool:
    return os.environ.get("FLUX_LORA_OPS_FORCE_V1", "").strip().lower() in ("1", "true", "yes")


comfy_entrypoint = None
V3_ERROR: str | None = None
if not force_v1():
    try:
        from .v3 import V3_NODES, comfy_entrypoint  # noqa: F401
    except ImportError as e:  # ComfyUI without the V3 API
        V3_ERROR = str(e)
        comfy_entrypoint = None

from .compat import check_at_registration  # noqa: E402
from .v1 import V1_DISPLAY_NAMES, V1_NODES  # noqa: E402

check_at_registration()

API = "v3" if comfy_entrypoint is not None else "v1"

__all__ = ["API", "V1_DISPLAY_NAMES", "V1_NODES", "V3_ERROR", "comfy_entrypoint", "force_v1"]
