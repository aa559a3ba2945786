"""The Flux family's architecture: weight names, shapes and parameter counts, recognised from a model.

Flux.1 (dev, schnell, and Kontext / Krea, which share dev's weights), Chroma (Flux.1-schnell without
per-block modulation; a `distilled_guidance_layer` computes every block's modulation) and Flux.2
(dev, klein 4B / 9B: one modulation shared by all double blocks and one by all single blocks, a gated
SiLU MLP, no biases, 128 latent channels at patch size 1). Every consumer (LoRA formats, merge, fp8
policies, planner, nodes) takes its facts from a `FluxShape` built here or read from a checkpoint, so
the real models, tiny test models and the memory planner share one description.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

#: Prefixes under which Flux weights appear in checkpoints and in ComfyUI's model state dict.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

FLUX1, CHROMA, FLUX2 = "flux1", "chroma", "flux2"
FAMILY_NAMES = {FLUX1: "Flux.1", CHROMA: "Chroma", FLUX2: "Flux.2"}

#: Flux.2's shared modulation Linears (outside the blocks), by BFL module name.
FLUX2_SHARED_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
#: First name components of every family's weights (a checkpoint's other tensors are not the model's).
TOP_LEVEL_MODULES = (
    "img_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "txt_in",
    "distilled_guidance_layer",
    *FLUX2_SHARED_MODULATIONS,
    "double_blocks",
    "single_blocks",
    "final_layer",
)


@dataclass(frozen=True)
class FluxShape:
    """Sizes that determine every weight of a Flux-family model (defaults: Flux.1 dev, 19 + 38 blocks).

    `vec_dim` 0 means no `vector_in` (Chroma, Flux.2). The `approx_*` sizes are Chroma's
    `distilled_guidance_layer` and unused by the other families.
    """

    hidden: int = 3072
    depth: int = 19
    depth_single: int = 38
    heads: int = 24
    mlp_ratio: int = 4
    in_channels: int = 64
    out_channels: int = 64
    context_dim: int = 4096
    vec_dim: int = 768
    time_dim: int = 256
    guidance: bool = True
    family: str = FLUX1
    approx_in: int = 64
    approx_hidden: int = 5120
    approx_layers: int = 5

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise ValueError(f"unknown Flux family {self.family!r}; known: {', '.join(FAMILY_NAMES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * self.mlp_ratio

    @property
    def gated_mlp(self) -> bool:
        """Flux.2's MLP input Linear produces gate and value halves (SiLU(gate) * value)."""
        return self.family == FLUX2

    @property
    def mlp_in(self) -> int:
        """Output rows of the MLP input Linear (img_mlp.0, and the MLP part of linear1)."""
        return 2 * self.mlp_hidden if self.gated_mlp else self.mlp_hidden

    @property
    def biases(self) -> bool:
        return self.family != FLUX2

    @property
    def block_modulation(self) -> bool:
        """Each block has its own modulation Linear (Flux.1 only)."""
        return self.family == FLUX1

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]


FLUX_DEV = FluxShape()
FLUX_SCHNELL = FluxShape(guidance=False)
CHROMA_HD = FluxShape(family=CHROMA, vec_dim=0, guidance=False)
FLUX2_DEV = FluxShape(
    family=FLUX2,
    hidden=6144,
    depth=8,
    depth_single=48,
    heads=48,
    mlp_ratio=3,
    in_channels=128,
    out_channels=128,
    context_dim=15360,
    vec_dim=0,
)
FLUX2_KLEIN_4B = FluxShape(
    family=FLUX2,
    hidden=3072,
    depth=5,
    depth_single=20,
    heads=24,
    mlp_ratio=3,
    in_channels=128,
    out_channels=128,
    context_dim=7680,
    vec_dim=0,
    guidance=False,
)
FLUX2_KLEIN_9B = FluxShape(
    family=FLUX2,
    hidden=4096,
    depth=8,
    depth_single=24,
    heads=32,
    mlp_ratio=3,
    in_channels=128,
    out_channels=128,
    context_dim=12288,
    vec_dim=0,
    guidance=False,
)

