"""Our architecture table against ComfyUI's own: for every named Flux-family model, ComfyUI detects the
family we say from our weight names and shapes, and the model it builds has exactly our tensors (names
and shapes, hence our parameter counts, flux2-dev's 32.2 B included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ops.flux import FLUX2, VARIANTS, flux_weight_shapes

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "arch_probe.py"
COMFY_CLASS = {"flux1": ("Flux", "FluxSchnell"), "chroma": ("Chroma",), "flux2": ("Flux2",)}


def has_flux2(comfyui_root: Path) -> bool:
    return "double_stream_modulation_img" in (comfyui_root / "comfy" / "model_detection.py").read_text()


@pytest.fixture(scope="module")
def probed(comfyui_root: Path) -> dict:
    names = [n for n, s in VARIANTS.items() if s.family != FLUX2 or has_flux2(comfyui_root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(PROBE), *names], cwd=comfyui_root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def norm_names(shapes: dict) -> dict[str, list[int]]:
    """ComfyUI 0.33 loads `*.scale` norm weights as `*.weight` (0.3.64 keeps `.scale`): compare both as `.weight`."""
    return {(k[: -len(".scale")] + ".weight" if k.endswith(".scale") else k): list(v) for k, v in shapes.items()}


#: Flux.2 came with ComfyUI 0.33: its variants are deselected on older trees (conftest.py), not skipped.
NEEDS_FLUX2 = pytest.mark.comfyui_has("comfy/model_detection.py", "double_stream_modulation_img")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=NEEDS_FLUX2) if s.family == FLUX2 else n for n, s in VARIANTS.items()]
)
def test_comfyui_builds_exactly_our_model(name, comfyui_root, probed):
    shape = VARIANTS[name]
    result = probed[name]
    assert "error" not in result, result
    assert result["model_config"] in COMFY_CLASS[shape.family], result["model_config"]
    unet = result["unet_config"]
    assert (unet["hidden_size"], unet["depth"], unet["depth_single_blocks"]) == (
        shape.hidden,
        shape.depth,
        shape.depth_single,
    )
    assert unet["num_heads"] == shape.heads
    assert norm_names(result["shapes"]) == norm_names(flux_weight_shapes(shape))
