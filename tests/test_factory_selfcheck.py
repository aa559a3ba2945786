"""The test oracle checked against first principles: tensors read back from the files with safetensors."""

from __future__ import annotations

import pytest
import torch
from lora_factory import (
    FORMATS,
    MERGE_FORMATS,
    SAME_LAYOUT_GROUPS,
    TINY,
    base_state_dict,
    default_targets,
    flux_weight_shapes,
    kohya_name,
    lora_factors,
    merged_reference,
    module_shapes,
    write_lora,
)
from safetensors import safe_open
from safetensors.torch import load_file

RANK = 4
SEED = 1234
H, M = TINY.hidden, TINY.mlp_hidden


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@pytest.fixture(scope="module")
def base():
    return base_state_dict(TINY, 7)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("selfcheck")
    return {fmt: write_lora(fmt, d / f"{fmt}.safetensors", TINY, RANK, SEED, base=base) for fmt in FORMATS}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return bool((a - b).abs().max().item() <= rtol * scale)


def test_base_state_dict(base):
    shapes = flux_weight_shapes(TINY)
    assert list(base) == list(shapes)
    for k, v in base.items():
        assert tuple(v.shape) == shapes[k] and v.dtype == torch.bfloat16
    again = base_state_dict(TINY, 7)
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not torch.equal(base["img_in.weight"], base_state_dict(TINY, 8)["img_in.weight"])
    assert abs(base["double_blocks.0.img_attn.norm.query_norm.scale"].float().mean().item() - 1) < 0.1
    assert base["double_blocks.0.img_attn.qkv.weight"].float().std().item() == pytest.approx(0.02, rel=0.2)
    assert base_state_dict(TINY, 7, torch.float32)["img_in.weight"].dtype == torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_expected_shapes_and_dtypes(cases, fmt):
    case = cases[fmt]
    shapes = flux_weight_shapes(TINY)
    for k, v in case.expected.items():
        assert tuple(v.shape) == shapes[k], k
        assert v.dtype == torch.float32
        assert v.abs().max() > 0, k
    for k, v in case.replaced.items():
        assert tuple(v.shape) == shapes[k]
    for k, v in case.expected_at(0.7).items():
        assert torch.allclose(v, 0.7 * case.expected[k], rtol=1e-6, atol=0)
    with safe_open(str(case.path), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            assert fh.get_tensor(key).dtype in (torch.bfloat16, torch.float32), key
    if fmt in MERGE_FORMATS:
        assert case.expected


def test_kohya_first_principles(cases):
    case = cases["kohya"]
    sd = load_file(str(case.path))
    modules = module_shapes(TINY)
    assert set(case.modules) == set(default_targets(TINY))
    for mod in case.modules:
        key = kohya_name(mod)
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        assert down.dtype == up.dtype == torch.bfloat16
        assert down.shape == (RANK, modules[mod][1]) and up.shape == (modules[mod][0], RANK)
        assert alpha.numel() == 1 and alpha.item() != RANK
        want = alpha.item() / down.shape[0] * (f32(up) @ f32(down))
        assert close(case.expected[f"{mod}.weight"], want, 1e-6)
    te = [k for k in sd if k.startswith("lora_te1_")]
    assert len(te) == case.te_keys == 6
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd
    assert "lora_unet_single_blocks_1_linear2.lora_up.weight" in sd
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in sd
    assert "lora_unet_time_in_in_layer.lora_down.weight" in sd
    noalpha = cases["kohya_noalpha"]
    assert not any(k.endswith(".alpha") for k in load_file(str(noalpha.path)))
    for k, v in case.expected.items():
        assert torch.equal(noalpha.expected[k], 2 * v)  # same factors, scale 1 instead of 0.5


def test_diffusers_rows(cases):
    case = cases["diffusers"]
    sd = load_file(str(case.path))
    qkv = case.expected["double_blocks.0.img_attn.qkv.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        a = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"]
        b = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"]
        assert close(qkv[j * H : (j + 1) * H], f32(b) @ f32(a), 1e-6)
    txt = case.expected["double_blocks.0.txt_attn.qkv.weight"]
    for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        a = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"]
        b = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"]
        assert close(txt[j * H : (j + 1) * H], f32(b) @ f32(a), 1e-6)
    lin1 = case.expected["single_blocks.0.linear1.weight"]
    p = "transformer.single_transformer_blocks.0"
    for name, (lo, hi) in (
        ("attn.to_q", (0, H)),
        ("attn.to_k", (H, 2 * H)),
        ("attn.to_v", (2 * H, 3 * H)),
        ("proj_mlp", (3 * H, 3 * H + M)),
    ):
        a, b = sd[f"{p}.{name}.lora_A.weight"], sd[f"{p}.{name}.lora_B.weight"]
        assert close(lin1[lo:hi], f32(b) @ f32(a), 1e-6)
    # norm_out.linear: diffusers [scale; shift] -> BFL [shift; scale]
    d = f32(sd["transformer.norm_out.linear.lora_B.weight"]) @ f32(sd["transformer.norm_out.linear.lora_A.weight"])
    assert close(case.expected["final_layer.adaLN_modulation.1.weight"], torch.cat([d[H:], d[:H]]), 1e-6)
    for name in (
        "x_embedder",
        "context_embedder",
        "proj_out",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1",
        "transformer_blocks.0.norm1_context.linear",
        "single_transformer_blocks.1.proj_out",
        "single_transformer_blocks.0.norm.linear",
        "transformer_blocks.0.ff_context.net.0.proj",
    ):
        assert f"transformer.{name}.lora_A.weight" in sd, name
    assert not any(k.startswith("transformer.") for k in load_file(str(cases["diffusers_bare"].path)))
    alpha_sd = load_file(str(cases["diffusers_alpha"].path))
    assert alpha_sd["transformer.proj_out.alpha"].shape == (1,)


def test_onetrainer_names(cases):
    sd = load_file(str(cases["onetrainer"].path))
    for name in (
        "lora_transformer_transformer_blocks_0_attn_to_q",
        "lora_transformer_single_transformer_blocks_0_proj_mlp",
        "lora_transformer_transformer_blocks_0_ff_net_0_proj",
        "lora_transformer_norm_out_linear",
    ):
        assert f"{name}.lora_down.weight" in sd and f"{name}.lora_up.weight" in sd and f"{name}.alpha" in sd
    te = [k for k in sd if k.startswith(("lora_te1_", "lora_te2_"))]
    assert len(te) == cases["onetrainer"].te_keys > 0
    assert any(k.startswith("lora_te2_") for k in te)


@pytest.mark.parametrize("group", SAME_LAYOUT_GROUPS)
def test_factor_sharing(cases, group):
    ref = cases["kohya"]
    ref_sd = load_file(str(ref.path))
    for fmt in group:
        case = cases[fmt]
        assert set(case.expected) == set(ref.expected), fmt
        for k in ref.expected:
            assert torch.equal(case.expected[k], ref.expected[k]), (fmt, k)
    dsd = load_file(str(cases["diffusers_alpha"].path))
    assert torch.equal(
        dsd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"],
        ref_sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
    )
    assert torch.equal(
        dsd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"],
        ref_sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][H : 2 * H],
    )
    ab = load_file(str(cases["bfl_ab"].path))
    assert torch.equal(
        f32(ab["diffusion_model.img_in.lora_B.weight"]), f32(ref_sd["lora_unet_img_in.lora_up.weight"]) / 2
    )


