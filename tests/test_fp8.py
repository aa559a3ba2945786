"""fp8: scaled e4m3 quantisation, policies, merge-then-quantise, in-place fp8 merges, reading, FP8Linear, CLI."""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch

from lora_ops import fp8, load_lora
from lora_ops.adapters import Diff, LoRA
from lora_ops.errors import LoRAFormatError, LoRAOpsError
from lora_ops.flux import FLUX_DEV, FluxShape, flux_weight_shapes
from lora_ops.formats import Coverage, LoRAFile
from lora_ops.merge import MergeOptions, merge_loras
from lora_ops.safetensors_io import SafetensorsFile
from lora_ops.synthetic import flux_state_dict, write_flux_checkpoint, write_kohya_lora

TINY = FluxShape(hidden=64, depth=1, depth_single=1, heads=2, context_dim=48, vec_dim=24, time_dim=16,
                 in_channels=16, out_channels=16)
#: Big enough that the safetensors header is far below 2 % of the file.
SMALL = FluxShape(hidden=256, depth=1, depth_single=1, heads=2, context_dim=96, vec_dim=48, time_dim=32,
                  in_channels=16, out_channels=16)
E4M3 = torch.float8_e4m3fn
QKV = "double_blocks.0.img_attn.qkv.weight"


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return flux_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> LoRAFile:
    path = write_kohya_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", TINY, rank=4, seed=3,
                            relative_change=0.1)
    return load_lora(path)


@pytest.fixture(scope="module")
def lora2(tmp_path_factory) -> LoRAFile:
    path = write_kohya_lora(tmp_path_factory.mktemp("lora2") / "l2.safetensors", TINY, rank=8, seed=4,
                            relative_change=0.05)
    return load_lora(path)


def fp32_reference(base, stack) -> dict[str, torch.Tensor]:
    ref = {k: v.float().clone() for k, v in base.items()}
    merge_loras(ref, stack)
    return ref


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that NaN == NaN and -0 != 0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def snapshot(target) -> dict[str, torch.Tensor]:
    items = target.state_dict().items() if isinstance(target, torch.nn.Module) else target.items()
    return {k: v.detach().clone() for k, v in items}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


# ----------------------------------------------------------------------------------------- quantisation


def test_round_trip_error_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=gen) * 0.02
    q, s = fp8.quantize(w)
    assert q.dtype == E4M3 and s.shape == () and s.dtype == torch.float32
    scale = float(s)
    assert math.log2(scale).is_integer()  # power of two
    assert w.abs().max() / scale <= 448 and w.abs().max() / scale > 224  # uses the top binade, never clips
    d = fp8.dequantize(q, s)
    normal = (w.abs() / scale) >= 2**-6
    # round to nearest: at most half an ulp, i.e. 2^-4 relative, for every normal value
    assert ((d - w).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-12).all()
    # subnormals: absolute error at most half the subnormal step
    assert ((d - w).abs()[~normal] <= scale * 2**-10 + 1e-12).all()
    assert (d - w).norm() / w.norm() < 0.03


def test_pow2_scale_makes_comfyui_bf16_dequant_exact():
    """ComfyUI computes weight.to(bf16) * scale.to(bf16); with a power-of-two scale that is exact."""
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    q, s = fp8.quantize(w)
    exact = q.float() * s
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal((q.to(dtype) * s.to(dtype)).float(), exact)
    qe, se = fp8.quantize(w, scale_mode="exact")
    assert float(w.abs().max() / se) == pytest.approx(448, rel=1e-6)


def test_fresh_scale_edge_cases():
    assert fp8.fresh_scale(0.0) == 1.0
    assert fp8.fresh_scale(448.0) == 1.0
    assert fp8.fresh_scale(448.5) == 2.0
    assert fp8.fresh_scale(0.1, "exact") == pytest.approx(0.1 / 448)
    with pytest.raises(fp8.FP8FormatError):
        fp8.fresh_scale(float("inf"))


