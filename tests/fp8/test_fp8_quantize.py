"""Scales, rounding and quantising one tensor (lora_ops.fp8.quantize, merged_rows.quantize)."""

from __future__ import annotations

import math

import pytest
import torch
from fp8_cases import E4M3, QKV
from tensor_checks import bits

from lora_ops import fp8


def test_round_trip_error_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=gen) * 0.02
    q, s = fp8.quantize(w)
    assert q.dtype == E4M3 and s.shape == () and s.dtype == torch.float32
    scale = float(s)
    assert math.log2(scale).is_integer()  # power of two
    assert w.abs().max() / scale <= 448 and w.abs().max() / scale > 224  # uses the top binade, never clips
    d = fp8.dequantize(q, s)
    normal = (w.abs() / scale) >= 2**-6
    # round to nearest: at most half an ulp, i.e. 2^-4 relative, for every normal value
    assert ((d - w).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-12).all()
    # subnormals: absolute error at most half the subnormal step
    assert ((d - w).abs()[~normal] <= scale * 2**-10 + 1e-12).all()
    assert (d - w).norm() / w.norm() < 0.03


def test_pow2_scale_makes_comfyui_bf16_dequant_exact():
    """ComfyUI computes weight.to(bf16) * scale.to(bf16); with a power-of-two scale that is exact."""
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    q, s = fp8.quantize(w)
    exact = q.float() * s
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal((q.to(dtype) * s.to(dtype)).float(), exact)
    qe, se = fp8.quantize(w, scale_mode="exact")
    assert float(w.abs().max() / se) == pytest.approx(448, rel=1e-6)


def test_fresh_scale_edge_cases():
    assert fp8.fresh_scale(0.0) == 1.0
    assert fp8.fresh_scale(448.0) == 1.0
    assert fp8.fresh_scale(448.5) == 2.0
    assert fp8.fresh_scale(0.1, "exact") == pytest.approx(0.1 / 448)
    with pytest.raises(fp8.FP8FormatError):
        fp8.fresh_scale(float("inf"))


def test_nearest_equals_torch_cast_and_saturates():
    x = torch.tensor([0.0, 1.0, 1.0625, 447.0, 449.0, 1e9, -1e9, 2**-10, 3 * 2**-11])
    q = fp8.round_fp8(x)
    assert torch.equal(bits(q), bits(x.clamp(-448, 448).to(E4M3)))
    assert q.float()[4] == 448 and q.float()[6] == -448


def test_stochastic_rounding_deterministic_and_tile_independent():
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    a, sa = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=7)
    b, _ = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=7, tile_bytes=4096)
    c, _ = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=8)
    d, _ = fp8.quantize_merged(w, key="double_blocks.0.txt_attn.qkv.weight", rounding="stochastic", seed=7)
    e, _ = fp8.quantize_merged(w, key="diffusion_model." + QKV, rounding="stochastic", seed=7)
    assert torch.equal(bits(a), bits(b))  # same seed, any tiling
    assert torch.equal(bits(a), bits(e))  # the key's prefix does not matter
    assert not torch.equal(bits(a), bits(c))  # another seed
    assert not torch.equal(bits(a), bits(d))  # another key


def test_stochastic_rounding_unbiased():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    _, s = fp8.quantize(w)
    runs = [fp8.dequantize(*fp8.quantize_merged(w, key="k", rounding="stochastic", seed=i, scale=float(s)))
            for i in range(64)]
    single = (runs[0] - w).norm()
    mean = torch.stack(runs).mean(0)
    assert (mean - w).norm() < single / 5  # ~1/8 expected for 64 independent draws
    # bias over all elements (signed mean error) is tiny relative to the per-element noise
    assert abs(float((runs[0] - w).mean())) < float((runs[0] - w).std()) / 20
    # probability of rounding up matches the fraction: a value 1/4 of the way between two grid points
    x = torch.full((20000,), 1.0 + 0.125 / 4)
    q = fp8.round_fp8(x, "stochastic", seed=5)
    assert set(q.float().unique().tolist()) == {1.0, 1.125}
    assert abs(float((q.float() == 1.125).float().mean()) - 0.25) < 0.015


def test_uniform_noise_is_uniform():
    u = fp8.uniform_noise(123, 0, 100000)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 9000