def test_other_formats_share_lora_part(cases):
    ref = cases["kohya"].expected
    for k, v in cases["bfl_control"].expected.items():
        if k.endswith(".weight"):
            assert torch.equal(v, ref[k]), k
    xl = cases["xlabs"]
    for k, v in xl.expected.items():
        if "linear1" in k:
            assert torch.equal(v[: 3 * H], ref[k][: 3 * H]) and not v[3 * H :].any()
        else:
            assert torch.equal(v, ref[k]), k
    split = cases["kohya_split_qkv"].expected
    assert torch.equal(split["double_blocks.0.img_mlp.0.weight"], ref["double_blocks.0.img_mlp.0.weight"])
    assert not torch.equal(split["double_blocks.0.img_attn.qkv.weight"], ref["double_blocks.0.img_attn.qkv.weight"])


def test_split_qkv_first_principles(cases):
    case = cases["kohya_split_qkv"]
    sd = load_file(str(case.path))
    for mod, k in (
        ("double_blocks.0.img_attn.qkv", 3),
        ("double_blocks.0.txt_attn.qkv", 3),
        ("single_blocks.0.linear1", 4),
    ):
        key = kohya_name(mod)
        down, up, alpha = f32(sd[f"{key}.lora_down.weight"]), f32(sd[f"{key}.lora_up.weight"]), sd[f"{key}.alpha"]
        assert down.shape[0] == k * RANK and up.shape[1] == k * RANK
        rows = [(0, H), (H, 2 * H), (2 * H, 3 * H), (3 * H, 3 * H + M)][:k]
        want = torch.zeros_like(up @ down)
        for i, (lo, hi) in enumerate(rows):
            cols = slice(i * RANK, (i + 1) * RANK)
            mask = torch.ones(up.shape[0], dtype=torch.bool)
            mask[lo:hi] = False
            assert not up[mask][:, cols].any()  # block-diagonal
            want[lo:hi] = alpha.item() / RANK * (up[lo:hi, cols] @ down[cols])
        assert close(case.expected[f"{mod}.weight"], want, 1e-6)
        naive = alpha.item() / down.shape[0] * (up @ down)
        assert close(case.legacy_expected[f"{mod}.weight"], naive, 1e-6)
    plain = "double_blocks.0.img_mlp.0.weight"
    assert torch.equal(case.legacy_expected[plain], case.expected[plain])
    assert "split_qkv" in __import__("safetensors").safe_open(str(case.path), "pt").metadata()["ss_network_args"]