def test_nearest_equals_torch_cast_and_saturates():
    x = torch.tensor([0.0, 1.0, 1.0625, 447.0, 449.0, 1e9, -1e9, 2**-10, 3 * 2**-11])
    q = fp8.round_e4m3(x)
    assert torch.equal(bits(q), bits(x.clamp(-448, 448).to(E4M3)))
    assert q.float()[4] == 448 and q.float()[6] == -448


# ----------------------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_deterministic_and_tile_independent():
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    a, sa = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=7)
    b, _ = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=7, tile_bytes=4096)
    c, _ = fp8.quantize_merged(w, key=QKV, rounding="stochastic", seed=8)
    d, _ = fp8.quantize_merged(w, key="double_blocks.0.txt_attn.qkv.weight", rounding="stochastic", seed=7)
    e, _ = fp8.quantize_merged(w, key="diffusion_model." + QKV, rounding="stochastic", seed=7)
    assert torch.equal(bits(a), bits(b))  # same seed, any tiling
    assert torch.equal(bits(a), bits(e))  # the key's prefix does not matter
    assert not torch.equal(bits(a), bits(c))  # another seed
    assert not torch.equal(bits(a), bits(d))  # another key


def test_stochastic_rounding_unbiased():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    _, s = fp8.quantize(w)
    runs = [fp8.dequantize(*fp8.quantize_merged(w, key="k", rounding="stochastic", seed=i, scale=float(s)))
            for i in range(64)]
    single = (runs[0] - w).norm()
    mean = torch.stack(runs).mean(0)
    assert (mean - w).norm() < single / 5  # ~1/8 expected for 64 independent draws
    # bias over all elements (signed mean error) is tiny relative to the per-element noise
    assert abs(float((runs[0] - w).mean())) < float((runs[0] - w).std()) / 20
    # probability of rounding up matches the fraction: a value 1/4 of the way between two grid points
    x = torch.full((20000,), 1.0 + 0.125 / 4)
    q = fp8.round_e4m3(x, "stochastic", seed=5)
    assert set(q.float().unique().tolist()) == {1.0, 1.125}
    assert abs(float((q.float() == 1.125).float().mean()) - 0.25) < 0.015


def test_uniform_noise_is_uniform():
    u = fp8.uniform_noise(123, 0, 100000)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 9000


# ----------------------------------------------------------------------------------------- policies and sizes


def test_policy_membership():
    names = list(flux_weight_shapes(TINY))
    default = set(fp8.fp8_keys(flux_weight_shapes(TINY), "default"))
    quality = set(fp8.fp8_keys(flux_weight_shapes(TINY), "quality"))
    everything = set(fp8.fp8_keys(flux_weight_shapes(TINY), "all"))
    for name in ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin", "txt_attn.qkv",
                 "txt_mod.lin", "txt_mlp.2"):
        assert f"double_blocks.0.{name}.weight" in default
    for name in ("linear1", "linear2", "modulation.lin"):
        assert f"single_blocks.0.{name}.weight" in default
    for key in names:
        if key.endswith((".bias", ".scale")):
            assert key not in everything
        if key.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")):
            assert key not in default and key not in quality
            assert key.endswith(".bias") or key in everything
    assert quality == {k for k in default if "_mod.lin" not in k and "modulation.lin" not in k}
    assert "double_blocks.0.img_mod.lin.weight" not in quality
    assert fp8.get_policy("default").selects("model.diffusion_model." + QKV)
    with pytest.raises(LoRAOpsError):
        fp8.get_policy("nope")


def test_policy_sizes_arithmetic():
    size = fp8.policy_size(FluxShape(depth=1, depth_single=1), "default")
    assert size.ratio <= 0.6
    shapes = flux_weight_shapes(FLUX_DEV)
    fp8_numel = sum(math.prod(s) for k, s in shapes.items() if fp8.PRESETS["default"].selects(k, s))
    other = sum(math.prod(s) * 2 for k, s in shapes.items() if not fp8.PRESETS["default"].selects(k, s))
    dev = fp8.policy_size(FLUX_DEV, "default")
    assert dev.fp8_bytes == fp8_numel and dev.other_bytes == other
    assert dev.total == fp8_numel + other + 4 * dev.fp8_tensors + 2
    assert dev.bf16_bytes == 2 * 11_901_408_320
    sizes = fp8.preset_sizes(FLUX_DEV)
    assert sizes["all"].total < sizes["default"].total < sizes["quality"].total < dev.bf16_bytes
    assert sizes["default"].fp8_tensors == 19 * 10 + 38 * 3


