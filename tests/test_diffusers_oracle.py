"""Second, independent oracle: huggingface diffusers + peft run the LoRA unmerged; we merge it into the weights.

A tiny ``FluxTransformer2DModel`` is built from a config with seeded random fp32 weights. For every LoRA
format that diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` reads, the factory writes a file and

* diffusers converts it (its own kohya / xlabs / OneTrainer converters), peft injects it into one copy of
  the model, which runs forward with the LoRA *unmerged* (strength 1.0 and 0.6 via ``set_adapters``);
* ``lora_ops.load_lora`` + ``merge_loras`` merge it into the BFL-named fp32 state dict of the same model,
  which is converted back to diffusers names by the small converter below and loaded into a fresh copy.

Both forwards must agree to fp32 precision, and the LoRA must change the output (so the test can fail).
The peft-fused weights (``fuse_lora``) are compared with our merged weights as well.

The diffusers <-> BFL name converter here is written from the model's structure, not from
``lora_ops``' tables, and is checked against diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers``.

What diffusers (checked with 0.42.1 / peft 0.21.2) cannot read, or reads differently, and how the tests handle it:

* kohya-style files (``lora_unet_*``, ``diffusion_model.*`` with lora_down/up): the converter hard-codes the
  Flux-dev single-block widths ``[3072, 3072, 3072, 12288]`` for ``linear1``, so the tiny files leave
  ``single_blocks.*.linear1`` out (it is covered by the diffusers, xlabs and OneTrainer-style files).
* kohya-style files: the converter emits the non-block modules (img_in, txt_in, time_in, vector_in,
  guidance_in, final_layer) *without* the ``transformer.`` prefix, so ``load_lora_adapter(prefix="transformer")``
  (what ``FluxPipeline.load_lora_weights`` does) silently drops them. Here the prefix is normalised and the
  adapter loaded with ``prefix=None`` so that those modules are compared too.
* kohya-style files: the final_layer (``proj_out``, ``norm_out.linear``) is converted without applying
  ``alpha / rank`` ("TODO: alphas" in diffusers), so with alpha != rank diffusers applies it at rank/alpha
  times the strength. Files with alpha leave final_layer out; ``kohya_noalpha`` keeps it;
  ``test_kohya_final_layer_alpha_is_ignored_by_diffusers`` pins the difference down.
* ``kohya_split_qkv``: diffusers splits the block-diagonal qkv but scales by alpha / (3 * rank), i.e. our
  ``legacy_split_qkv=True`` reading; it also rounds ``alpha / rank`` and the scaled factors to bf16 there.
* OneTrainer (``lora_transformer_*``): the converter maps every non-attention block module (ff, norm1, proj_mlp,
  proj_out, ...) onto the block itself and asserts on ``lora_te2_*`` (T5) keys, so the file targets only
  attention and non-block modules and the T5 keys are dropped before diffusers sees it.
* DoRA: diffusers drops ``dora_scale`` (with a warning) and applies the plain LoRA.
* Not readable for Flux.1 at all: ``bfl_bare`` (loads nothing), ``bfl_ab``, LoKr / LoHa / full diff; and
  ``fal_kontext`` / ``bfl_control``, whose converters require all 19 + 38 Flux-dev blocks at width 3072.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers", reason="diffusers is not installed: the diffusers/peft oracle needs it")
pytest.importorskip("peft", reason="peft is not installed: diffusers needs it to apply LoRAs")

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import FluxLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402
from lora_factory import default_targets, write_lora  # noqa: E402

from lora_ops import FluxShape, LoRAFormatWarning, flux_weight_shapes, load_lora, merge_loras  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # peft matches target names by suffix, so "proj_out" also names the single blocks' proj_out: harmless
    "ignore:While injecting the PEFT adapters:RuntimeWarning",
)

HEADS, HEAD_DIM = 2, 16
CONFIG = dict(
    patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
    attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=48, pooled_projection_dim=24,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
#: The same model for lora_ops; time_dim 256 = diffusers' fixed Timesteps(num_channels=256) for Flux.
SHAPE = FluxShape(hidden=HEADS * HEAD_DIM, depth=2, depth_single=2, heads=HEADS, mlp_ratio=4, in_channels=16,
                  out_channels=16, context_dim=48, vec_dim=24, time_dim=256, guidance=True)
RANK = 4
IMG_TOKENS, TXT_TOKENS = 8, 4

#: diffusers' hard-coded Flux-dev inner width (single-file and kohya converters).
DEV_INNER = 3072

# ----------------------------------------------------------------------------------------------- converter

_EMBEDDERS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE_LINEARS = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_LINEARS = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL final adaLN rows are [shift; scale], diffusers' norm_out rows are [scale; shift] (an involution)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(cfg: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL parameter, diffusers parameter(s) concatenated along rows) for every tensor of the model."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for bfl, dif in _EMBEDDERS.items():
        out += [(f"{bfl}.{p}", (f"{dif}.{p}",)) for p in ("weight", "bias")]
    for i in range(cfg["num_layers"]):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for bfl, dif in _DOUBLE_LINEARS.items():
            out += [(f"{b}.{bfl}.{p}", (f"{d}.{dif}.{p}",)) for p in ("weight", "bias")]
        for bfl, difs in _DOUBLE_FUSED.items():
            out += [(f"{b}.{bfl}.{p}", tuple(f"{d}.{x}.{p}" for x in difs)) for p in ("weight", "bias")]
        out += [(f"{b}.{bfl}", (f"{d}.{dif}",)) for bfl, dif in _DOUBLE_NORMS.items()]
    for i in range(cfg["num_single_layers"]):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for bfl, dif in _SINGLE_LINEARS.items():
            out += [(f"{b}.{bfl}.{p}", (f"{d}.{dif}.{p}",)) for p in ("weight", "bias")]
        for bfl, difs in _SINGLE_FUSED.items():
            out += [(f"{b}.{bfl}.{p}", tuple(f"{d}.{x}.{p}" for x in difs)) for p in ("weight", "bias")]
        out += [(f"{b}.{bfl}", (f"{d}.{dif}",)) for bfl, dif in _SINGLE_NORMS.items()]
    return out


_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def diffusers_to_bfl(sd: dict[str, torch.Tensor], cfg: dict = CONFIG) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for bfl, difs in _pairs(cfg):
        out[bfl] = torch.cat([sd[k] for k in difs], dim=0).clone()
        used.update(difs)
    for p in ("weight", "bias"):
        out[f"{_ADALN[0]}.{p}"] = _swap_halves(sd[f"{_ADALN[1]}.{p}"]).clone()
        used.add(f"{_ADALN[1]}.{p}")
    assert used == set(sd), f"unconverted diffusers tensors: {sorted(set(sd) - used)}"
    return out


def bfl_to_diffusers(sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                     cfg: dict = CONFIG) -> dict[str, torch.Tensor]:
    """Inverse of diffusers_to_bfl; `ref` (a diffusers state dict) gives the row counts of fused parts."""
    out: dict[str, torch.Tensor] = {}
    for bfl, difs in _pairs(cfg):
        parts = torch.split(sd[bfl], [ref[k].shape[0] for k in difs], dim=0)
        out.update({k: v.clone() for k, v in zip(difs, parts, strict=True)})
    for p in ("weight", "bias"):
        out[f"{_ADALN[1]}.{p}"] = _swap_halves(sd[f"{_ADALN[0]}.{p}"]).clone()
    return out


# ----------------------------------------------------------------------------------------------- model


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added_" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def _new_model() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIG).float().eval()


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    """The diffusers state dict of the seeded random model (fp32)."""
    model = _new_model()
    _randomise(model, seed=1234)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return make_inputs()


def make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    rows, cols = 2, IMG_TOKENS // 2
    img_ids = torch.zeros(IMG_TOKENS, 3)
    img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
    return dict(
        hidden_states=torch.randn(1, IMG_TOKENS, CONFIG["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(1, TXT_TOKENS, CONFIG["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(1, CONFIG["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(TXT_TOKENS, 3),
    )


def _model_from(sd: dict[str, torch.Tensor]) -> FluxTransformer2DModel:
    model = _new_model()
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def _forward(model: FluxTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def base_out(base, inputs) -> torch.Tensor:
    return _forward(_model_from(base), inputs)


def _assert_outputs_match(ours: torch.Tensor, theirs: torch.Tensor, base_out: torch.Tensor, what: str,
                          rtol: float = 1e-4) -> None:
    scale = base_out.abs().max().item()
    effect = (theirs - base_out).abs().max().item()
    assert effect > 1e-2 * scale, f"{what}: the LoRA hardly changes the output ({effect:.3g} vs scale {scale:.3g})"
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------- the converter


def test_converter_matches_diffusers_single_file_converter(base):
    """Our BFL names agree with diffusers' own BFL -> diffusers checkpoint converter, and round-trip exactly."""
    bfl = diffusers_to_bfl(base)
    assert {k: tuple(v.shape) for k, v in bfl.items()} == {
        k: tuple(v) for k, v in flux_weight_shapes(SHAPE).items()}
    # diffusers hard-codes 3072 / 12288 row blocks for single linear1: pad each of our q/k/v/mlp blocks to those.
    h, m = SHAPE.hidden, SHAPE.mlp_hidden
    padded = dict(bfl)
    for i in range(SHAPE.depth_single):
        for p in ("weight", "bias"):
            t = bfl[f"single_blocks.{i}.linear1.{p}"]
            big = torch.zeros((3 * DEV_INNER + 4 * DEV_INNER, *t.shape[1:]), dtype=t.dtype)
            for j, (a, n) in enumerate(((0, h), (h, h), (2 * h, h), (3 * h, m))):
                big[j * DEV_INNER: j * DEV_INNER + n] = t[a: a + n]
            padded[f"single_blocks.{i}.linear1.{p}"] = big
    theirs = convert_flux_transformer_checkpoint_to_diffusers(padded)
    for i in range(SHAPE.depth_single):
        for name, n in (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", m)):
            for p in ("weight", "bias"):
                key = f"single_transformer_blocks.{i}.{name}.{p}"
                assert not theirs[key][n:].any(), key
                theirs[key] = theirs[key][:n]
    assert set(theirs) == set(base)
    for k in base:
        assert torch.equal(theirs[k], base[k]), k
    back = bfl_to_diffusers(bfl, base)
    assert set(back) == set(base) and all(torch.equal(back[k], base[k]) for k in base)


# ----------------------------------------------------------------------------------------------- the oracle


def _targets(*, linear1: bool = True, final_layer: bool = True, block_filter=None) -> list[str]:
    out = []
    for t in default_targets(SHAPE):
        if not linear1 and t.startswith("single_blocks.") and t.endswith(".linear1"):
            continue
        if not final_layer and t.startswith("final_layer."):
            continue
        if block_filter is not None and t.startswith(("double_blocks.", "single_blocks.")) and not block_filter(t):
            continue
        out.append(t)
    return out


def _onetrainer_ok(t: str) -> bool:
    # diffusers' OneTrainer ("mixture") converter only names attention modules inside blocks correctly
    # (single linear1 includes proj_mlp, which it maps onto the block itself).
    return t.endswith(("_attn.qkv", "_attn.proj"))


#: fmt -> (targets, how diffusers gets the file, load_lora kwargs)
CASES = {
    "diffusers": (None, "path", {}),
    "diffusers_alpha": (None, "path", {}),
    "diffusers_bare": (None, "path", {}),
    "xlabs": (None, "path", {}),
    "kohya": (_targets(linear1=False, final_layer=False), "path", {}),
    "kohya_noalpha": (_targets(linear1=False), "path", {}),
    "bfl": (_targets(linear1=False, final_layer=False), "path", {}),
    "onetrainer": (_targets(block_filter=_onetrainer_ok), "no_t5", {}),
}


def _diffusers_state_dict(path: Path, how: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    src: str | dict[str, torch.Tensor] = str(path)
    if how == "no_t5":
        src = {k: v for k, v in load_file(str(path)).items() if not k.startswith("lora_te2_")}
    sd, alphas = FluxLoraLoaderMixin.lora_state_dict(src, return_alphas=True)
    return sd, alphas


def _load_into(model: FluxTransformer2DModel, sd: dict[str, torch.Tensor], alphas: dict | None,
               name: str) -> None:
    """Pipeline-free FluxLoraLoaderMixin.load_lora_weights, keeping modules diffusers names without a prefix."""
    sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    assert sd, "diffusers found nothing for the transformer in this file"
    if all(k.startswith("transformer.") for k in sd):
        model.load_lora_adapter(sd, adapter_name=name, prefix="transformer", network_alphas=alphas or None)
    else:
        # kohya-style conversions leave the non-block modules unprefixed, diffusers_bare has no prefix at all
        assert not alphas, "diffusers returned alphas for a state dict without the transformer. prefix"
        model.load_lora_adapter({k.removeprefix("transformer."): v for k, v in sd.items()}, adapter_name=name,
                                prefix=None)
    keys = {k.removeprefix("transformer.") for k in sd}
    # every LoRA module diffusers produced was injected (peft does not silently skip any)
    wanted = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    injected = {n for n, mod in model.named_modules() if hasattr(mod, "lora_A") and name in mod.lora_A}
    assert wanted == injected, (sorted(wanted - injected), sorted(injected - wanted))


def _ours(base: dict[str, torch.Tensor], path: Path, strength: float, **kw) -> dict[str, torch.Tensor]:
    weights = diffusers_to_bfl(base)
    merge_loras(weights, [(load_lora(path, **kw), strength)])
    return weights


def _diffusers_model(base, path, how) -> FluxTransformer2DModel:
    sd, alphas = _diffusers_state_dict(path, how)
    model = _model_from(base)
    _load_into(model, sd, alphas, "oracle")
    return model


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_diffusers_forward_matches_our_merge(fmt, base, inputs, base_out, tmp_path):
    targets, how, kw = CASES[fmt]
    case = write_lora(fmt, tmp_path / f"{fmt}.safetensors", SHAPE, rank=RANK, seed=7, targets=targets)
    model = _diffusers_model(base, case.path, how)
    merged = {}
    for strength in (1.0, 0.6):
        model.set_adapters(["oracle"], weights=[strength])
        theirs = _forward(model, inputs)
        merged[strength] = _ours(base, case.path, strength, **kw)
        ours = _forward(_model_from(bfl_to_diffusers(merged[strength], base)), inputs)
        _assert_outputs_match(ours, theirs, base_out, f"{fmt} at strength {strength}")

    # peft's own merge of the same adapter (fuse_lora at strength 1) against our merged weights, tensor by tensor
    model.set_adapters(["oracle"], weights=[1.0])
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = diffusers_to_bfl({k: v.detach() for k, v in model.state_dict().items()})
    ours = merged[1.0]
    reference = diffusers_to_bfl(base)
    changed = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert changed and sorted(changed) == sorted(k for k in fused if not torch.equal(fused[k], reference[k]))
    for k in ours:
        torch.testing.assert_close(ours[k], fused[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{fmt} {k}: {m}")


def test_kohya_split_qkv_diffusers_reads_it_as_legacy(base, inputs, base_out, tmp_path):
    """diffusers splits kohya's block-diagonal qkv but scales by alpha / (3 * rank): our legacy reading."""
    qkv = [f"double_blocks.{i}.{s}_attn.qkv" for i in range(SHAPE.depth) for s in ("img", "txt")]
    path = write_lora("kohya_split_qkv", tmp_path / "s.safetensors", SHAPE, rank=RANK, seed=3, targets=qkv).path
    theirs = _forward(_diffusers_model(base, path, "path"), inputs)
    legacy = _forward(_model_from(bfl_to_diffusers(_ours(base, path, 1.0, legacy_split_qkv=True), base)), inputs)
    with pytest.warns(LoRAFormatWarning, match="split_qkv"):
        intended = _forward(_model_from(bfl_to_diffusers(_ours(base, path, 1.0), base)), inputs)
    # diffusers rounds alpha / (3 * rank) = 1/6 and the factors scaled by it to bf16 here: compare loosely
    effect = (theirs - base_out).abs().max()
    assert (theirs - legacy).abs().max() < 2e-2 * effect
    assert (theirs - intended).abs().max() > 0.5 * effect  # intended = 3x diffusers' change


def test_dora_diffusers_drops_the_magnitude(base, inputs, base_out, tmp_path):
    """diffusers ignores dora_scale: its output equals our merge of the plain kohya LoRA with the same factors."""
    targets = _targets(linear1=False, final_layer=False)
    base_bfl = diffusers_to_bfl(base)
    dora = write_lora("dora", tmp_path / "d.safetensors", SHAPE, rank=RANK, seed=5, base=base_bfl,
                      targets=targets).path
    plain = write_lora("kohya", tmp_path / "k.safetensors", SHAPE, rank=RANK, seed=5, targets=targets).path
    theirs = _forward(_diffusers_model(base, dora, "path"), inputs)
    _assert_outputs_match(_forward(_model_from(bfl_to_diffusers(_ours(base, plain, 1.0), base)), inputs), theirs,
                          base_out, "dora read by diffusers vs our plain kohya")
    ours_dora = _forward(_model_from(bfl_to_diffusers(_ours(base, dora, 1.0), base)), inputs)
    assert (ours_dora - theirs).abs().max() > 1e-3 * base_out.abs().max()


def test_kohya_final_layer_alpha_is_ignored_by_diffusers(base, inputs, base_out, tmp_path):
    """diffusers converts kohya's final_layer without alpha / rank: it matches our merge at strength rank / alpha."""
    case = write_lora("kohya", tmp_path / "f.safetensors", SHAPE, rank=RANK, seed=9,
                      targets=["final_layer.linear", "final_layer.adaLN_modulation.1"])
    theirs = _forward(_diffusers_model(base, case.path, "path"), inputs)
    at = RANK / case.alpha
    assert at != 1.0
    ours = _forward(_model_from(bfl_to_diffusers(_ours(base, case.path, at), base)), inputs)
    _assert_outputs_match(ours, theirs, base_out, "kohya final_layer")
    ours_1 = _forward(_model_from(bfl_to_diffusers(_ours(base, case.path, 1.0), base)), inputs)
    assert (ours_1 - theirs).abs().max() > 1e-3 * base_out.abs().max()

