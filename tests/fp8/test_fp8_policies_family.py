"""fp8 presets across the family: what Flux.2 and Chroma keep in bf16, and the sizes the README states."""

from __future__ import annotations

import math

from lora_ops import fp8
from lora_ops.flux import FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, VARIANTS, flux_weight_shapes

GIB = 1 << 30
SHARED = (
    "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.lin.weight",
)


def _selected(shape, preset: str) -> set[str]:
    return set(fp8.fp8_keys(flux_weight_shapes(shape), preset))


def test_flux2_presets_keep_the_shared_modulation_embedders_and_final_layer_bf16():
    shapes = flux_weight_shapes(FLUX2_KLEIN_4B)
    blocks = {n for n, d in shapes.items() if n.startswith(("double_blocks.", "single_blocks.")) and len(d) == 2}
    default, quality, everything = (_selected(FLUX2_KLEIN_4B, p) for p in ("default", "quality", "all"))
    assert default == blocks  # every block Linear (attention, gated MLP, linear1/2), nothing else
    assert quality == default  # no per-block modulation in Flux.2
    assert not set(SHARED) & default
    assert everything == {n for n, d in shapes.items() if n.endswith(".weight") and len(d) == 2}
    assert set(SHARED) <= everything and "img_in.weight" in everything


def test_chroma_modulation_network_only_under_all():
    chroma = VARIANTS["chroma"]
    names = {n for n in flux_weight_shapes(chroma) if n.startswith("distilled_guidance_layer.")}
    assert names and not names & _selected(chroma, "default")
    assert {n for n in names if n.endswith(".weight") and "norms" not in n} <= _selected(chroma, "all")


def test_flux2_sizes_as_in_the_readme():
    """Flux.2 dev: 30.77 GiB under default and quality (block Linears fp8 + one fp32 scale each, the rest bf16)."""
    shapes = flux_weight_shapes(FLUX2_DEV)
    fp8_params = sum(
        math.prod(d) for n, d in shapes.items() if n.startswith(("double_blocks.", "single_blocks.")) and len(d) == 2
    )
    dev = fp8.policy_size(FLUX2_DEV, "default")
    assert dev.fp8_bytes == fp8_params
    assert dev.fp8_tensors == 8 * 2 * 4 + 48 * 2
    assert dev.total == fp8_params + 2 * (sum(math.prod(d) for d in shapes.values()) - fp8_params) + 4 * 160 + 2
    assert round(dev.total / GIB, 2) == 30.77
    assert fp8.policy_size(FLUX2_DEV, "quality").total == dev.total
    assert round(fp8.policy_size(FLUX2_KLEIN_4B, "default").total / GIB, 2) == 3.79
    assert round(fp8.policy_size(FLUX2_KLEIN_9B, "default").total / GIB, 2) == 8.79
    assert fp8.policy_size(FLUX2_DEV, "all").total < dev.total