# ----------------------------------------------------------------------------------------- merge-then-quantise


def test_merge_to_fp8_matches_fp32_reference(base, lora, lora2):
    stack = [(lora, 1.0), (lora2, -0.6)]
    out = fp8.merge_to_fp8(base, stack, "default")
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


# ----------------------------------------------------------------------------------------- reading


def test_load_comfyui_style_plain_and_new_formats():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(4)) * 0.02
    q, s = fp8.quantize(w, scale_mode="exact")
    p = "model.diffusion_model."
    comfy = {p + "scaled_fp8": torch.zeros(0, dtype=E4M3), p + "x.weight": q, p + "x.scale_weight": s,
             p + "x.scale_input": torch.tensor(1.0), p + "x.bias": torch.zeros(32, dtype=torch.bfloat16)}
    ck = fp8.load_fp8_state_dict(comfy)
    assert ck.kind == "scaled_fp8" and ck.fp8_matmul is True
    assert set(ck.tensors) == {p + "x.weight", p + "x.bias"}
    assert torch.equal(ck.weight(p + "x.weight"), q.float() * s)
    assert p + "x.scale_input" in ck.input_scales
    # ComfyUI 0.3.x's own saves: biases are fp8 too, with no scale (= 1)
    comfy_saved = {**comfy, p + "x.bias": torch.full((32,), 0.5).to(E4M3)}
    saved = fp8.load_fp8_state_dict(comfy_saved)
    assert float(saved.scales[p + "x.bias"]) == 1.0 and torch.equal(saved.weight(p + "x.bias"), torch.full((32,), 0.5))
    plain = fp8.load_fp8_state_dict({"x.weight": w.to(E4M3), "x.bias": torch.zeros(32)})
    assert plain.kind == "plain_fp8" and float(plain.scales["x.weight"]) == 1.0
    assert torch.equal(plain.weight("x.weight"), w.to(E4M3).float())
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    new = fp8.load_fp8_state_dict({"x.weight": q, "x.weight_scale": s, "x.comfy_quant": conf})
    assert new.kind == "comfy_quant" and torch.equal(new.weight("x.weight"), q.float() * s)
    assert fp8.load_fp8_state_dict({"x.weight": w}).kind == "none"
    deq = fp8.dequantize_state_dict(comfy, torch.float32)
    assert torch.equal(deq[p + "x.weight"], q.float() * s)


@pytest.mark.parametrize("bad", ["missing", 0.0, -1.0, float("nan"), float("inf")])
def test_missing_or_bad_scale_is_a_clear_error(base, lora, bad):
    out = fp8.merge_to_fp8(base, [], "default")
    skey = QKV[: -len(".weight")] + ".scale_weight"
    if bad == "missing":
        del out[skey]
    else:
        out[skey] = torch.tensor(bad)
    before = snapshot(out)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.load_fp8_state_dict(out)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_to_fp8(out, [(lora, 1.0)], "default")
    module = flux_module(fp8.load_fp8_state_dict(fp8.merge_to_fp8(base, [], "default")).dequantized())
    fp8.cast_module_fp8(module, "default")
    layer = module.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    if bad == "missing":
        del layer.scale_weight
    else:
        layer.scale_weight.fill_(bad)
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_loras_fp8(module, [(lora, 1.0)])
    with pytest.raises(fp8.FP8FormatError, match="scale"):
        fp8.merge_loras_fp8(out, [(lora, 1.0)])
    assert_same_bits(before, snapshot(out))


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


# ----------------------------------------------------------------------------------------- in memory


