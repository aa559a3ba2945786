"""Runs inside ComfyUI's Python (cwd = COMFYUI_ROOT): what ComfyUI makes of our Flux-family shapes.

For each named variant: a meta-device state dict with our names and shapes goes through ComfyUI's own
model detection and model construction (nothing is allocated). Prints one JSON line: per variant the
model class ComfyUI chose, its unet_config, and the names and shapes of the model it built, or the
error it raised.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types

import torch


class _Stub(types.ModuleType):
    def __getattr__(self, attr: str) -> types.ModuleType:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision.*` as empty modules: ComfyUI imports it at module level in unrelated models."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _torchvision_or_stub() -> None:
    """A venv whose torchvision does not match its torch cannot import ComfyUI; Flux never uses torchvision."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())


def probe(name: str) -> dict:
    import comfy.model_detection

    from lora_ops.flux import VARIANTS, flux_weight_shapes

    sd = {k: torch.empty(v, device="meta", dtype=torch.bfloat16) for k, v in flux_weight_shapes(VARIANTS[name]).items()}
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None:
        return {"model_config": None}
    model = config.get_model(sd, "", device="meta")
    built = {k: list(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    unet = {k: v for k, v in config.unet_config.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return {"model_config": type(config).__name__, "unet_config": unet, "shapes": built}


def main() -> None:
    names = sys.argv[1:]
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its options from argv when first imported
    sys.path.insert(0, ".")
    import comfy.options

    comfy.options.enable_args_parsing()
    _torchvision_or_stub()
    out = {}
    for name in names:
        try:
            out[name] = probe(name)
        except Exception as exc:  # noqa: BLE001 -- reported to the test, which names it
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