def test_xlabs_first_principles(cases):
    case = cases["xlabs"]
    sd = load_file(str(case.path))
    up, down = (
        sd["double_blocks.0.processor.qkv_lora2.up.weight"],
        sd["double_blocks.0.processor.qkv_lora2.down.weight"],
    )
    assert up.shape == (3 * H, RANK) and down.shape == (RANK, H)
    assert close(case.expected["double_blocks.0.txt_attn.qkv.weight"], f32(up) @ f32(down), 1e-6)
    up, down = (
        sd["single_blocks.0.processor.proj_lora.up.weight"],
        sd["single_blocks.0.processor.proj_lora.down.weight"],
    )
    assert up.shape == (H, RANK) and down.shape == (RANK, H + M)
    assert close(case.expected["single_blocks.0.linear2.weight"], f32(up) @ f32(down), 1e-6)
    assert "double_blocks.0.processor.proj_lora1.up.weight" in sd
    assert {k.rsplit(".", 1)[0] for k in case.expected} <= {
        f"{m}" for m in module_shapes(TINY) if m.endswith(("attn.qkv", "attn.proj", "linear1", "linear2"))
    }


def test_control_first_principles(cases, base):
    case = cases["bfl_control"]
    sd = load_file(str(case.path))
    assert not any(k.startswith("img_in") for k in sd)
    a, b = sd["txt_in.lora_A.weight"], sd["txt_in.lora_B.weight"]
    assert close(case.expected["txt_in.weight"], f32(b) @ f32(a), 1e-6)
    assert torch.equal(case.expected["txt_in.bias"], f32(sd["txt_in.lora_B.bias"]))
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in case.replaced
    for k, v in case.replaced.items():
        assert torch.equal(sd[k], v) and not torch.equal(v, base[k])
    wide = load_file(str(cases["bfl_control_wide_img_in"].path))
    assert wide["img_in.lora_A.weight"].shape == (RANK, 2 * TINY.in_channels)
    assert wide["img_in.lora_B.weight"].shape == (H, RANK)
    assert cases["bfl_control_wide_img_in"].expected == {}


def test_lokr_first_principles(cases):
    mod = "single_blocks.0.linear1"
    key = kohya_name(mod)
    out_f, in_f = module_shapes(TINY)[mod]
    full = load_file(str(cases["lokr"].path))
    w1, w2 = f32(full[f"{key}.lokr_w1"]), f32(full[f"{key}.lokr_w2"])
    assert w1.shape[0] * w2.shape[0] == out_f and w1.shape[1] * w2.shape[1] == in_f
    assert close(cases["lokr"].expected[f"{mod}.weight"], torch.kron(w1, w2), 1e-6)  # alpha ignored
    low = load_file(str(cases["lokr_lowrank"].path))
    w2 = f32(low[f"{key}.lokr_w2_a"]) @ f32(low[f"{key}.lokr_w2_b"])
    want = torch.kron(f32(low[f"{key}.lokr_w1"]), w2) * low[f"{key}.alpha"].item() / RANK
    assert close(cases["lokr_lowrank"].expected[f"{mod}.weight"], want, 1e-5)
    t = load_file(str(cases["lokr_t2"].path))
    t2, wa, wb = f32(t[f"{key}.lokr_t2"]), f32(t[f"{key}.lokr_w2_a"]), f32(t[f"{key}.lokr_w2_b"])
    assert t2.shape == (RANK, RANK, 1, 1) and wa.shape[0] == RANK and wb.shape[0] == RANK
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, wb, wa)[:, :, 0, 0].contiguous()  # ComfyUI's
    want = torch.kron(f32(t[f"{key}.lokr_w1"]), w2) * t[f"{key}.alpha"].item() / RANK
    assert close(cases["lokr_t2"].expected[f"{mod}.weight"], want, 1e-5)


