"""Runs inside ComfyUI's Python (cwd = COMFYUI_ROOT): what ComfyUI makes of our Flux-family shapes.

For each named variant: a meta-device state dict with our names and shapes goes through ComfyUI's own
model detection and model construction (nothing is allocated). Prints one JSON line: per variant the
model class ComfyUI chose, its unet_config, and the names and shapes of the model it built, or the
error it raised.
"""

from __future__ import annotations

import json
import sys

import torch


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
    out = {}
    for name in names:
        try:
            out[name] = probe(name)
        except Exception as exc:  # noqa: BLE001 -- reported to the test, which names it
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
