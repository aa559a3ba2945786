"""Resizing a LoRA: each layer's error against the truncated SVD of the dense change, and the file round trip."""

from __future__ import annotations

import math

import pytest
import torch
from lora_factory import TINY, flux_weight_shapes, write_lora
from safetensors import safe_open
from test_cli import run_cli

from lora_ops import LoRAOpsError, load_lora, merge_loras
from lora_ops.resize import resize_lora, unmerged_saving


def _applied_delta(path) -> dict[str, torch.Tensor]:
    """What the file does to a model: merge it at strength 1 into fp32 zeros."""
    weights = {k: torch.zeros(s) for k, s in flux_weight_shapes(TINY).items()}
    merge_loras(weights, [(load_lora(path), 1.0)])
    return weights


def _optimal_error(exact: torch.Tensor, rank: int) -> float:
    sigma = torch.linalg.svdvals(exact.reshape(exact.shape[0], -1))
    return float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize(
    ("fmt", "rank"),
    [("kohya", 3), ("bfl_ab", 3), ("kohya_split_qkv", 3), ("lokr", 1), ("loha", 3), ("full_diff", 3)],
)
def test_each_layer_is_within_one_percent_of_the_truncated_svd(tmp_path, fmt, rank):
    """LoKr is compact: only rank 1 makes its layers smaller, so only that is a resize worth writing."""
    case = write_lora(fmt, tmp_path / "in.safetensors", TINY, rank=8, seed=21)
    report = resize_lora(case.path, tmp_path / "out.safetensors", rank=rank)
    got = _applied_delta(tmp_path / "out.safetensors")
    assert report.layers, "nothing was resized"
    for key, exact in case.exact.items():
        if exact.dim() < 2 or exact.shape[1] == 1:
            continue
        optimal = _optimal_error(exact, rank)
        error = _relative_error(got[key], exact)
        assert error <= optimal * 1.01 + 1e-6, (key, error, optimal)
    for layer in report.layers:
        assert layer.new_rank == rank and layer.saved_bytes > 0 and 0 < layer.relative_error < 1


def test_lora_layers_keep_their_keys_and_scale(tmp_path):
    case = write_lora("kohya", tmp_path / "in.safetensors", TINY, rank=8, seed=22)
    report = resize_lora(case.path, tmp_path / "out.safetensors", rank=4)
    before, after = load_lora(case.path), load_lora(tmp_path / "out.safetensors")
    assert after.format == before.format == "kohya"
    with safe_open(str(case.path), "pt") as a, safe_open(str(tmp_path / "out.safetensors"), "pt") as b:
        assert list(a.keys()) == list(b.keys())
        for key in a.keys():
            if key.startswith("lora_te"):
                assert torch.equal(a.get_tensor(key), b.get_tensor(key))  # text-encoder parts copied
            elif key.endswith("lora_down.weight"):
                assert b.get_tensor(key).shape[0] == 4 and b.get_tensor(key).dtype == a.get_tensor(key).dtype
            elif key.endswith(".alpha"):
                assert float(b.get_tensor(key)) == pytest.approx(float(a.get_tensor(key)) / 8 * 4)
    assert set(after.ranks) == {4}
    rows_cols = sum(sum(a.shape) for ads in before.targets.values() for a in ads)
    assert report.saved_bytes == rows_cols * (8 - 4) * 6 == unmerged_saving(before, 4)
    got = _applied_delta(tmp_path / "out.safetensors")
    for layer in report.layers:
        key = [t for t, ads in after.targets.items() if any(layer.module in k for k in ads[0].source_keys)][0]
        measured = _relative_error(got[key], case.exact[key])
        assert layer.relative_error == pytest.approx(measured, rel=1e-2, abs=1e-4)


def test_energy_keeps_the_fewest_singular_values_holding_that_share(tmp_path):
    case = write_lora("kohya", tmp_path / "in.safetensors", TINY, rank=8, seed=23)
    report = resize_lora(case.path, tmp_path / "out.safetensors", energy=0.8)
    after = load_lora(tmp_path / "out.safetensors")
    kept = {t: ads[0].rank for t, ads in after.targets.items()}
    for key, exact in case.exact.items():
        sigma2 = torch.linalg.svdvals(exact).square()
        share = torch.cumsum(sigma2, 0) / sigma2.sum()
        want = int((share < 0.8 - 1e-9).sum()) + 1
        assert kept[key] == min(want, 8), key
    assert all(layer.relative_error <= math.sqrt(0.2) + 1e-3 for layer in report.layers)


def test_rank_at_or_above_the_lora_copies_it_unchanged(tmp_path):
    case = write_lora("kohya", tmp_path / "in.safetensors", TINY, rank=4, seed=24)
    report = resize_lora(case.path, tmp_path / "out.safetensors", rank=16)
    assert report.layers == [] and report.saved_bytes == 0
    with safe_open(str(case.path), "pt") as a, safe_open(str(tmp_path / "out.safetensors"), "pt") as b:
        assert list(a.keys()) == list(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rank": 0}, "at least 1"),
        ({"energy": 1.5}, "in (0, 1]"),
        ({}, "exactly one of"),
        ({"rank": 2, "energy": 0.9}, "exactly one of"),
    ],
)
def test_bad_requests_write_nothing(tmp_path, kw, message):
    case = write_lora("kohya", tmp_path / "in.safetensors", TINY, rank=4, seed=25)
    with pytest.raises(LoRAOpsError, match=message.replace("(", r"\(").replace("]", r"\]")):
        resize_lora(case.path, tmp_path / "out.safetensors", **kw)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_resize(tmp_path):
    case = write_lora("kohya", tmp_path / "in.safetensors", TINY, rank=8, seed=26)
    out = tmp_path / "small.safetensors"
    result = run_cli("resize", str(case.path), "--rank", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "8 -> 2" in result.stdout and "less GPU memory when applied unmerged" in result.stdout
    assert set(load_lora(out).ranks) == {2}
    refused = run_cli("resize", str(case.path), "--rank", "2", "--out", str(case.path))
    assert refused.returncode == 2 and "refusing to write over an input" in refused.stderr
