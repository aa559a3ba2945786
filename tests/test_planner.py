"""The memory planner: known Flux figures, verdicts for the 24 GB cases, the header-read path, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lora_ops.cli import main as cli_main
from lora_ops.errors import LoRAOpsError, ModelMismatchError, UnsafeFileError
from lora_ops.flux import FLUX_DEV, FluxShape, flux_weight_shapes, is_block_linear, parameter_count
from lora_ops.fp8 import policy_size
from lora_ops.planner import (
    GIB,
    MISTRAL_SMALL_3_1,
    QWEN3_4B,
    QWEN3_8B,
    T5_XXL,
    UNMERGED_BYTES_PER_PARAM,
    activation_points,
    clip_l_text_params,
    flux_ae_params,
    kohya_lora_params,
    plan,
    t5_xxl_encoder_params,
    text_encoder_for,
    vae_params,
)
from lora_ops.synthetic import write_flux_checkpoint, write_kohya_lora

TINY = FluxShape(
    hidden=64,
    depth=2,
    depth_single=3,
    heads=2,
    in_channels=16,
    out_channels=16,
    context_dim=32,
    vec_dim=24,
    time_dim=16,
)
#: kohya's flux_minimal_inference with --offload: only the diffusion model (and LoRA) on the GPU.
OFFLOAD = dict(text_encoder="offload", clip="offload", vae="offload")


# --- known figures ------------------------------------------------------------------------------


def test_flux_dev_weights_from_architecture():
    p = plan(model="flux-dev", dtype="bf16")
    assert p.params == parameter_count(FLUX_DEV) == 11_901_408_320
    assert p.weight_bytes == 2 * 11_901_408_320
    assert round(p.weight_bytes / GIB, 2) == 22.17
    assert set(p.weights) == {"bf16"}


def test_rank32_kohya_lora_figures():
    modules = [n for n in flux_weight_shapes(FLUX_DEV) if is_block_linear(n)]
    assert len(modules) == 304
    assert kohya_lora_params(FLUX_DEV, 1) == 4_786_176
    assert round(kohya_lora_params(FLUX_DEV, 32) / 1e6, 1) == 153.2
    p = plan(model="flux-dev", lora_rank=32, mode="unmerged", card_gib=24, **OFFLOAD)
    assert p.lora_params == kohya_lora_params(FLUX_DEV, 32)
    assert p.lora_resident_bytes == p.lora_params * UNMERGED_BYTES_PER_PARAM
    assert round(p.lora_resident_bytes / GIB, 2) == 0.86


def test_companion_models_from_their_configs():
    assert round(t5_xxl_encoder_params() / 1e9, 3) == 4.762
    assert round(t5_xxl_encoder_params() * 2 / GIB, 2) == 8.87
    assert round(clip_l_text_params() / 1e6) == 124  # 123.65 M
    assert round(flux_ae_params() / 1e6) == 84


def test_text_encoders_match_their_published_sizes():
    """The LLM encoders as ComfyUI loads them; published: Qwen3-4B 4.0 B (3.6 B without the embedding), Qwen3-8B
    8.2 B (6.95 B), Mistral Small 3.1 24 B with its 0.4 B vision tower and output head, which ComfyUI does not load."""
    assert round(QWEN3_4B.params / 1e9, 2) == 4.02
    assert round((QWEN3_4B.params - 151936 * 2560) / 1e9, 1) == 3.6
    assert round(QWEN3_8B.params / 1e9, 2) == 8.19
    assert round((QWEN3_8B.params - 2 * 151936 * 4096) / 1e9, 2) == 6.95
    assert round(MISTRAL_SMALL_3_1.params / 1e9, 2) == 22.90
    assert 23.5e9 < MISTRAL_SMALL_3_1.params + 131072 * 5120 < 23.7e9  # + output head; the rest is the vision tower
    # fp8 files keep the embedding and the norms in bf16
    assert QWEN3_4B.bytes("fp8") == QWEN3_4B.params + QWEN3_4B.bf16_in_fp8
    assert QWEN3_4B.bf16_in_fp8 == 151936 * 2560 + 36 * (2 * 2560 + 2 * 128) + 2560
    # the encoder follows from the width txt_in reads: Flux.2 stacks three hidden states of its LLM
    assert text_encoder_for(4096) is T5_XXL and text_encoder_for(3 * 5120) is MISTRAL_SMALL_3_1
    assert text_encoder_for(3 * 2560) is QWEN3_4B and text_encoder_for(3 * 4096) is QWEN3_8B
    assert text_encoder_for(1234) is None
    assert vae_params(64) == flux_ae_params() and vae_params(128) == flux_ae_params(z_channels=32)


def test_activation_model_at_one_megapixel():
    p = plan(model="flux-dev", width=1024, height=1024)
    assert (p.image_tokens, p.text_tokens) == (4096, 512)
    assert p.activation_at == "single block: RoPE"
    unit = 4608 * 3072 * 2
    assert 23.1 * unit < p.activation_bytes < 23.4 * unit  # ~0.61 GiB (+ text stream and RoPE table)
    assert round(p.activation_bytes / GIB, 2) == 0.61
    cfg = plan(model="flux-dev", width=1024, height=1024, cfg=True)
    assert cfg.effective_batch == 2
    assert cfg.activation_bytes == pytest.approx(2 * p.activation_bytes, rel=0.01)


def test_lora_branch_and_fp8_upcast_enter_the_linear_points():
    base = activation_points(FLUX_DEV, 4096, 512, 1)
    with_lora = activation_points(FLUX_DEV, 4096, 512, 1, lora_targets=["single_blocks.0.linear1.weight"])
    assert with_lora["single block: linear1"] - base["single block: linear1"] == 4608 * 21504 * 2
    assert with_lora["single block: RoPE"] == base["single block: RoPE"]
    fp8 = activation_points(
        FLUX_DEV,
        4096,
        512,
        1,
        weight_dtype={f"single_blocks.{i}.linear1.weight": torch.float8_e4m3fn for i in range(38)},
    )
    assert fp8["single block: linear1"] - base["single block: linear1"] == 21504 * 3072 * 2


# --- comparisons --------------------------------------------------------------------------------


def test_merged_saves_exactly_the_lora_bytes():
    unmerged = plan(model="flux-dev", lora_rank=32, mode="unmerged", **OFFLOAD)
    merged = plan(model="flux-dev", lora_rank=32, mode="merged", **OFFLOAD)
    assert unmerged.sampling_bytes - merged.sampling_bytes == unmerged.lora_resident_bytes
    assert merged.lora_resident_bytes == 0
    # merging is a load-time peak of weights + one tile, far below the full-layer fp32 method
    assert merged.merge_peak_bytes - merged.resident_bytes == merged.merge["ours_bytes"]
    assert merged.merge["tile_bytes"] <= 64 * 2**20
    assert merged.merge["factors_bytes"] == 4 * 32 * (21504 + 3072)  # linear1's factors, fp32, one weight at a time
    assert merged.merge["full_layer_bytes"] >= 2 * 21504 * 3072 * 4
    assert merged.merge["full_layer_key"].endswith("linear1.weight")


def test_fp8_halves_weights():
    bf16 = plan(model="flux-dev", dtype="bf16")
    fp8 = plan(model="flux-dev", dtype="fp8")
    assert fp8.weight_bytes * 2 == bf16.weight_bytes
    default = plan(model="flux-dev", dtype="fp8-default")
    quality = plan(model="flux-dev", dtype="fp8-quality")
    assert fp8.weight_bytes < default.weight_bytes < quality.weight_bytes < bf16.weight_bytes
    # fp8-quality keeps the 3.2 B modulation params in bf16: ~15.5 GB, as kohya's fp8_scaled branch
    assert 15.0e9 < quality.weight_bytes < 15.6e9
    # the same layout lora_ops.fp8 writes (fp8 weights + one fp32 scale each + the marker)
    for name, p in (("default", default), ("quality", quality)):
        assert p.weight_bytes == policy_size(FLUX_DEV, name).total


def test_issue_1466_rank32_unmerged_on_24gb():
    p = plan(
        model="flux-dev", dtype="bf16", lora_rank=32, mode="unmerged", width=1024, height=1024, card_gib=24, **OFFLOAD
    )
    assert p.fits is False and p.verdict == "does not fit"
    assert p.usable_bytes == int(23.5 * GIB)
    assert p.suggestion == ["merge the LoRA"] and p.suggestion_fits
    merged = plan(
        model="flux-dev", dtype="bf16", lora_rank=32, mode="merged", width=1024, height=1024, card_gib=24, **OFFLOAD
    )
    assert merged.fits is True and merged.suggestion is None
    assert merged.peak_bytes == p.suggestion_peak_bytes
    rank4 = plan(model="flux-dev", lora_rank=4, card_gib=24, **OFFLOAD)  # "nearly 24GB" but it runs
    assert rank4.fits is True


def test_merge_peak_counts_one_weights_fp32_factors():
    """A rank-128 merge into bf16 on 24 GB fits: the engine holds one weight's fp32 factors on the device at a
    time, plus the tile."""
    p = plan(model="flux-dev", lora_rank=128, mode="merged", card_gib=24, **OFFLOAD)
    assert p.sampling_bytes < p.usable_bytes
    assert p.fits is True
    largest = 128 * (21504 + 3072) * 4  # linear1's factors in fp32
    assert p.merge_peak_bytes - p.sampling_bytes <= 64 * 2**20 + largest


def test_suggestions_follow_the_cost_order():
    # T5 kept on the GPU in bf16: merging alone is not enough; fp8 weights is the next cheapest.
    p = plan(model="flux-dev", lora_rank=32, card_gib=24)
    assert p.fits is False
    assert p.suggestion == ["fp8 weights (fp8-default)"]
    # CFG with a LoRA on 24 GB (#1919): merge
    cfg = plan(model="flux-dev", lora_rank=16, cfg=True, card_gib=24, **OFFLOAD)
    assert cfg.fits is False and cfg.suggestion == ["merge the LoRA"]
    # nothing is enough on a tiny card
    tiny = plan(model="flux-dev", lora_rank=32, card_gib=8, batch=4, cfg=True)
    assert tiny.fits is False and tiny.suggestion_fits is False
    # several changes together, each one needed: unmerged fp8 + offloaded T5 is still 0.07 GiB over
    combo = plan(model="flux-dev", lora_rank=128, card_gib=16)
    assert combo.suggestion == ["merge the LoRA", "fp8 weights (fp8-default)", "offload T5"]
    assert combo.suggestion_fits
    assert plan(model="flux-dev", lora_rank=128, card_gib=16, dtype="fp8-default", text_encoder="offload").fits is False
    # when nothing fits, the strongest combination is reported (T5 offloaded, not merely fp8)
    assert "offload T5" in tiny.suggestion and "fp8 T5" not in tiny.suggestion


def test_json_form_is_serialisable():
    data = json.loads(json.dumps(plan(model="flux-dev", lora_rank=32, card_gib=24).to_dict()))
    assert data["verdict"] == "does not fit"
    assert data["weights"]["bf16"]["params"] == 11_901_408_320
    assert data["totals"]["peak_bytes"] > data["card"]["usable_bytes"]


# --- header-read path -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_checkpoint_header_path(tmp_path, prefix):
    ckpt = write_flux_checkpoint(tmp_path / "tiny.safetensors", TINY, prefix=prefix)
    lora = write_kohya_lora(tmp_path / "lora.safetensors", TINY, rank=4)
    from_file = plan(model=str(ckpt), loras=[str(lora)], mode="unmerged", width=256, height=128, card_gib=1)
    assert from_file.params == parameter_count(TINY)
    assert from_file.weights == {"bf16": (parameter_count(TINY), 2 * parameter_count(TINY))}
    assert from_file.lora_params == kohya_lora_params(TINY, 4)
    assert from_file.image_tokens == 16 * 8
    expected = activation_points(
        TINY, 128, 512, 1, lora_targets=[n for n in flux_weight_shapes(TINY) if is_block_linear(n)]
    )
    assert from_file.activation_points == expected
    # planning another storage dtype for the same file
    as_fp8 = plan(model=str(ckpt), dtype="fp8")
    assert as_fp8.weight_bytes == parameter_count(TINY)


def test_checkpoint_stored_in_fp8_is_counted_as_stored(tmp_path):
    ckpt = write_flux_checkpoint(tmp_path / "tiny8.safetensors", TINY, dtype=torch.float8_e4m3fn)
    p = plan(model=str(ckpt), card_gib=1)
    assert p.weights == {"fp8_e4m3fn": (parameter_count(TINY), parameter_count(TINY))}


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(width=-1024), "width"),
        (dict(height=0), "height"),
        (dict(batch=0), "batch"),
        (dict(lora_rank=-32), "rank"),
        (dict(card_gib=-24), "card"),
        (dict(dtype="int4"), "int4"),
        (dict(mode="bypass"), "bypass"),
        (dict(text_encoder="fp4"), "text-encoder"),
        (dict(model="flux-pro"), "flux-pro"),
    ],
)
def test_bad_input_is_a_clear_error(kw, words):
    with pytest.raises(LoRAOpsError, match=words):
        plan(**kw)


def test_unreadable_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(UnsafeFileError):
        plan(model=str(junk))
    with pytest.raises(UnsafeFileError, match="cannot read"):
        plan(model=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    other = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(ModelMismatchError, match="not a Flux"):
        plan(model=str(other))
    with pytest.raises(LoRAOpsError):
        plan(model="flux-dev", loras=[str(junk)])


def test_cli_plan(capsys):
    assert (
        cli_main(
            [
                "plan",
                "--model",
                "flux-dev",
                "--dtype",
                "bf16",
                "--lora-rank",
                "32",
                "--mode",
                "unmerged",
                "--width",
                "1024",
                "--height",
                "1024",
                "--card",
                "24",
                "--t5",
                "offload",
                "--clip",
                "offload",
                "--vae",
                "offload",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "does not fit" in out and "merge the LoRA" in out and "22.17" in out
    assert cli_main(["plan", "--lora-rank", "32", "--card", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert cli_main(["plan", "--model", "flux-pro"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model") and err.count("\n") == 1
