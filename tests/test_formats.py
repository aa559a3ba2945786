"""lora_ops against the independent oracle in lora_factory: every key format, merged into a tiny Flux."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import pytest
import torch
from lora_factory import (
    FORMATS,
    MERGE_FORMATS,
    SAME_LAYOUT_GROUPS,
    TINY,
    LoraCase,
    base_state_dict,
    merged_reference,
    write_lora,
)
from safetensors import safe_open
from tensor_checks import snapshot

import lora_ops

RANK = 4
SEED = 2024
BASE_SEED = 7
STRENGTHS = (1.0, 0.7)
#: Fraction of elements that must be bit-exact (the rest may be 1 ulp off: fp32 summation order may differ).
MIN_EXACT = 0.999
#: Modules for the tile-size tests: fused qkv / linear1 (row slices), swapped adaLN rows, a wide modulation.
TILE_TARGETS = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mod.lin",
                "final_layer.adaLN_modulation.1", "single_blocks.1.linear2", "img_in")


# ----------------------------------------------------------------------------------------------- helpers


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype float tensors (int64, elementwise).

    The bit patterns are read as sign-magnitude integers (int16 views for bf16/fp16, int32 for fp32),
    mapped onto a monotonic integer line (so +0 and -0 coincide) and subtracted.
    """
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    bits = torch.iinfo(ints).bits
    magnitude_mask = (1 << (bits - 1)) - 1

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(ints).to(torch.int64)
        mag = i & magnitude_mask
        return torch.where(i < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def _describe(key: str, got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None,
              bad: torch.Tensor | None = None) -> str:
    d = ulp_distance(got, want)
    idx = int((d if bad is None else d * bad).flatten().argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), d.shape))
    msg = (f"{key}: max {int(d.max())} ulp, {100 * (d == 0).float().mean().item():.3f}% exact; worst at {pos}: "
           f"got {got.flatten()[idx].item():.8g} want {want.flatten()[idx].item():.8g}")
    if base is not None:
        msg += f" base {base.flatten()[idx].item():.8g}"
    return msg


def assert_weights(merged: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                   base: Mapping[str, torch.Tensor], approx_keys: Iterable[str], what: str,
                   max_ulp: int = 1, min_exact: float = MIN_EXACT) -> None:
    """`approx_keys` within `max_ulp` (and >= `min_exact` of their elements bit-exact); every other key bit-exact."""
    approx = set(approx_keys)
    assert set(merged) == set(base), f"{what}: keys added {set(merged) - set(base)}, lost {set(base) - set(merged)}"
    problems, total, exact = [], 0, 0
    for key in base:
        got, exp = merged[key], want[key]
        if got.dtype != base[key].dtype or got.shape != base[key].shape:
            problems.append(f"{key}: dtype/shape changed to {got.dtype} {tuple(got.shape)}")
            continue
        if key in approx:
            d = ulp_distance(got, exp)
            total += d.numel()
            exact += int((d == 0).sum())
            # Where base + delta (nearly) cancels, the result is tiny and its ulp is tiny too: there allow
            # the absolute error that fp32 arithmetic on the inputs makes (a few fp32 ulps of |base|).
            slack = 8 * torch.finfo(torch.float32).eps * (base[key].float().abs() + exp.float().abs())
            bad = (d > max_ulp) & ((got.float() - exp.float()).abs() > slack)
            if bool(bad.any()):
                problems.append(_describe(key, got, exp, base[key], bad))
        elif not torch.equal(got, exp):
            problems.append("(should be exact) " + _describe(key, got, exp, base[key]))
    if total and exact / total < min_exact:
        problems.append(f"only {100 * exact / total:.3f}% of the changed weights are bit-exact (< {100 * min_exact}%)")
    assert not problems, f"{what}:\n  " + "\n  ".join(problems[:25])


def load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_ops.LoRAFormatWarning)
        return lora_ops.load_lora(path, **kw)


def merge(base: Mapping[str, torch.Tensor], parts: list[tuple[LoraCase, float]], legacy: bool = False,
          **kw) -> dict[str, torch.Tensor]:
    sd = snapshot(base)
    lora_ops.merge_loras(sd, [(load(c.path, legacy_split_qkv=legacy), s) for c, s in parts], **kw)
    return sd


def check_against_oracle(base, parts: list[tuple[LoraCase, float]], merged, what: str, legacy: bool = False,
                         **kw) -> None:
    want = merged_reference(base, parts, legacy=legacy)
    changed = set()
    for case, strength in parts:
        changed |= set(case.expected)
        if strength != 1.0:  # what a replacement means at other strengths is not specified: don't look
            for k in case.replaced:
                want[k] = merged[k]
    assert_weights(merged, want, base, changed, what, **kw)