def flux_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A bare torch module tree with Flux's Linear names (under `diffusion_model.`, as in ComfyUI)."""
    root = torch.nn.Module()

    def node(path: list[str]) -> torch.nn.Module:
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        return m

    for key, t in sd.items():
        parts = key.split(".")
        if key.endswith(".weight") and t.dim() == 2:
            bias = sd.get(key[: -len(".weight")] + ".bias")
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=bias is not None, dtype=t.dtype)
            with torch.no_grad():
                lin.weight.copy_(t)
                if bias is not None:
                    lin.bias.copy_(bias)
            node(parts[:-2]).add_module(parts[-2], lin)
        elif key.endswith(".scale"):
            node(parts[:-1]).register_parameter("scale", torch.nn.Parameter(t.clone(), requires_grad=False))
    outer = torch.nn.Module()
    outer.diffusion_model = root
    return outer


def test_fp8_linear_forward_and_comfy_protocol():
    lin = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    f = fp8.FP8Linear.from_linear(lin, key="x.weight")
    assert f.weight.dtype == E4M3 and f.bias.dtype == torch.bfloat16
    assert set(f.state_dict()) == {"weight", "scale_weight", "bias"}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, 64, dtype=dtype)
        y = f(x)
        assert y.dtype == dtype and y.shape == (5, 7, 48)
        ref = torch.nn.functional.linear(x.float(), f.weight.float() * f.scale_weight, f.bias.float())
        assert torch.allclose(y.float(), ref, rtol=0.02, atol=1e-3)
    exact = f(torch.eye(64)).t() - f.bias.float()[:, None]
    assert torch.allclose(exact, f.weight.float() * f.scale_weight, atol=1e-6)
    # ComfyUI's convert_weight / set_weight: a round trip keeps the bits and the scale
    w = f.convert_weight(f.weight.float())
    q = f.set_weight(w, return_weight=True)
    assert torch.equal(bits(q), bits(f.weight))
    f.set_fp8 = None
    assert fp8.set_fp8_matmul(torch.nn.Sequential(f), True) == 1 and f.fp8_matmul
    y = f(torch.randn(2, 64))  # CPU: the guarded _scaled_mm path is skipped
    assert y.shape == (2, 48)


def test_cast_module_by_policy_matches_merge_to_fp8(base):
    module = flux_module(base)
    report = fp8.cast_module_fp8(module, "quality")
    expected = fp8.merge_to_fp8(base, [], "quality")
    assert sorted(report.converted) == sorted(k for k, v in expected.items() if v.dtype == E4M3 and v.dim() == 2)
    layer = module.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    assert isinstance(layer, fp8.FP8Linear)
    assert torch.equal(bits(layer.weight), bits(expected[QKV]))
    assert torch.equal(layer.scale_weight, expected[QKV.replace(".weight", ".scale_weight")])
    assert isinstance(module.get_submodule("diffusion_model.double_blocks.0.img_mod.lin"), torch.nn.Linear)
    assert not isinstance(module.get_submodule("diffusion_model.img_in"), fp8.FP8Linear)
    assert report.bytes_after < report.bytes_before / 1.9
    # the module's state dict is a ComfyUI scaled-fp8 state dict (plus the marker)
    sd = {k.removeprefix("diffusion_model."): v for k, v in module.state_dict().items()}
    sd["scaled_fp8"] = torch.zeros(2, dtype=E4M3)
    assert fp8.load_fp8_state_dict(sd).kind == "scaled_fp8"


def test_cast_module_validates_before_swapping(base):
    bad = dict(base)
    bad["single_blocks.0.linear2.weight"] = base["single_blocks.0.linear2.weight"].clone()
    bad["single_blocks.0.linear2.weight"][3, 3] = float("nan")
    module = flux_module(bad)
    with pytest.raises(fp8.FP8FormatError, match="NaN"):
        fp8.cast_module_fp8(module)
    assert not any(isinstance(m, fp8.FP8Linear) for m in module.modules())


def test_load_fp8_into_module(base, lora):
    out = fp8.merge_to_fp8(base, [(lora, 1.0)], "default")
    module = flux_module(base)
    report = fp8.load_fp8_into_module(module, out)
    assert len(report.converted) == sum(1 for v in out.values() if v.dtype == E4M3 and v.dim() == 2)
    layer = module.get_submodule("diffusion_model.single_blocks.0.linear1")
    assert torch.equal(bits(layer.weight), bits(out["single_blocks.0.linear1.weight"]))
    assert torch.equal(module.get_submodule("diffusion_model.img_in").weight, out["img_in.weight"])


