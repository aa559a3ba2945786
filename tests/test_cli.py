"""The command line: inspect and the streamed offline merge, end to end through subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_factory import TINY, write_lora
from safetensors import safe_open
from safetensors.torch import load_file

from lora_ops import load_lora, merge_loras
from lora_ops.synthetic import write_flux_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lora_ops", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    model = write_flux_checkpoint(tmp / "flux.safetensors", TINY, seed=3, prefix="model.diffusion_model.")
    kohya = write_lora("kohya", tmp / "kohya.safetensors", TINY, rank=4, seed=5).path
    diffusers = write_lora("diffusers", tmp / "diffusers.safetensors", TINY, rank=2, seed=6).path
    return {"model": model, "kohya": kohya, "diffusers": diffusers, "dir": tmp}


def test_inspect_text_and_json(files):
    text = run_cli("inspect", str(files["kohya"]))
    assert text.returncode == 0, text.stderr
    assert "kohya" in text.stdout and "text-encoder" in text.stdout and "unmerged" in text.stdout
    data = json.loads(run_cli("inspect", str(files["kohya"]), "--json").stdout)
    assert data["format"] == "kohya"
    assert data["ranks"] == {"4": data["ranks"]["4"]} and data["ranks"]["4"] > 0
    assert data["text_encoder_keys"] > 0
    assert data["unmerged_runtime_mib"] == pytest.approx(data["params"] * 6 / 2**20)


@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp32"])
def test_offline_merge_equals_in_memory_merge(files, dtype):
    out = files["dir"] / f"merged_{dtype}.safetensors"
    result = run_cli("merge", str(files["model"]), "--lora", f"{files['kohya']}:0.8",
                     "--lora", f"{files['diffusers']}:-0.5", "--out", str(out), "--dtype", dtype, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = load_file(str(out))
    base = load_file(str(files["model"]))
    assert list(got) == list(base)  # key names and order kept, prefix included
    stack = [(load_lora(files["kohya"]), 0.8), (load_lora(files["diffusers"]), -0.5)]
    if dtype == "fp32":
        work = {k: v.float() for k, v in base.items()}
    else:
        work = {k: v.clone() for k, v in base.items()}
    merge_loras(work, stack)
    for key, tensor in got.items():
        assert torch.equal(tensor, work[key]), key
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    merged = json.loads(meta["lora_ops.merged"])
    assert [m["strength"] for m in merged] == [0.8, -0.5]
    assert not [p for p in files["dir"].iterdir() if ".partial" in p.name]


def test_merge_refuses_to_overwrite_input(files):
    before = files["model"].read_bytes()
    result = run_cli("merge", str(files["model"]), "--lora", str(files["kohya"]), "--out", str(files["model"]))
    assert result.returncode == 2
    assert "refusing to write over an input" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert files["model"].read_bytes() == before


def test_lora_strength_parsing():
    from lora_ops.cli import parse_lora_arg

    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_lora_arg("dir:x/a.safetensors:-1") == ("dir:x/a.safetensors", -1.0)


def test_inspect_lists_the_blocks_a_lora_touches(files):
    text = run_cli("inspect", str(files["kohya"]))
    assert "blocks: double 0-1; single 0-1; outside the blocks: " in text.stdout, text.stdout
    data = json.loads(run_cli("inspect", str(files["kohya"]), "--json").stdout)
    assert data["blocks"]["double"] == [0, 1] and data["blocks"]["single"] == [0, 1]
    assert "img_in" in data["blocks"]["outside"]


def test_merge_with_blocks_per_lora(files):
    """Each --blocks belongs to the --lora before it; the file equals the in-memory merge with those weights."""
    from lora_ops.blocks import parse_block_spec, with_block_weights

    out = files["dir"] / "merged_blocks.safetensors"
    result = run_cli("merge", str(files["model"]), "--lora", f"{files['kohya']}:0.8", "--blocks", "single=0",
                     "--lora", f"{files['diffusers']}:-0.5", "--blocks", "*=1, double.1=2", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    base = load_file(str(files["model"]))
    counts = {"double": 2, "single": 2}
    stack = [(with_block_weights(load_lora(files["kohya"]), parse_block_spec("single=0", counts)), 0.8),
             (with_block_weights(load_lora(files["diffusers"]), parse_block_spec("*=1, double.1=2", counts)), -0.5)]
    work = {k: v.clone() for k, v in base.items()}
    merge_loras(work, stack)
    got = load_file(str(out))
    for key, tensor in got.items():
        assert torch.equal(tensor, work[key]), key
    single = "model.diffusion_model.single_blocks.0.linear1.weight"
    alone = {k: v.clone() for k, v in base.items()}
    merge_loras(alone, [(load_lora(files["diffusers"]), -0.5)])
    assert torch.equal(got[single], alone[single])  # the kohya LoRA left single blocks alone
    with safe_open(str(out), "pt") as f:
        merged = json.loads(f.metadata()["lora_ops.merged"])
    assert [m.get("blocks") for m in merged] == ["single=0", "*=1, double.1=2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "single=0", "--lora", "L"], "give --lora PATH[:STRENGTH] first"),
        (["--lora", "L", "--blocks", "single.2=0"], "outside this model, which has single blocks 0-1"),
        (["--lora", "L", "--blocks", "single=0", "--blocks", "double=0"], "two --blocks"),
    ],
)
def test_merge_blocks_errors_write_nothing(files, args, message):
    out = files["dir"] / "never.safetensors"
    args = [str(files["kohya"]) if a == "L" else a for a in args]
    result = run_cli("merge", str(files["model"]), *args, "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert not out.exists()


def test_fp8_merge_applies_and_records_the_blocks(files):
    """--dtype fp8 goes through the same per-target multipliers: a LoRA zeroed everywhere leaves a plain cast."""
    out, cast = files["dir"] / "blocks_fp8.safetensors", files["dir"] / "cast_fp8.safetensors"
    merged = run_cli("merge", str(files["model"]), "--lora", f"{files['kohya']}:0.8", "--blocks", "*=0",
                     "--out", str(out), "--dtype", "fp8", "--device", "cpu")
    assert merged.returncode == 0, merged.stderr
    assert run_cli("cast", str(files["model"]), "--out", str(cast), "--device", "cpu").returncode == 0
    got, plain = load_file(str(out)), load_file(str(cast))
    assert list(got) == list(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lora_ops.merged"])[0]["blocks"] == "*=0"