def file_keys(path) -> list[str]:
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def covered_by(key: str, names: Iterable[str]) -> bool:
    """Whether `key` or a dotted prefix of it (its module) is one of `names`."""
    names = set(names)
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(len(parts), 0, -1))


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base():
    return base_state_dict(TINY, BASE_SEED)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, base) -> dict[str, LoraCase]:
    d = tmp_path_factory.mktemp("loras")
    return {fmt: write_lora(fmt, d / f"{fmt}.safetensors", TINY, RANK, SEED, base=base) for fmt in FORMATS}


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("fmt", MERGE_FORMATS)
def test_merge_matches_oracle(base, cases, fmt, strength):
    case = cases[fmt]
    merged = merge(base, [(case, strength)])
    check_against_oracle(base, [(case, strength)], merged, f"{fmt} @ {strength}")
    if strength == 1.0:
        for k, v in case.replaced.items():
            assert torch.equal(merged[k], v.to(base[k].dtype)), f"{fmt}: {k} not replaced by the file's value"


@pytest.mark.parametrize("fmt", ["kohya", "dora", "bfl_control"])
def test_strength_zero_changes_nothing(base, cases, fmt):
    merged = merge(base, [(cases[fmt], 0.0)])
    changed = [k for k in base if k not in cases[fmt].replaced and not torch.equal(merged[k], base[k])]
    assert not changed, f"{fmt} @ 0 changed {changed[:5]}"


@pytest.mark.parametrize("group", SAME_LAYOUT_GROUPS, ids=lambda g: g[0])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_same_lora_same_weights(base, cases, group, strength):
    ref = merge(base, [(cases[group[0]], strength)])
    for fmt in group[1:]:
        other = merge(base, [(cases[fmt], strength)])
        bad = [k for k in base if not torch.equal(ref[k], other[k])]
        assert not bad, f"{fmt} vs {group[0]} @ {strength}: " + "; ".join(
            _describe(k, other[k], ref[k], base[k]) for k in bad[:5])


@pytest.mark.parametrize("strength", STRENGTHS)
def test_same_lora_across_layouts(base, cases, strength):
    """kohya (fused qkv/linear1) and diffusers (separate q/k/v/mlp): the same LoRA, within 1 ulp."""
    kohya = merge(base, [(cases["kohya"], strength)])
    for fmt in ("diffusers", "onetrainer"):
        other = merge(base, [(cases[fmt], strength)])
        assert_weights(other, kohya, base, cases["kohya"].expected, f"{fmt} vs kohya @ {strength}")
    # no alpha (scale 1) at half strength == alpha/r = 0.5 at full strength
    half = merge(base, [(cases["kohya_noalpha"], 0.5 * strength)])
    bad = [k for k in base if not torch.equal(half[k], kohya[k])]
    assert not bad, "kohya_noalpha @ s/2 vs kohya @ s: " + "; ".join(_describe(k, half[k], kohya[k], None)
                                                                     for k in bad[:5])


def test_split_qkv(base, cases):
    case = cases["kohya_split_qkv"]
    with pytest.warns(lora_ops.LoRAFormatWarning, match="#2204"):
        lora = lora_ops.load_lora(case.path)
    sd = snapshot(base)
    lora_ops.merge_loras(sd, [(lora, 1.0)])
    check_against_oracle(base, [(case, 1.0)], sd, "kohya_split_qkv (default: per-split alpha/r)")
    for strength in STRENGTHS:
        legacy = merge(base, [(case, strength)], legacy=True)
        check_against_oracle(base, [(case, strength)], legacy, f"kohya_split_qkv legacy @ {strength}", legacy=True)


def test_sdxl_refused(cases):
    case = cases["sdxl"]
    with pytest.raises(lora_ops.LoRAFormatError) as err:
        lora_ops.load_lora(case.path)
    assert isinstance(err.value, lora_ops.LoRAOpsError) and isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "SDXL" in msg, msg
    assert case.path.name in msg, msg


def test_wide_img_in_refused_at_merge(base, cases):
    case = cases["bfl_control_wide_img_in"]
    lora = load(case.path)
    sd = snapshot(base)
    with pytest.raises(lora_ops.LoRAOpsError, match="img_in"):
        lora_ops.merge_loras(sd, [(lora, 1.0)])
    assert set(sd) == set(base)
    changed = [k for k in base if not torch.equal(sd[k], base[k])]
    assert not changed, f"a refused merge changed {changed[:5]}"
    # and alongside a good LoRA: still nothing changes
    with pytest.raises(lora_ops.LoRAOpsError, match="img_in"):
        lora_ops.merge_loras(sd, [(load(cases["kohya"].path), 1.0), (lora, 1.0)])
    changed = [k for k in base if not torch.equal(sd[k], base[k])]
    assert not changed, f"a refused merge changed {changed[:5]}"


@pytest.mark.parametrize("fmt", [*MERGE_FORMATS, "bfl_control_wide_img_in"])
def test_coverage(cases, fmt):
    case = cases[fmt]
    lora = load(case.path)
    assert isinstance(lora.format, str) and lora.format
    cov = lora.coverage
    mapped, unmapped, te = set(cov.mapped), set(cov.unmapped), set(cov.text_encoder_keys)
    keys = file_keys(case.path)
    missing = [k for k in keys if not covered_by(k, mapped | unmapped | te)]
    assert not missing, f"{fmt}: keys in no coverage bucket: {missing[:5]}"
    te_in_file = [k for k in keys if covered_by(k, te)]
    assert len(te_in_file) == case.te_keys, f"{fmt}: {len(te_in_file)} keys reported as text encoder, " \
                                            f"file has {case.te_keys}: {te_in_file[:5]}"
    assert not [k for k in te_in_file if covered_by(k, mapped)], f"{fmt}: text-encoder keys reported as mapped"
    wrongly_unmapped = {k: v for k, v in cov.unmapped.items() if not covered_by(k, te)}
    assert not wrongly_unmapped, f"{fmt}: meaningful keys reported unmapped: {dict(list(wrongly_unmapped.items())[:5])}"
    for reason in cov.unmapped.values():
        assert isinstance(reason, str) and reason