# ----------------------------------------------------------------------------------------- in-place fp8 merges


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
        key=QKV, weight_scale=original["diffusion_model." + QKV.replace(".weight", ".scale_weight")],
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


# ----------------------------------------------------------------------------------------- files and CLI


def _file_sizes(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()[:8]
    (header,) = struct.unpack("<Q", raw)
    return path.stat().st_size, header


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8files")
    ckpt = write_flux_checkpoint(d / "flux_small.safetensors", SMALL, seed=0)
    lora_path = write_kohya_lora(d / "small_lora.safetensors", SMALL, rank=8, seed=2, relative_change=0.03)
    return d, ckpt, lora_path


@pytest.mark.parametrize("policy", ["default", "quality", "all"])
def test_cli_merge_fp8_file(small_files, policy):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / f"merged_{policy}.safetensors"
    assert main(["merge", str(ckpt), "--lora", f"{lora_path}:0.8", "--out", str(out), "--dtype", "fp8",
                 "--policy", policy]) == 0
    st = SafetensorsFile(out)
    assert st.dtype("scaled_fp8") == E4M3 and st.shape("scaled_fp8") == (2,)
    pol = fp8.get_policy(policy)
    shapes = flux_weight_shapes(SMALL)
    for key, shape in shapes.items():
        if pol.selects(key, shape):
            assert st.dtype(key) == E4M3
            skey = key[: -len(".weight")] + ".scale_weight"
            assert st.dtype(skey) == torch.float32 and st.shape(skey) == ()
        else:
            assert st.dtype(key) == torch.bfloat16
    size = fp8.policy_size(SMALL, policy)
    file_size, header = _file_sizes(out)
    assert file_size - 8 - header == size.total  # tensor bytes: exactly the arithmetic
    assert abs(file_size - size.total) / size.total < 0.02
    # the same as the in-memory merge
    stack = [(load_lora(lora_path), 0.8)]
    expected = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), stack, policy)
    got = dict(st.iter_tensors())
    assert_same_bits(expected, got)


def test_cli_cast_and_errors(small_files, capsys):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / "cast.safetensors"
    assert main(["cast", str(ckpt), "--out", str(out), "--policy", "quality", "--rounding", "stochastic",
                 "--seed", "1", "--fp8-matmul"]) == 0
    ck = fp8.load_fp8_state_dict(out)
    assert ck.kind == "scaled_fp8" and ck.fp8_matmul is True
    assert ck.tensors["double_blocks.0.img_mod.lin.weight"].dtype == torch.bfloat16
    assert "policy quality" in capsys.readouterr().out
    assert main(["cast", str(ckpt), "--out", str(d / "x.safetensors"), "--policy", "nope"]) == 2
    assert "unknown fp8 policy" in capsys.readouterr().err
    assert not (d / "x.safetensors").exists()
    assert main(["cast", str(ckpt), "--out", str(ckpt)]) == 2
    # re-casting an fp8 file, and writing the streaming way from Python
    again = fp8.write_fp8_checkpoint(out, d / "again.safetensors", policy="default")
    assert fp8.load_fp8_state_dict(again).tensors["double_blocks.0.img_mod.lin.weight"].dtype == E4M3


def test_cli_refuses_broken_fp8_input(small_files, tmp_path, capsys):
    from safetensors.torch import save_file

    from lora_ops.cli import main

    _, ckpt, _ = small_files
    sd = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), [], "default")
    sd["single_blocks.0.linear1.scale_weight"] = torch.tensor(0.0)
    save_file(sd, str(tmp_path / "zero.safetensors"))
    assert main(["cast", str(tmp_path / "zero.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "single_blocks.0.linear1.scale_weight" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_no_warnings_on_the_fp8_path(base, lora):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8.merge_to_fp8(base, [(lora, 1.0)], "default", rounding="stochastic")
