"""In-place merges into fp8 weights: fresh scales, exact undo, all-or-nothing (lora_ops.fp8.codecs)."""

from __future__ import annotations

import pytest
import torch
from fp8_cases import E4M3, QKV, flux_module
from tensor_checks import assert_same_bits, bits, snapshot

from lora_ops import fp8
from lora_ops.merge import MergeOptions, merge_loras


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_in_place_fp8_merge_fresh_scale_exact_undo(base, lora, lora2, rounding):
    module = flux_module(base)
    fp8.cast_module_fp8(module, "default")
    original = snapshot(module)
    state = fp8.merge_loras_fp8(module, [(lora, 1.0), (lora2, 0.5)], rounding=rounding, seed=3)
    layer = module.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    direct_q, direct_s = fp8.quantize_merged(
        original["diffusion_model." + QKV], [(a, 1.0) for a in lora.targets[QKV]] + [(a, 0.5) for a in
                                                                                    lora2.targets[QKV]],
        key=QKV, weight_scale=original["diffusion_model." + QKV.replace(".weight", ".weight_scale")],
        rounding=rounding, seed=3)
    assert float(layer.scale_weight) == float(direct_s)  # fresh scale, from the merged tensor
    same = (bits(layer.weight) == bits(direct_q)).float().mean()
    assert same > 0.995
    fp8_bytes = sum(v.numel() for v in original.values() if v.dtype == E4M3)
    # the journal is never larger than a full fp8 backup; with stochastic rounding about 1/4 of the elements
    # miss (|rounding error| > half an ulp), so it ends up dense (= a backup)
    assert state.journal_bytes <= fp8_bytes
    if rounding == "nearest":
        assert state.journal_bytes < 0.6 * fp8_bytes
    # move to another stack, then restore: bit-exact, scales included
    state = fp8.merge_loras_fp8(module, [(lora2, -1.0)], state=state, rounding=rounding, seed=3)
    fresh = flux_module(base)
    fp8.cast_module_fp8(fresh, "default")
    fp8.merge_loras_fp8(fresh, [(lora2, -1.0)], rounding=rounding, seed=3)
    assert_same_bits(snapshot(fresh), snapshot(module))
    fp8.merge_loras_fp8(module, [], state=state)
    assert_same_bits(original, snapshot(module))


def test_in_place_fp8_merge_failure_leaves_everything_unchanged(base, lora):
    sd = fp8.merge_to_fp8(base, [], "default")
    before = snapshot(sd)
    seen = []

    def on_tile(key, i, rows):
        seen.append(key)
        if len(set(seen)) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fp8.merge_loras_fp8(sd, [(lora, 1.0)], options=MergeOptions(on_tile=on_tile, tile_bytes=4096))
    assert len(set(seen)) == 4
    assert_same_bits(before, snapshot(sd))


def test_in_place_merge_into_plain_fp8_model(base, lora):
    """No scales anywhere: a plain fp8 model (ComfyUI's fp8_e4m3fn loader); weights keep scale 1, exact undo."""
    plain = {k: (v.to(E4M3) if v.dim() == 2 else v) for k, v in base.items()}
    before = snapshot(plain)
    state = fp8.merge_loras_fp8(plain, [(lora, 1.0)])
    ref = before[QKV].float()
    merge_loras({QKV: ref}, [(lora.only({QKV}), 1.0)])
    assert torch.equal(bits(plain[QKV]), bits(ref.clamp(-448, 448).to(E4M3)))
    fp8.merge_loras_fp8(plain, [], state=state)
    assert_same_bits(before, snapshot(plain))


def test_in_place_fp8_journal_fraction(base, lora):
    """How much the exact-undo journal costs for fp8 (documented in fp8.py)."""
    sd = fp8.merge_to_fp8(base, [], "default")
    state = fp8.merge_loras_fp8(sd, [(lora, 1.0)])
    fp8_bytes = sum(v.numel() for v in sd.values() if v.dtype == E4M3 and v.dim() == 2)
    fraction = state.journal_bytes / fp8_bytes
    print(f"fp8 journal: {state.journal_bytes} bytes = {fraction:.1%} of the fp8 weights (ΔW ≈ 10 % of W)")
    assert fraction < 1.0
