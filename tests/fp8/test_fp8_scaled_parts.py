"""In-place merges into per-tensor scaled fp8 weights handed over as parts (payload + live scale tensor), as
another library's quantized tensor holds them: e4m3fn and e5m2, fresh scale, exact undo, all-or-nothing.

The oracle is plain arithmetic: dequantise, add the factory's exact delta, pick the power-of-two scale, round.
"""

from __future__ import annotations

import math

import pytest
import torch
from lora_factory import TINY, base_state_dict, write_lora
from tensor_checks import bits

from lora_ops import LoRAOpsError, fp8, load_lora

FP8_MAXES = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _pow2_scale(amax: float, top: float) -> float:
    return 2.0 ** math.ceil(math.log2(amax / top))


def _quantized_parts(dtype: torch.dtype, seed: int = 0):
    """A Flux state dict whose 2-D weights are (payload, scale) pairs; everything else stays bf16."""
    top = FP8_MAXES[dtype]
    tensors, scales = {}, {}
    for key, t in base_state_dict(TINY, seed).items():
        if key.endswith(".weight") and t.dim() == 2:
            s = _pow2_scale(float(t.float().abs().max()), top)
            tensors[key] = (t.float() / s).to(dtype)
            scales[key] = torch.tensor(s, dtype=torch.float32)
        else:
            tensors[key] = t.clone()
    return tensors, scales


def _snapshot(tensors, scales):
    return {k: v.clone() for k, v in tensors.items()}, {k: float(v) for k, v in scales.items()}


def _expected(payload: torch.Tensor, scale: float, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    merged = payload.float() * scale + delta
    top = FP8_MAXES[payload.dtype]
    new = _pow2_scale(float(merged.abs().max()), top)
    return (merged / new).clamp(-top, top).to(payload.dtype), new


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_lora("kohya", tmp_path_factory.mktemp("q") / "k.safetensors", TINY, rank=4, seed=5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_merge_into_parts_fresh_scale_same_dtype(case, dtype):
    tensors, scales = _quantized_parts(dtype)
    before, before_scales = _snapshot(tensors, scales)
    lora = load_lora(case.path)
    fp8.merge_loras_fp8(tensors, [(lora, 0.75)], scales=scales)
    deltas = case.expected_at(0.75)
    assert deltas
    for key, delta in deltas.items():
        want, want_scale = _expected(before[key], before_scales[key], delta)
        assert tensors[key].dtype == dtype, key
        assert float(scales[key]) == want_scale, key  # a fresh scale from the merged tensor
        same = (bits(tensors[key]) == bits(want)).float().mean()
        assert same > 0.999, (key, float(same))  # fp32 sums of the factors may differ in the last bit
        ulps = (tensors[key].float() - want.float()).abs() / want.float().abs().clamp(min=1e-30)
        assert float(ulps.max()) <= 2.0 ** -(2 if dtype == torch.float8_e4m3fn else 1), key  # at most one step
    for key in tensors.keys() - deltas.keys():
        assert torch.equal(bits(tensors[key]), bits(before[key])), key


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_parts_strength_switch_and_undo_are_exact(case, dtype):
    lora = load_lora(case.path)
    tensors, scales = _quantized_parts(dtype)
    before, before_scales = _snapshot(tensors, scales)
    state = fp8.merge_loras_fp8(tensors, [(lora, 1.0)], scales=scales)
    state = fp8.merge_loras_fp8(tensors, [(lora, 0.3)], scales=scales, state=state)
    fresh, fresh_scales = _quantized_parts(dtype)
    fp8.merge_loras_fp8(fresh, [(lora, 0.3)], scales=fresh_scales)
    for key in tensors:
        assert torch.equal(bits(tensors[key]), bits(fresh[key])), key
        if key in scales:
            assert float(scales[key]) == float(fresh_scales[key]), key
    fp8.merge_loras_fp8(tensors, [], scales=scales, state=state)
    for key in tensors:
        assert torch.equal(bits(tensors[key]), bits(before[key])), key
    assert {k: float(v) for k, v in scales.items()} == before_scales


def test_parts_that_are_not_fp8_are_refused_and_nothing_changes(case):
    lora = load_lora(case.path)
    tensors, scales = _quantized_parts(torch.float8_e4m3fn)
    key = next(iter(case.expected))
    tensors[key] = tensors[key].view(torch.uint8)  # e.g. a packed 4-bit payload
    before, before_scales = _snapshot(tensors, scales)
    with pytest.raises(LoRAOpsError, match="not fp8"):
        fp8.merge_loras_fp8(tensors, [(lora, 1.0)], scales=scales)
    for k in tensors:
        assert torch.equal(bits(tensors[k]), bits(before[k])), k
    assert {k: float(v) for k, v in scales.items()} == before_scales


def test_e5m2_rounding_grid():
    x = torch.tensor([0.0, 1.0, 1.1, 1.2, 57000.0, 60000.0, 1e9, -1e9, 2.0**-15, 3 * 2.0**-17])
    q = fp8.round_fp8(x, dtype=torch.float8_e5m2)
    assert torch.equal(bits(q), bits(x.clamp(-57344, 57344).to(torch.float8_e5m2)))
    assert q.float()[6] == 57344 and q.float()[7] == -57344
    # stochastic: a value 1/4 of the way between 1.0 and 1.25 (e5m2 has two mantissa bits) rounds up 1/4 of the time
    s = fp8.round_fp8(torch.full((20000,), 1.0625), "stochastic", seed=5, dtype=torch.float8_e5m2)
    assert set(s.float().unique().tolist()) == {1.0, 1.25}
    assert abs(float((s.float() == 1.25).float().mean()) - 0.25) < 0.015
    assert fp8.fresh_scale(57344.0, dtype=torch.float8_e5m2) == 1.0
    assert fp8.fp8_max(torch.float8_e5m2) == 57344.0


def test_comfy_quant_state_dict_finds_its_weight_scale_keys(case):
    """A state dict as a comfy_quant file stores it (`<layer>.weight_scale`) merges like the explicit parts."""
    lora = load_lora(case.path)
    tensors, scales = _quantized_parts(torch.float8_e4m3fn)
    state_dict = {k: v.clone() for k, v in tensors.items()}
    for key, s in scales.items():
        state_dict[key[: -len(".weight")] + ".weight_scale"] = s.clone()
    fp8.merge_loras_fp8(tensors, [(lora, 1.0)], scales=scales)
    fp8.merge_loras_fp8(state_dict, [(lora, 1.0)])
    for key, s in scales.items():
        assert torch.equal(bits(state_dict[key]), bits(tensors[key])), key
        assert float(state_dict[key[: -len(".weight")] + ".weight_scale"]) == float(s), key
