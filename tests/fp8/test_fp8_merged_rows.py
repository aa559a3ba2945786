"""Merge-then-quantise tile by tile (lora_ops.fp8.merged_rows), through merge_to_fp8 and quantize_merged."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from fp8_cases import E4M3, QKV, TINY, fp32_reference
from tensor_checks import assert_same_bits, snapshot

from lora_ops import fp8, load_lora
from lora_ops.adapters import Diff, LoRA
from lora_ops.errors import LoRAFormatError
from lora_ops.formats import Coverage, LoRAFile
from lora_ops.merge import merge_loras


def test_merge_to_fp8_matches_fp32_reference(base, lora, lora2):
    stack = [(lora, 1.0), (lora2, -0.6)]
    out = fp8.merge_to_fp8(base, stack, "default", file_format="scaled_fp8")
    ref = fp32_reference(base, stack)
    ck = fp8.load_fp8_state_dict(out)
    assert ck.kind == "scaled_fp8" and ck.fp8_matmul is False
    assert out["scaled_fp8"].dtype == E4M3 and out["scaled_fp8"].numel() == 2
    for key in base:
        if fp8.PRESETS["default"].selects(key, base[key].shape):
            assert out[key].dtype == E4M3
            assert out[key[: -len(".weight")] + ".scale_weight"].shape == ()
            deq = ck.weight(key)
            dw = ref[key] - base[key].float()
            floor_q, floor_s = fp8.quantize(ref[key])
            floor = fp8.dequantize(floor_q, floor_s)
            # one rounding of the fp32 merge: at the e4m3 floor, within fp32 summation noise
            assert (deq - ref[key]).norm() <= (floor - ref[key]).norm() * 1.001 + 1e-9, key
            assert (deq != floor).float().mean() < 0.001, key
            assert (deq - ref[key]).norm() / dw.norm() < 0.6, key  # ΔW ~ 10 % of W
        else:
            assert out[key].dtype == base[key].dtype
            expected = ref[key].to(base[key].dtype)
            assert (out[key].float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7
    untouched = "img_in.weight"
    assert out[untouched] is base[untouched]  # shared, not copied


def test_merge_to_fp8_tile_independent_and_input_untouched(base, lora):
    before = snapshot(base)
    a = fp8.merge_to_fp8(base, [(lora, 0.8)], "quality")
    b = fp8.merge_to_fp8(base, [(lora, 0.8)], "quality", tile_bytes=2048)
    assert_same_bits(a, b)
    assert_same_bits(before, snapshot(base))
    assert a["double_blocks.0.img_mod.lin.weight"].dtype == torch.bfloat16


def test_merge_to_fp8_from_fp8_sources(base, lora):
    scaled = fp8.merge_to_fp8(base, [], "all")
    plain = {k: (v.to(E4M3) if k in scaled and scaled[k].dtype == E4M3 else v) for k, v in base.items()}
    for source in (scaled, plain):
        out = fp8.merge_to_fp8(source, [(lora, 1.0)], "default")
        ck = fp8.load_fp8_state_dict(out)
        src = fp8.load_fp8_state_dict(source)
        deq_base = src.weight(QKV)
        ref = deq_base.clone()
        merge_loras({QKV: ref}, [(lora.only({QKV}), 1.0)])
        assert (ck.weight(QKV) - ref).norm() / (ref - deq_base).norm() < 0.6
        # a layer the policy keeps 16-bit comes back as bf16, dequantised
        assert out["img_in.weight"].dtype == torch.bfloat16
        assert torch.allclose(out["img_in.weight"].float(), src.weight("img_in.weight"), rtol=2**-8, atol=0)


def test_fresh_scale_avoids_clipping_where_stale_scale_clips(base):
    w = base[QKV]
    q0, s0 = fp8.quantize(w)
    diff = torch.zeros(w.shape)
    diff[0, :8] = 3 * float(w.float().abs().max())  # a LoRA that pushes a few weights past 448 · s0
    term = [(Diff(diff, source_keys=("test.diff",), scale=1.0), 1.0)]
    ref = fp8.dequantize(q0, s0) + diff
    stale_q, stale_s = fp8.quantize_merged(q0, term, key=QKV, weight_scale=s0, scale=float(s0))
    fresh_q, fresh_s = fp8.quantize_merged(q0, term, key=QKV, weight_scale=s0)
    stale = fp8.dequantize(stale_q, stale_s)
    fresh = fp8.dequantize(fresh_q, fresh_s)
    assert float(fresh_s) > float(s0)
    assert float(stale[0, :8].max()) == pytest.approx(448 * float(s0))  # clipped
    assert (stale - ref).norm() / diff.norm() > 0.5
    assert (fresh - ref).norm() / diff.norm() < 0.1
    assert torch.allclose(fresh[0, :8], ref[0, :8], rtol=2**-4)


def test_inf_lora_is_a_clear_error_and_nothing_changes(base, lora, tmp_path):
    up = torch.randn(3 * TINY.hidden, 4)
    up[0, 0] = float("inf")
    bad = LoRA(up, torch.randn(4, TINY.hidden), source_keys=("lora_unet_x.lora_up.weight",), scale=1.0)
    with pytest.raises(LoRAFormatError, match="NaN or Inf"):
        fp8.quantize_merged(base[QKV], [(bad, 1.0)], key=QKV)
    bad_file = LoRAFile(Path("bad.safetensors"), "kohya", {QKV: [bad]}, Coverage())
    with pytest.raises(LoRAFormatError, match="NaN or Inf"):
        fp8.merge_to_fp8(base, [(bad_file, 1.0)])
    # finite factors whose product overflows fp32, on the 3rd weight of a stack: the in-place merge raises
    # before writing that weight and rolls the first two back, scales included
    target = "single_blocks.0.linear2.weight"
    rows, cols = base[target].shape
    huge = LoRA(torch.full((rows, 2), 1e20), torch.full((2, cols), 1e20), source_keys=("huge.lora_up.weight",),
                scale=1.0)
    big = LoRAFile(Path("huge.safetensors"), "kohya", {target: [huge]}, Coverage())
    sd = fp8.merge_to_fp8(base, [], "default")
    before = snapshot(sd)
    with pytest.raises(LoRAFormatError, match="NaN or Inf"):
        fp8.merge_loras_fp8(sd, [(lora, 1.0), (big, 1.0)])
    assert_same_bits(before, snapshot(sd))
    # a LoRA file with Inf is refused by the loader, and the CLI writes nothing
    from safetensors.torch import save_file

    from lora_ops.synthetic import kohya_lora_tensors

    tensors = kohya_lora_tensors(TINY, 4)
    tensors[next(k for k in tensors if k.endswith("lora_up.weight"))][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    with pytest.raises(LoRAFormatError):
        load_lora(tmp_path / "inf.safetensors")


def test_no_warnings_on_the_fp8_path(base, lora):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8.merge_to_fp8(base, [(lora, 1.0)], "default", rounding="stochastic")
