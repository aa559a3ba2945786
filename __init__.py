"""Flux LoRA Ops: ComfyUI entry point (the pack folder is imported as a package by ComfyUI).

With ComfyUI's V3 API (comfy_api.latest) the nodes are registered through `comfy_entrypoint`; ComfyUI
reads NODE_CLASS_MAPPINGS first when a module has it, so it is only defined on the V1 fallback.
"""

import importlib.util

if importlib.util.find_spec("folder_paths") is None:
    # Imported outside ComfyUI (pytest collects this folder as a package): the nodes need ComfyUI.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
else:
    from .nodes import API, V1_DISPLAY_NAMES, V1_NODES
    from .nodes import comfy_entrypoint as _entrypoint

    if API == "v3":
        comfy_entrypoint = _entrypoint
        __all__ = ["comfy_entrypoint"]
    else:
        NODE_CLASS_MAPPINGS = dict(V1_NODES)
        NODE_DISPLAY_NAME_MAPPINGS = dict(V1_DISPLAY_NAMES)
        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