def test_loha_and_full_diff_first_principles(cases):
    mod = "double_blocks.0.img_mlp.2"
    key = kohya_name(mod)
    sd = load_file(str(cases["loha"].path))
    want = (
        (f32(sd[f"{key}.hada_w1_a"]) @ f32(sd[f"{key}.hada_w1_b"]))
        * (f32(sd[f"{key}.hada_w2_a"]) @ f32(sd[f"{key}.hada_w2_b"]))
        * sd[f"{key}.alpha"].item()
        / RANK
    )
    assert close(cases["loha"].expected[f"{mod}.weight"], want, 1e-5)
    sd = load_file(str(cases["full_diff"].path))
    assert torch.equal(cases["full_diff"].expected[f"{mod}.weight"], f32(sd[f"{key}.diff"]))
    assert torch.equal(cases["full_diff"].expected[f"{mod}.bias"], f32(sd[f"{key}.diff_b"]))


@pytest.mark.parametrize("fmt", ["dora", "dora_out"])
def test_dora_first_principles(cases, base, fmt):
    case = cases[fmt]
    sd = load_file(str(case.path))
    ref = cases["kohya"]
    for mod in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear1", "final_layer.linear"):
        key = kohya_name(mod)
        out_f, in_f = module_shapes(TINY)[mod]
        scale = sd[f"{key}.dora_scale"]
        assert scale.shape == ((1, in_f) if fmt == "dora" else (out_f, 1))
        w0 = f32(base[f"{mod}.weight"])
        merged = w0 + case.expected[f"{mod}.weight"]
        norms = merged.norm(dim=0 if fmt == "dora" else 1, keepdim=True)
        assert close(norms, f32(scale), 1e-5)  # DoRA: the merged weight has the stored magnitude
        lora = alpha_lora = ref.expected[f"{mod}.weight"]
        c = w0 + alpha_lora
        n = c.norm(dim=0 if fmt == "dora" else 1, keepdim=True) + torch.finfo(torch.float32).eps
        assert close(case.expected[f"{mod}.weight"], c * (f32(scale) / n) - w0, 1e-5)
        assert not close(case.expected[f"{mod}.weight"], lora, 1e-2)  # differs from the plain LoRA delta
    with pytest.raises(ValueError):
        write_lora(fmt, case.path.with_name("x.safetensors"), TINY, RANK, SEED)


def test_sdxl_has_nothing_flux(cases):
    sd = load_file(str(cases["sdxl"].path))
    assert any("input_blocks" in k for k in sd)
    assert not any(k.startswith(("lora_unet_double", "lora_unet_single", "lora_unet_img", "transformer.")) for k in sd)
    assert cases["sdxl"].te_keys == sum(k.startswith("lora_te") for k in sd)


def test_targets_and_determinism(tmp_path):
    c1 = write_lora(
        "kohya", tmp_path / "a.safetensors", TINY, RANK, SEED, targets=["img_in", "single_blocks.1.linear1"]
    )
    assert sorted(c1.expected) == ["img_in.weight", "single_blocks.1.linear1.weight"]
    c2 = write_lora(
        "diffusers", tmp_path / "b.safetensors", TINY, RANK, SEED, targets=["img_in.weight", "single_blocks.1.linear1"]
    )
    for k in c1.expected:
        assert torch.equal(c1.expected[k], c2.expected[k])
    down, _up = lora_factors(SEED, "img_in", H, TINY.in_channels, RANK)
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["lora_unet_img_in.lora_down.weight"], down)
    c3 = write_lora("kohya", tmp_path / "c.safetensors", TINY, RANK, SEED + 1, targets=["img_in"])
    assert not torch.equal(c3.expected["img_in.weight"], c1.expected["img_in.weight"])
    again = write_lora(
        "kohya", tmp_path / "d.safetensors", TINY, RANK, SEED, targets=["img_in", "single_blocks.1.linear1"]
    )
    first, second = load_file(str(tmp_path / "a.safetensors")), load_file(str(again.path))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError):
        write_lora("kohya", tmp_path / "e.safetensors", TINY, RANK, SEED, targets=["nope"])


def test_merged_reference(cases, base):
    ref = merged_reference(base, [(cases["kohya"], 1.0), (cases["bfl_control"], 1.0)])
    k = "double_blocks.0.img_attn.qkv.weight"
    total = cases["kohya"].expected[k] + cases["bfl_control"].expected[k]
    assert torch.equal(ref[k], (base[k].float() + total).to(torch.bfloat16))
    assert not torch.equal(ref[k], base[k])
    q = "double_blocks.0.img_attn.norm.query_norm.scale"
    assert torch.equal(ref[q], cases["bfl_control"].replaced[q])
    assert ref["double_blocks.1.img_attn.proj.weight"] is base["double_blocks.1.img_attn.proj.weight"]
    # the deltas are big enough to move most bf16 elements
    changed = (ref[k] != base[k]).float().mean().item()
    assert changed > 0.5