#: Named models. Kontext and Krea [dev] have Flux.1 dev's weights (a checkpoint cannot tell them apart).
VARIANTS: dict[str, FluxShape] = {
    "flux1-dev": FLUX_DEV,
    "flux1-schnell": FLUX_SCHNELL,
    "flux1-kontext": FLUX_DEV,
    "flux1-krea": FLUX_DEV,
    "chroma": CHROMA_HD,
    "flux2-dev": FLUX2_DEV,
    "flux2-klein-4b": FLUX2_KLEIN_4B,
    "flux2-klein-9b": FLUX2_KLEIN_9B,
}


def variant_names(shape: FluxShape) -> list[str]:
    """The named models with exactly this architecture (empty for custom sizes)."""
    return [name for name, known in VARIANTS.items() if known == shape]


def describe(shape: FluxShape) -> str:
    """One line a user recognises: family, named variants, blocks and width."""
    names = variant_names(shape)
    label = f"{shape.family_name} ({' / '.join(names)})" if names else shape.family_name
    return f"{label}: {shape.depth} double + {shape.depth_single} single blocks, width {shape.hidden}"


def _linear(name: str, out_features: int, in_features: int, bias: bool) -> dict[str, tuple[int, ...]]:
    weight = {f"{name}.weight": (out_features, in_features)}
    return {**weight, f"{name}.bias": (out_features,)} if bias else weight


