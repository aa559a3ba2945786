"""The planner across the Flux family: Flux.2 dev / klein, Chroma, Kontext / Krea, and any checkpoint.

Parameter counts are checked against arithmetic written out here from the published configurations
(BFL's flux2 `Flux2Params` / `Klein4BParams` / `Klein9BParams`, ComfyUI 0.33's model_detection.py), not
against the architecture module's own tables; the 24 GB / 16 GB verdicts are the ones the README states.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from lora_factory import TINY

from lora_ops.cli import main as cli_main
from lora_ops.errors import ModelMismatchError
from lora_ops.flux import (
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX_DEV,
    VARIANTS,
    flux_weight_shapes,
    is_block_linear,
    parameter_count,
)
from lora_ops.planner import GIB, MISTRAL_SMALL_3_1, QWEN3_4B, QWEN3_8B, activation_points, plan
from lora_ops.synthetic import write_flux_checkpoint, write_kohya_lora

LLM_ONLY = dict(clip="offload", vae="offload")


def flux2_params(hidden: int, double: int, single: int, context: int, guidance: bool) -> int:
    """Flux.2 by hand: no biases, mlp_ratio 3 with a gated MLP (its input Linear is 2 x 3H wide), one shared
    modulation for the double blocks (img 6H, txt 6H) and one for the single blocks (3H), 128 latent channels,
    timestep (and guidance) embedders 256 -> H -> H, final layer H -> 128 with its adaLN H -> 2H, qk-norm 128 each."""
    h, m = hidden, 3 * hidden
    embedders = 128 * h + (2 if guidance else 1) * (256 * h + h * h) + context * h
    stream = 3 * h * h + h * h + h * 2 * m + m * h + 2 * 128  # qkv, proj, mlp.0 (gated), mlp.2, q/k norms
    single_block = h * (3 * h + 2 * m) + (h + m) * h + 2 * 128  # linear1, linear2, q/k norms
    shared_modulation = (6 + 6 + 3) * h * h
    final = h * 128 + h * 2 * h
    return embedders + double * 2 * stream + single * single_block + shared_modulation + final


def test_flux2_parameter_counts_match_the_published_models():
    dev = plan(model="flux2-dev")
    assert dev.params == flux2_params(6144, 8, 48, 15360, guidance=True) == parameter_count(FLUX2_DEV)
    assert dev.params == 32_223_281_152  # "32 B"; flux2-dev.safetensors is 64.4 GB in bf16
    assert round(dev.weight_bytes / 1e9, 1) == 64.4
    klein4 = plan(model="flux2-klein-4b")
    assert klein4.params == flux2_params(3072, 5, 20, 7680, guidance=False) == parameter_count(FLUX2_KLEIN_4B)
    assert round(klein4.params / 1e9, 2) == 3.88  # "4 B"
    klein9 = plan(model="flux2-klein-9b")
    assert klein9.params == flux2_params(4096, 8, 24, 12288, guidance=False) == parameter_count(FLUX2_KLEIN_9B)
    assert round(klein9.params / 1e9, 2) == 9.08  # "9 B"


def test_json_params_of_flux2_dev(capsys):
    assert cli_main(["plan", "--model", "flux2-dev", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 32_223_281_152
    assert data["weights"]["bf16"]["bytes"] == 2 * 32_223_281_152


def test_chroma_kontext_krea():
    chroma = plan(model="chroma")
    assert round(chroma.params / 1e9, 1) == 8.9  # Chroma: "8.9 B", Flux.1-schnell without per-block modulation
    assert not any("_mod.lin" in n or "modulation.lin" in n for n in flux_weight_shapes(VARIANTS["chroma"]))
    for name in ("flux1-kontext", "flux1-krea"):
        same = plan(model=name)
        assert same.params == plan(model="flux1-dev").params == parameter_count(FLUX_DEV)
        assert any("Flux.1 dev's architecture" in note for note in same.notes)


@pytest.mark.parametrize(
    "model, encoder, clip",
    [
        ("flux1-dev", "T5-XXL", True),
        ("chroma", "T5-XXL", False),
        ("flux2-dev", MISTRAL_SMALL_3_1.name, False),
        ("flux2-klein-4b", QWEN3_4B.name, False),
        ("flux2-klein-9b", QWEN3_8B.name, False),
    ],
)
def test_each_family_brings_its_text_encoder(model, encoder, clip):
    p = plan(model=model)
    assert f"{encoder} bf16" in p.encoders
    assert ("CLIP-L bf16" in p.encoders) is clip
    fp8 = plan(model=model, text_encoder="fp8")
    assert f"{encoder} fp8 (embedding, norms bf16)" in fp8.encoders
    assert not any(encoder in label for label in plan(model=model, text_encoder="offload").encoders)


def test_flux2_dev_fits_no_consumer_card_short_of_offloading():
    """fp8 weights alone are 30.8 GiB: no change the planner lists gets Flux.2 dev onto 24 GB or 16 GB; it says how
    much of the weights must then stay in system RAM."""
    for card in (24, 16):
        p = plan(model="flux2-dev", lora_rank=32, card_gib=card)
        assert p.fits is False and p.suggestion_fits is False
        assert "merge the LoRA" in p.suggestion and "offload Mistral" in p.suggestion
        best = plan(
            model="flux2-dev", lora_rank=32, card_gib=card, mode="merged", dtype="fp8-default", text_encoder="offload"
        )
        assert p.offload_bytes == best.peak_bytes - best.usable_bytes > 0
        assert "only by offloading" in p.format_table()
    assert round(plan(model="flux2-dev", dtype="fp8-default").weight_bytes / GIB, 1) > 30
    assert plan(
        model="flux2-dev", lora_rank=32, mode="merged", dtype="fp8-default", text_encoder="offload", card_gib=48
    ).fits


def test_klein_verdicts_on_24_and_16_gb():
    k9 = plan(model="flux2-klein-9b", lora_rank=32, card_gib=24)
    assert k9.fits is False and k9.suggestion == ["offload Qwen3"] and k9.suggestion_fits
    k9_16 = plan(model="flux2-klein-9b", lora_rank=32, card_gib=16)
    assert k9_16.suggestion_fits and "offload Qwen3" in k9_16.suggestion
    assert any(s.startswith("fp8 weights") for s in k9_16.suggestion)
    assert plan(model="flux2-klein-4b", lora_rank=32, card_gib=24).fits is True


def test_flux2_gated_mlp_in_the_activation_model():
    s, t, ti = FLUX2_KLEIN_4B, 4096 + 512, 4096
    base = activation_points(s, ti, 512, 1)
    lora = activation_points(s, ti, 512, 1, lora_targets=["single_blocks.0.linear1.weight"])
    # linear1 is 3H + 2M wide (q, k, v, and the gate and value halves of the MLP): 3072 * 9 rows
    assert lora["single block: linear1"] - base["single block: linear1"] == t * 9 * 3072 * 2
    flux1 = activation_points(FLUX_DEV, ti, 512, 1)
    # the single block's RoPE point holds linear1's output: 9U for Flux.2 against 7U for Flux.1 at equal width
    assert base["single block: RoPE"] - flux1["single block: RoPE"] == 2 * t * 3072 * 2


def test_a_flux2_checkpoint_is_planned_from_its_header(tmp_path):
    tiny = dataclasses.replace(FLUX2_KLEIN_4B, hidden=256, heads=2, depth=2, depth_single=3)  # txt_in: 3 x 2560
    ckpt = write_flux_checkpoint(tmp_path / "klein_tiny.safetensors", tiny, prefix="model.diffusion_model.")
    p = plan(model=str(ckpt), card_gib=24, lora_rank=4)
    assert p.params == parameter_count(tiny)
    assert p.weights == {"bf16": (parameter_count(tiny), 2 * parameter_count(tiny))}
    assert f"{QWEN3_4B.name} bf16" in p.encoders  # txt_in reads 3 x 2560: Qwen3-4B
    assert p.notes[0].startswith("Flux.2")
    blocks = [n for n in flux_weight_shapes(tiny) if is_block_linear(n)]
    assert p.lora_params == 4 * sum(sum(flux_weight_shapes(tiny)[n]) for n in blocks)


def test_resize_is_suggested_where_a_smaller_rank_fits(tmp_path):
    """A rank-128 LoRA kept unmerged on klein 9B, 20 GB card, Qwen3 offloaded: the largest rank that fits."""
    p = plan(model="flux2-klein-9b", lora_rank=128, card_gib=20, text_encoder="offload", **LLM_ONLY)
    assert p.fits is False and p.resize_rank is not None and p.resize_rank < 128
    fitting = plan(model="flux2-klein-9b", lora_rank=p.resize_rank, card_gib=20, text_encoder="offload", **LLM_ONLY)
    assert fitting.fits and fitting.peak_bytes == p.resize_peak_bytes
    bigger = [r for r in (128, 96, 64, 48, 32, 24, 16) if r > p.resize_rank]
    assert not plan(model="flux2-klein-9b", lora_rank=min(bigger), card_gib=20, text_encoder="offload", **LLM_ONLY).fits
    assert f"resize it to rank {p.resize_rank}" in p.format_table()


def test_resize_figure_of_a_lora_file(tmp_path):
    """For a LoRA file, the saving comes from lora_ops.resize.unmerged_saving (rank arithmetic per layer)."""
    shape = TINY
    ckpt = write_flux_checkpoint(tmp_path / "tiny.safetensors", shape)
    lora = write_kohya_lora(tmp_path / "lora.safetensors", shape, rank=16)
    full = plan(model=str(ckpt), loras=[str(lora)])
    from lora_ops.planner.search import read_loras  # the loaded LoRA, as the search sees it

    info = read_loras(full.request, shape)
    assert info.max_rank == 16
    assert info.params_at_rank(shape, 4) == info.params * 4 // 16
    assert info.params_at_rank(shape, 32) == info.params


def test_a_lora_of_another_family_is_refused(tmp_path):
    """A Flux.1 LoRA planned on Flux.2 klein: the loader's family check, naming both; nothing is planned."""
    lora = write_kohya_lora(tmp_path / "flux1_lora.safetensors", TINY, rank=4)
    with pytest.raises(ModelMismatchError, match="Flux.2"):
        plan(model="flux2-klein-4b", loras=[str(lora)])
