"""A Flux.2-shaped checkpoint (real key names) that ComfyUI 0.33.0 loads as Flux2, and Flux.2 LoRAs in every
format ComfyUI maps: ComfyUI's own LoRA patching, our library merge and our merge node on the model as
UNETLoader loads it give the same bits, and loading the plain model again gives the exact base back.
Deselected on a ComfyUI without Flux.2 (0.3.64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from flux2_oracle import COMFY_FLUX2_FORMATS, FLUX2_SHARED
from lora_factory import base_state_dict, default_targets, write_lora
from safetensors.torch import load_file, save_file
from test_architecture_in_comfyui import NEEDS_FLUX2

from lora_ops import FluxShape, load_lora, merge_loras

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "flux2_merge_probe.py"
#: ComfyUI's Flux.2 config fixes 128 output channels and 128-wide heads; blocks and text width may shrink.
SHAPE = FluxShape(
    family="flux2",
    hidden=256,
    depth=2,
    depth_single=2,
    heads=2,
    mlp_ratio=3,
    in_channels=128,
    out_channels=128,
    context_dim=64,
    vec_dim=0,
    guidance=True,
)
#: Layers whose diffusers names ComfyUI 0.33.0 does not map for Flux.2 (it maps them under BFL / kohya names).
NOT_MAPPED_AS_DIFFUSERS = (*FLUX2_SHARED, "time_in", "guidance_in")
STRENGTHS = {
    "kohya": 0.8,
    "bfl": 1.0,
    "bfl_ab": -0.6,
    "diffusers": 0.7,
    "diffusers_bare": 1.3,
    "onetrainer": 0.5,
    "lokr": 0.9,
    "loha": 1.1,
}


def targets_for(fmt: str) -> list[str]:
    mods = default_targets(SHAPE)
    if fmt in ("diffusers", "diffusers_bare", "onetrainer"):
        mods = [m for m in mods if not m.startswith(NOT_MAPPED_AS_DIFFUSERS)]
    return mods


def comfy_name(key: str) -> str:
    return key[: -len(".scale")] + ".weight" if key.endswith(".scale") else key


@NEEDS_FLUX2
def test_comfyui_and_our_merge_agree_on_flux2(comfyui_root, tmp_path):
    base = base_state_dict(SHAPE, 5)
    checkpoint = tmp_path / "flux2_tiny.safetensors"
    save_file(base, str(checkpoint))
    cases = {
        f: write_lora(f, tmp_path / f"{f}.safetensors", SHAPE, 4, 9, targets=targets_for(f))
        for f in COMFY_FLUX2_FORMATS
    }
    spec = {
        "checkpoint": str(checkpoint),
        "out_dir": str(tmp_path),
        "loras": [[str(cases[f].path), STRENGTHS[f]] for f in COMFY_FLUX2_FORMATS],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path / "spec.json")],
        cwd=comfyui_root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_config"] == "Flux2"
    for i, fmt in enumerate(COMFY_FLUX2_FORMATS):
        report = result["loras"][i]
        assert not report["not_loaded"], (fmt, report["not_loaded"][:5])
        assert report["patched"] == len(cases[fmt].modules), (fmt, report["patched"])
        theirs = load_file(str(tmp_path / f"merged_{i}.safetensors"))
        ours = {k: v.clone() for k, v in base.items()}
        merge_loras(ours, [(load_lora(cases[fmt].path), STRENGTHS[fmt])])
        changed = [k for k in ours if not torch.equal(ours[k], base[k])]
        assert changed, fmt
        differ = [k for k in ours if not torch.equal(ours[k], theirs[comfy_name(k)])]
        assert not differ, f"{fmt}: ComfyUI and lora_ops differ at {differ[:5]}"
        node = load_file(str(tmp_path / f"node_{i}.safetensors"))
        assert node.keys() == theirs.keys() and all(torch.equal(node[k], theirs[k]) for k in node), fmt
        after = load_file(str(tmp_path / f"base_{i}.safetensors"))
        assert all(torch.equal(after[comfy_name(k)], v) for k, v in base.items()), f"{fmt}: undo not exact"