def _embedder(name: str, in_features: int, hidden: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {
        **_linear(f"{name}.in_layer", hidden, in_features, bias),
        **_linear(f"{name}.out_layer", hidden, hidden, bias),
    }


def _input_weights(s: FluxShape) -> dict[str, tuple[int, ...]]:
    h, b = s.hidden, s.biases
    out = _linear("img_in", h, s.in_channels, b)
    if s.family == CHROMA:
        a = s.approx_hidden
        out.update(_linear("distilled_guidance_layer.in_proj", a, s.approx_in, True))
        for i in range(s.approx_layers):
            out.update(_embedder(f"distilled_guidance_layer.layers.{i}", a, a, True))
        for i in range(s.approx_layers):
            out[f"distilled_guidance_layer.norms.{i}.scale"] = (a,)
        out.update(_linear("distilled_guidance_layer.out_proj", h, a, True))
    else:
        out.update(_embedder("time_in", s.time_dim, h, b))
    if s.vec_dim:
        out.update(_embedder("vector_in", s.vec_dim, h, b))
    if s.guidance:
        out.update(_embedder("guidance_in", s.time_dim, h, b))
    out.update(_linear("txt_in", h, s.context_dim, b))
    if s.family == FLUX2:
        img, txt, single = FLUX2_SHARED_MODULATIONS
        out.update(_linear(f"{img}.lin", 6 * h, h, False))
        out.update(_linear(f"{txt}.lin", 6 * h, h, False))
        out.update(_linear(f"{single}.lin", 3 * h, h, False))
    return out


def _block_weights(s: FluxShape) -> dict[str, tuple[int, ...]]:
    h, m, hd, b = s.hidden, s.mlp_hidden, s.head_dim, s.biases
    out: dict[str, tuple[int, ...]] = {}
    for i in range(s.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            if s.block_modulation:
                out.update(_linear(f"{p}_mod.lin", 6 * h, h, b))
            out.update(_linear(f"{p}_attn.qkv", 3 * h, h, b))
            out[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            out[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            out.update(_linear(f"{p}_attn.proj", h, h, b))
            out.update(_linear(f"{p}_mlp.0", s.mlp_in, h, b))
            out.update(_linear(f"{p}_mlp.2", h, m, b))
    for i in range(s.depth_single):
        p = f"single_blocks.{i}"
        out.update(_linear(f"{p}.linear1", 3 * h + s.mlp_in, h, b))
        out.update(_linear(f"{p}.linear2", h, h + m, b))
        out[f"{p}.norm.query_norm.scale"] = (hd,)
        out[f"{p}.norm.key_norm.scale"] = (hd,)
        if s.block_modulation:
            out.update(_linear(f"{p}.modulation.lin", 3 * h, h, b))
    return out


def flux_weight_shapes(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL-named checkpoint of this architecture (no prefix) with its shape."""
    out = {**_input_weights(shape), **_block_weights(shape)}
    out.update(_linear("final_layer.linear", shape.out_channels, shape.hidden, shape.biases))
    if shape.family != CHROMA:
        out.update(_linear("final_layer.adaLN_modulation.1", 2 * shape.hidden, shape.hidden, shape.biases))
    return out


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def parameter_count(shape: FluxShape) -> int:
    return sum(_numel(dims) for dims in flux_weight_shapes(shape).values())


def strip_model_prefix(key: str) -> tuple[str, str]:
    """Split a checkpoint key into (prefix, BFL name); the prefix is "" for bare BFL names."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def _norm_key(names: Iterable[str] | Mapping[str, object], base: str) -> str | None:
    """`base`.scale as in BFL files, or `base`.weight as in ComfyUI's loaded model (it renames them)."""
    for suffix in ("scale", "weight"):
        if f"{base}.{suffix}" in names:
            return f"{base}.{suffix}"
    return None


def is_flux_state_dict(keys: Iterable[str]) -> bool:
    """ComfyUI's test (model_detection.py): double block 0's qk-norm, plus img_in or Chroma's approximator."""
    names = {strip_model_prefix(k)[1] for k in keys}
    has_norm = _norm_key(names, "double_blocks.0.img_attn.norm.key_norm") is not None
    chroma = _norm_key(names, "distilled_guidance_layer.norms.0") is not None
    return has_norm and ("img_in.weight" in names or chroma)


def detect_family(keys: Iterable[str]) -> str:
    """FLUX1, CHROMA or FLUX2 from a checkpoint's (or a loaded model's) key names."""
    names = {strip_model_prefix(k)[1] for k in keys}
    if not is_flux_state_dict(names):
        raise ValueError(
            "not a Flux checkpoint (Flux.1, Chroma or Flux.2): no double_blocks.0.img_attn.norm.key_norm.scale "
            "with img_in.weight or distilled_guidance_layer"
        )
    if "nerf_blocks.0.norm.scale" in names or "nerf_blocks.0.norm.weight" in names:
        raise ValueError("Chroma Radiance (pixel-space Chroma) is not supported; give a Chroma, Flux.1 or Flux.2 model")
    if f"{FLUX2_SHARED_MODULATIONS[0]}.lin.weight" in names:
        return FLUX2
    if _norm_key(names, "distilled_guidance_layer.norms.0") is not None:
        return CHROMA
    return FLUX1


def _count_blocks(names: Iterable[str], prefix: str) -> int:
    indices = {int(n[len(prefix) :].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _mlp_hidden(named: Mapping[str, tuple[int, ...]], hidden: int, gated: bool) -> int:
    if "double_blocks.0.img_mlp.0.weight" in named:
        rows = named["double_blocks.0.img_mlp.0.weight"][0]
    else:
        rows = named["single_blocks.0.linear1.weight"][0] - 3 * hidden
    return rows // 2 if gated else rows


def shape_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> FluxShape:
    """The architecture of a checkpoint or loaded model from its tensor shapes (keys with or without prefix)."""
    named = {strip_model_prefix(k)[1]: tuple(v) for k, v in shapes.items()}
    family = detect_family(named)
    head_dim = named[_norm_key(named, "double_blocks.0.img_attn.norm.key_norm")][0]
    hidden = named["txt_in.weight"][0] if "txt_in.weight" in named else named["img_in.weight"][0]
    approx = {}
    if family == CHROMA:
        a_hidden, a_in = named["distilled_guidance_layer.in_proj.weight"]
        layers = _count_blocks(named, "distilled_guidance_layer.layers.")
        approx = {"approx_in": a_in, "approx_hidden": a_hidden, "approx_layers": layers}
    return FluxShape(
        family=family,
        hidden=hidden,
        depth=_count_blocks(named, "double_blocks."),
        depth_single=_count_blocks(named, "single_blocks."),
        heads=hidden // head_dim,
        mlp_ratio=_mlp_hidden(named, hidden, family == FLUX2) // hidden,
        in_channels=named.get("img_in.weight", (hidden, 64))[1],
        out_channels=named.get("final_layer.linear.weight", (64, hidden))[0],
        context_dim=named.get("txt_in.weight", (hidden, 4096))[1],
        vec_dim=named.get("vector_in.in_layer.weight", (hidden, 0))[1],
        time_dim=named.get("time_in.in_layer.weight", (hidden, 256))[1],
        guidance="guidance_in.in_layer.weight" in named,
        **approx,
    )


def is_block_linear(name: str) -> bool:
    """True for the large Linear weights inside double and single blocks."""
    return name.endswith(".weight") and name.startswith(("double_blocks.", "single_blocks.")) and "_norm." not in name


def is_modulation(name: str) -> bool:
    """Per-block modulation Linears (Flux.1) and Flux.2's shared ones."""
    return "_mod.lin." in name or ".modulation.lin." in name or name.startswith(FLUX2_SHARED_MODULATIONS)


#: Rows / columns of a whole-weight LoRA change that only one family's MLP gives: (suffix, ratio) -> family.
_MLP_RATIOS = {
    ("_mlp.0", "rows"): {4: FLUX1, 6: FLUX2},
    ("_mlp.2", "cols"): {4: FLUX1, 3: FLUX2},
    (".linear1", "rows"): {7: FLUX1, 9: FLUX2},
    (".linear2", "cols"): {5: FLUX1, 4: FLUX2},
}


def lora_module_family(module: str, rows: int, cols: int, whole: bool) -> str | None:
    """The family (FLUX1 or FLUX2) a LoRA change to one BFL module was made for, when name or shape tells.

    Names: per-block modulation and vector_in exist only in Flux.1 (and Chroma keeps Flux.1's LoRA
    names), the shared modulation only in Flux.2. Shapes: Flux.1's MLP is 4x wide, Flux.2's 3x with a
    doubled (gated) input, so a whole-weight change to an MLP Linear or linear1/linear2 says which.
    """
    if module.startswith(FLUX2_SHARED_MODULATIONS):
        return FLUX2
    if module.endswith(("_mod.lin", ".modulation.lin")) or module.startswith("vector_in."):
        return FLUX1
    if not whole:
        return None
    for (suffix, long_side), families in _MLP_RATIOS.items():
        if module.endswith(suffix):
            big, small = (rows, cols) if long_side == "rows" else (cols, rows)
            return families.get(big // small) if small and big % small == 0 else None
    return None


def family_of_lookup(shape_of: Callable[[str], object]) -> str | None:
    """The family of a model known only through a weight-shape lookup (None = not recognisable)."""
    if shape_of(f"{FLUX2_SHARED_MODULATIONS[0]}.lin.weight") is not None:
        return FLUX2
    if shape_of("distilled_guidance_layer.in_proj.weight") is not None:
        return CHROMA
    per_block = ("double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.weight")
    if any(shape_of(name) is not None for name in per_block):
        return FLUX1
    return None


def lora_fits_family(lora_family: str, model_family: str) -> bool:
    """Flux.1 LoRAs apply to Flux.1 and Chroma (same block weights); Flux.2 LoRAs only to Flux.2."""
    return model_family == lora_family or (lora_family == FLUX1 and model_family == CHROMA)