@pytest.mark.parametrize("fmt", MERGE_FORMATS)
def test_targets(cases, fmt):
    case = cases[fmt]
    lora = load(case.path)
    names = set(lora.targets)

    def has(key: str) -> bool:
        return key in names or key.rsplit(".", 1)[0] in names

    missing = [k for k in [*case.expected, *case.replaced] if not has(k)]
    assert not missing, f"{fmt}: targets lack {missing[:5]} (have {sorted(names)[:5]}...)"
    wanted = set(case.expected) | set(case.replaced)
    modules = {k.rsplit(".", 1)[0] for k in wanted}
    extra = [t for t in names if t not in wanted and t not in modules]
    assert not extra, f"{fmt}: unexpected targets {extra[:5]}"
    for t, adapters in lora.targets.items():
        assert adapters, f"{fmt}: target {t} has an empty adapter list"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "loha", "bfl_control"])
def test_other_base_dtypes(tmp_path, fmt, dtype):
    base = base_state_dict(TINY, BASE_SEED, dtype)
    case = write_lora(fmt, tmp_path / f"{fmt}.safetensors", TINY, RANK, SEED, base=base)
    for strength in STRENGTHS:
        merged = merge(base, [(case, strength)])
        if dtype == torch.float16:
            check_against_oracle(base, [(case, strength)], merged, f"{fmt} into fp16 @ {strength}")
            continue
        # fp32: base + delta is rounded once in fp32; allow the library's fp32 delta its own summation order.
        want = merged_reference(base, [(case, strength)])
        problems = []
        for k in base:
            if k in case.expected:
                delta = case.expected_at(strength)[k]
                tol = 1e-6 * delta.abs().max() + 4 * torch.finfo(torch.float32).eps * want[k].abs()
                err = (merged[k].double() - want[k].double()).abs()
                if (err > tol).any() or merged[k].dtype != torch.float32:
                    problems.append(f"{k}: max error {err.max().item():.3g} ({merged[k].dtype})")
            elif k in case.replaced:
                if strength == 1.0 and not torch.equal(merged[k], case.replaced[k].float()):
                    problems.append(f"{k}: not replaced")
            elif not torch.equal(merged[k], base[k]):
                problems.append(f"{k}: changed but not targeted")
        assert not problems, f"{fmt} into fp32 @ {strength}:\n  " + "\n  ".join(problems[:20])


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "xlabs", "loha", "lokr_t2", "full_diff", "bfl_control", "dora",
                                 "dora_out"])
def test_tile_sizes(base, tmp_path, fmt):
    # 1 KiB tiles are a row or two each: keep to the modules where row slices and tile edges interact.
    case = write_lora(fmt, tmp_path / f"{fmt}.safetensors", TINY, RANK, SEED, base=base, targets=TILE_TARGETS)
    results = {tb: merge(base, [(case, 0.7)], tile_bytes=tb) for tb in (1024, 64 * 1024, None)}
    for tb, merged in results.items():
        check_against_oracle(base, [(case, 0.7)], merged, f"{fmt} tile_bytes={tb}")
    ref = results[None]
    for tb, merged in results.items():
        bad = [k for k in base if not torch.equal(merged[k], ref[k])]
        assert not bad, f"{fmt}: tile_bytes={tb} differs from the default tiling: " + "; ".join(
            _describe(k, merged[k], ref[k], base[k]) for k in bad[:5])


def test_stack_rounds_once(base, cases):
    parts = [(cases["kohya"], 0.5), (cases["loha"], 0.3), (cases["full_diff"], -0.4), (cases["diffusers_alpha"], 0.25),
             (cases["lokr"], 0.8)]
    merged = merge(base, parts)
    check_against_oracle(base, parts, merged, "stack of five")
    merged_small_tiles = merge(base, parts, tile_bytes=16 * 1024)
    bad = [k for k in base if not torch.equal(merged[k], merged_small_tiles[k])]
    assert not bad, f"stack: tile_bytes=16 KiB differs in {bad[:5]}"


def test_text_encoder_only_keys_change_nothing(base, cases, tmp_path):
    """A kohya file restricted to one module: TE keys ride along and must not touch the model."""
    case = write_lora("kohya", tmp_path / "one.safetensors", TINY, RANK, SEED, targets=["img_in"])
    assert case.te_keys > 0
    merged = merge(base, [(case, 1.0)])
    check_against_oracle(base, [(case, 1.0)], merged, "kohya img_in + TE keys")
