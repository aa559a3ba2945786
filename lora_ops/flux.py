"""Flux-dev architecture facts: weight names, shapes, and recognising a Flux state dict.

Everything here is derived from a `FluxShape` (or read from a checkpoint's header), so that the
same code serves the real 3072-wide model, tiny test models and the memory planner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Prefixes under which Flux weights appear in checkpoints and in ComfyUI's model state dict.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class FluxShape:
    """Sizes that determine every Flux weight shape (Flux-dev: the defaults, with 19 + 38 blocks)."""

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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * self.mlp_ratio


FLUX_DEV = FluxShape()
FLUX_SCHNELL = FluxShape(guidance=False)


def _linear(name: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def _embedder(name: str, in_features: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {**_linear(f"{name}.in_layer", hidden, in_features), **_linear(f"{name}.out_layer", hidden, hidden)}


def flux_weight_shapes(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL-named Flux checkpoint (no prefix) with its shape, in file order."""
    h, m, hd = shape.hidden, shape.mlp_hidden, shape.head_dim
    out: dict[str, tuple[int, ...]] = {}
    out.update(_linear("img_in", h, shape.in_channels))
    out.update(_embedder("time_in", shape.time_dim, h))
    out.update(_embedder("vector_in", shape.vec_dim, h))
    if shape.guidance:
        out.update(_embedder("guidance_in", shape.time_dim, h))
    out.update(_linear("txt_in", h, shape.context_dim))
    for i in range(shape.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            out.update(_linear(f"{p}_mod.lin", 6 * h, h))
            out.update(_linear(f"{p}_attn.qkv", 3 * h, h))
            out[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            out[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            out.update(_linear(f"{p}_attn.proj", h, h))
            out.update(_linear(f"{p}_mlp.0", m, h))
            out.update(_linear(f"{p}_mlp.2", h, m))
    for i in range(shape.depth_single):
        p = f"single_blocks.{i}"
        out.update(_linear(f"{p}.linear1", 3 * h + m, h))
        out.update(_linear(f"{p}.linear2", h, h + m))
        out[f"{p}.norm.query_norm.scale"] = (hd,)
        out[f"{p}.norm.key_norm.scale"] = (hd,)
        out.update(_linear(f"{p}.modulation.lin", 3 * h, h))
    out.update(_linear("final_layer.linear", shape.out_channels, h))
    out.update(_linear("final_layer.adaLN_modulation.1", 2 * h, h))
    return out


def parameter_count(shape: FluxShape) -> int:
    total = 0
    for dims in flux_weight_shapes(shape).values():
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


def strip_model_prefix(key: str) -> tuple[str, str]:
    """Split a checkpoint key into (prefix, BFL name); the prefix is "" for bare BFL names."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def is_flux_state_dict(keys: Iterable[str]) -> bool:
    """The test ComfyUI uses (model_detection.py): a qk-norm scale in double block 0 plus img_in."""
    names = {strip_model_prefix(k)[1] for k in keys}
    return "double_blocks.0.img_attn.norm.key_norm.scale" in names and "img_in.weight" in names


def _count_blocks(names: Iterable[str], prefix: str) -> int:
    indices = {int(n[len(prefix) :].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def shape_from_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> FluxShape:
    """Recover the FluxShape of a checkpoint from its tensor shapes (keys with or without prefix)."""
    named = {strip_model_prefix(k)[1]: tuple(v) for k, v in shapes.items()}
    if not is_flux_state_dict(named):
        raise ValueError(
            "not a Flux checkpoint: it has no double_blocks.0.img_attn.norm.key_norm.scale / img_in.weight"
        )
    hidden, in_channels = named["img_in.weight"]
    head_dim = named["double_blocks.0.img_attn.norm.key_norm.scale"][0]
    depth = _count_blocks(named, "double_blocks.")
    depth_single = _count_blocks(named, "single_blocks.")
    if depth:
        mlp_hidden = named["double_blocks.0.img_mlp.0.weight"][0]
    else:
        mlp_hidden = named["single_blocks.0.linear1.weight"][0] - 3 * hidden
    final = named.get("final_layer.linear.weight", (64, hidden))
    return FluxShape(
        hidden=hidden,
        depth=depth,
        depth_single=depth_single,
        heads=hidden // head_dim,
        mlp_ratio=mlp_hidden // hidden,
        in_channels=in_channels,
        out_channels=final[0],
        context_dim=named.get("txt_in.weight", (hidden, 4096))[1],
        vec_dim=named.get("vector_in.in_layer.weight", (hidden, 768))[1],
        time_dim=named.get("time_in.in_layer.weight", (hidden, 256))[1],
        guidance="guidance_in.in_layer.weight" in named,
    )


def is_block_linear(name: str) -> bool:
    """True for the large Linear weights inside double and single blocks."""
    return (
        name.endswith(".weight")
        and (name.startswith("double_blocks.") or name.startswith("single_blocks."))
        and (not name.endswith("_norm.scale"))
    )


def is_modulation(name: str) -> bool:
    return "_mod.lin." in name or ".modulation.lin." in name
