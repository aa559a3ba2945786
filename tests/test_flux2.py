"""Flux.2 against the independent oracle: every Flux.2 LoRA format merges into a tiny Flux.2 model within
1 ulp (>= 99.9 % bit-exact), LoRAs of the other family are refused naming both, and merge / cast / inspect
work on a Flux.2 checkpoint file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from flux2_oracle import FLUX2_FORMATS
from lora_factory import TINY, TINY_FLUX2, base_state_dict, write_lora
from safetensors.torch import load_file
from tensor_checks import snapshot
from test_formats import check_against_oracle, load, merge

import lora_ops
from lora_ops import FluxShape, ModelMismatchError, merge_loras
from lora_ops.errors import LoRAFormatError
from lora_ops.synthetic import write_flux_checkpoint

#: Flux.1 at Flux.2's width: only the MLP shapes tell their LoRAs apart.
TINY1_SAME_WIDTH = FluxShape(
    hidden=64,
    depth=2,
    depth_single=3,
    heads=2,
    in_channels=32,
    out_channels=32,
    context_dim=48,
    vec_dim=24,
    time_dim=16,
)
RANK, SEED, BASE_SEED = 4, 2026, 11


@pytest.fixture(scope="module")
def base():
    return base_state_dict(TINY_FLUX2, BASE_SEED)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("flux2_loras")
    return {fmt: write_lora(fmt, d / f"{fmt}.safetensors", TINY_FLUX2, RANK, SEED, base=base) for fmt in FLUX2_FORMATS}


@pytest.mark.parametrize("strength", (1.0, -0.6))
@pytest.mark.parametrize("fmt", FLUX2_FORMATS)
def test_flux2_merge_matches_oracle(base, cases, fmt, strength):
    case = cases[fmt]
    merged = merge(base, [(case, strength)])
    check_against_oracle(base, [(case, strength)], merged, f"flux2 {fmt} @ {strength}")


@pytest.mark.parametrize("fmt", FLUX2_FORMATS)
def test_flux2_every_key_mapped_and_family_known(cases, fmt):
    lora = load(cases[fmt].path)
    assert not lora.coverage.unmapped, lora.coverage.summary()
    assert {t.removesuffix(".weight") for t in lora.targets} == set(cases[fmt].modules)
    assert lora.family == "flux2", (fmt, lora.family_evidence)


def test_flux2_stack_and_exact_undo(base, cases):
    parts = [(cases["kohya"], 0.8), (cases["diffusers"], -0.4), (cases["lokr"], 0.5)]
    sd = snapshot(base)
    state = merge_loras(sd, [(load(c.path), s) for c, s in parts])
    check_against_oracle(base, parts, sd, "flux2 stack")
    lora_ops.restore(sd, state)
    assert all(torch.equal(sd[k], base[k]) for k in base)


def _refused(model: dict, lora_path, *names: str) -> None:
    before = snapshot(model)
    with pytest.raises(ModelMismatchError) as info:
        merge_loras(model, [(load(lora_path), 1.0)])
    for name in names:
        assert name in str(info.value)
    assert all(torch.equal(model[k], before[k]) for k in model), "a refused merge changed the model"


def test_flux1_lora_on_flux2_is_refused(tmp_path, base):
    flux1 = write_lora("kohya", tmp_path / "flux1.safetensors", TINY, RANK, SEED).path
    _refused(snapshot(base), flux1, "made for Flux.1", "is Flux.2")


def test_flux2_lora_on_flux1_is_refused(tmp_path, cases):
    flux1_model = base_state_dict(TINY1_SAME_WIDTH, BASE_SEED)
    for fmt in ("kohya", "diffusers"):
        _refused(flux1_model, cases[fmt].path, "made for Flux.2", "is Flux.1")


def test_same_width_flux1_lora_refused_by_its_mlp_shape(tmp_path, base):
    """BFL names are the same in both families; a Flux.1 MLP LoRA is 4x wide, Flux.2's input 6x (gated)."""
    path = write_lora(
        "bfl",
        tmp_path / "mlp.safetensors",
        TINY1_SAME_WIDTH,
        RANK,
        SEED,
        targets=["double_blocks.0.img_mlp.0", "double_blocks.0.img_attn.qkv"],
    ).path
    assert load(path).family == "flux1"
    _refused(snapshot(base), path, "Flux.1", "Flux.2", "256x64")


def test_file_mixing_families_is_refused(tmp_path, cases):
    mixed = {
        **load_file(str(cases["kohya"].path)),
        **load_file(str(write_lora("kohya", tmp_path / "f1.safetensors", TINY, RANK, SEED).path)),
    }
    path = tmp_path / "mixed.safetensors"
    from safetensors.torch import save_file

    save_file(mixed, str(path))
    with pytest.raises(LoRAFormatError, match="mixes Flux.1 and Flux.2"):
        lora_ops.load_lora(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ops", *args], capture_output=True, text=True, timeout=600)


def test_cli_merge_cast_inspect_on_a_flux2_checkpoint(tmp_path, cases):
    model = write_flux_checkpoint(tmp_path / "flux2.safetensors", TINY_FLUX2, seed=3, prefix="model.diffusion_model.")
    out = tmp_path / "merged.safetensors"
    result = _cli("merge", str(model), "--lora", f"{cases['kohya'].path}:0.7", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    want = {k: v.clone() for k, v in load_file(str(model)).items()}
    merge_loras(want, [(load(cases["kohya"].path), 0.7)])
    got = load_file(str(out))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    cast = tmp_path / "fp8.safetensors"
    result = _cli("cast", str(model), "--out", str(cast), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    fp8 = load_file(str(cast))
    assert fp8["model.diffusion_model.single_blocks.0.linear1.weight"].dtype == torch.float8_e4m3fn
    info = json.loads(_cli("inspect", str(cases["diffusers"].path), "--json").stdout)
    assert info["mapped_keys"] > 0 and not info["unmapped"] and info["family"] == "Flux.2"
    refused = _cli(
        "merge",
        str(model),
        "--lora",
        str(write_lora("kohya", tmp_path / "f1.safetensors", TINY, RANK, SEED).path),
        "--out",
        str(tmp_path / "no.safetensors"),
    )
    assert refused.returncode == 2 and "Flux.1" in refused.stderr and "Flux.2" in refused.stderr
    assert not (tmp_path / "no.safetensors").exists()
