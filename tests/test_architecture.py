"""The architecture module: named Flux-family models, their sizes, and recognising them from a state dict."""

from __future__ import annotations

import pytest
from lora_factory import TINY_FLUX2

from lora_ops.flux import (
    CHROMA,
    FLUX1,
    FLUX2,
    FLUX2_DEV,
    TOP_LEVEL_MODULES,
    VARIANTS,
    FluxShape,
    describe,
    detect_family,
    flux_weight_shapes,
    is_flux_state_dict,
    is_modulation,
    parameter_count,
    shape_from_state_dict,
)

TINY_CHROMA = FluxShape(
    family=CHROMA,
    hidden=64,
    depth=1,
    depth_single=2,
    heads=2,
    in_channels=16,
    out_channels=16,
    context_dim=48,
    vec_dim=0,
    guidance=False,
    approx_in=8,
    approx_hidden=40,
    approx_layers=2,
)


def test_published_parameter_counts():
    """Flux.1 dev's exact count (11,901,408,320, its safetensors file) and the published Flux.2 / Chroma sizes."""
    assert parameter_count(VARIANTS["flux1-dev"]) == 11_901_408_320
    dev2 = parameter_count(FLUX2_DEV)
    assert dev2 == 32_223_281_152  # diffusers' Flux2Transformer2DModel defaults give the same sum
    # BFL: "32B parameters", "73 % of the parameters are in the single-stream blocks".
    single = sum(
        _numel(dims) for name, dims in flux_weight_shapes(FLUX2_DEV).items() if name.startswith("single_blocks.")
    )
    assert round(single / dev2 * 100) == 73
    assert round(parameter_count(VARIANTS["flux2-klein-4b"]) / 1e9) == 4
    assert round(parameter_count(VARIANTS["flux2-klein-9b"]) / 1e9) == 9
    assert round(parameter_count(VARIANTS["chroma"]) / 1e8) == 89  # "8.9B"


def _numel(dims):
    n = 1
    for d in dims:
        n *= d
    return n


def test_flux2_weights_are_shared_modulation_gated_mlp_and_no_biases():
    shapes = flux_weight_shapes(FLUX2_DEV)
    h, m = 6144, 3 * 6144
    assert not [n for n in shapes if n.endswith(".bias")]
    assert not [n for n in shapes if "_mod.lin" in n or ".modulation.lin" in n or n.startswith("vector_in")]
    assert shapes["double_stream_modulation_img.lin.weight"] == (6 * h, h)
    assert shapes["double_stream_modulation_txt.lin.weight"] == (6 * h, h)
    assert shapes["single_stream_modulation.lin.weight"] == (3 * h, h)
    assert shapes["double_blocks.7.img_mlp.0.weight"] == (2 * m, h)  # gate and value halves
    assert shapes["double_blocks.7.txt_mlp.2.weight"] == (h, m)
    assert shapes["single_blocks.47.linear1.weight"] == (3 * h + 2 * m, h)  # q, k, v, both MLP inputs
    assert shapes["single_blocks.47.linear2.weight"] == (h, h + m)
    assert shapes["single_blocks.0.norm.key_norm.scale"] == (128,)
    assert shapes["img_in.weight"] == (h, 128) and shapes["final_layer.linear.weight"] == (128, h)
    assert shapes["txt_in.weight"] == (h, 15360)
    assert "double_blocks.8.img_attn.qkv.weight" not in shapes and "single_blocks.48.linear1.weight" not in shapes


def test_chroma_has_no_block_modulation_and_an_approximator():
    shapes = flux_weight_shapes(VARIANTS["chroma"])
    assert not [n for n in shapes if "_mod.lin" in n or ".modulation.lin" in n or "adaLN" in n]
    assert not [n for n in shapes if n.startswith(("time_in", "vector_in", "guidance_in"))]
    assert shapes["distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    assert shapes["distilled_guidance_layer.layers.4.out_layer.weight"] == (5120, 5120)
    assert shapes["distilled_guidance_layer.norms.4.scale"] == (5120,)
    assert shapes["distilled_guidance_layer.out_proj.weight"] == (3072, 5120)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_every_variant_is_recovered_from_its_shapes(name, prefix):
    shape = VARIANTS[name]
    shapes = {prefix + k: v for k, v in flux_weight_shapes(shape).items()}
    assert shape_from_state_dict(shapes) == shape
    assert name in describe(shape)


@pytest.mark.parametrize("shape", [TINY_FLUX2, TINY_CHROMA], ids=["flux2", "chroma"])
def test_tiny_shapes_round_trip_and_match_a_loaded_comfyui_model(shape):
    """ComfyUI's loaded model renames `*_norm.scale` / `norms.N.scale` to `.weight`; detection must not care."""
    shapes = flux_weight_shapes(shape)
    assert shape_from_state_dict(shapes) == shape
    loaded = {
        "diffusion_model." + (k[: -len(".scale")] + ".weight" if k.endswith(".scale") else k): v
        for k, v in shapes.items()
    }
    assert shape_from_state_dict(loaded) == shape


def test_family_detection_and_refusals():
    assert detect_family(flux_weight_shapes(VARIANTS["flux1-schnell"])) == FLUX1
    assert detect_family(flux_weight_shapes(TINY_CHROMA)) == CHROMA
    assert detect_family(flux_weight_shapes(TINY_FLUX2)) == FLUX2
    assert not is_flux_state_dict(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    with pytest.raises(ValueError, match="not a Flux checkpoint"):
        detect_family(["transformer_blocks.0.attn.to_q.weight"])
    radiance = {**flux_weight_shapes(TINY_CHROMA), "nerf_blocks.0.norm.scale": (8,)}
    with pytest.raises(ValueError, match="Chroma Radiance"):
        detect_family(radiance)
    with pytest.raises(ValueError, match="unknown Flux family"):
        FluxShape(family="sd3")


def test_top_level_modules_cover_every_family():
    for shape in (*VARIANTS.values(), TINY_CHROMA, TINY_FLUX2):
        assert {n.split(".", 1)[0] for n in flux_weight_shapes(shape)} <= set(TOP_LEVEL_MODULES)


def test_kontext_and_krea_are_flux1_dev_weights():
    assert VARIANTS["flux1-kontext"] == VARIANTS["flux1-krea"] == VARIANTS["flux1-dev"]
    assert describe(VARIANTS["flux1-dev"]).startswith("Flux.1 (flux1-dev / flux1-kontext / flux1-krea)")


def test_modulation_names_cover_both_layouts():
    assert is_modulation("double_blocks.0.img_mod.lin.weight")
    assert is_modulation("single_blocks.3.modulation.lin.weight")
    assert is_modulation("double_stream_modulation_txt.lin.weight")
    assert is_modulation("single_stream_modulation.lin.weight")
    assert not is_modulation("single_blocks.3.linear1.weight")
