"""Independent test oracle: Flux LoRA files in every known key format, with the weight change each must produce.

Nothing here calls `lora_ops` converters; the only import from the library is `lora_ops.flux` for the
BFL weight names and shapes. Every `expected` delta is computed by plain arithmetic from the factors
*as stored in the file* (bf16-rounded), in float64, and rounded once to fp32. For LoRA products of bf16
factors float64 is exact, so `expected` is the correctly rounded fp32 delta and does not depend on how
the product was split into pieces (e.g. diffusers' separate q/k/v).

Factor sharing (so that tests can compare two formats of "the same" LoRA)
--------------------------------------------------------------------------
For a BFL module ``m`` (e.g. ``double_blocks.0.img_attn.qkv``) the canonical factors are
``down [r, in]`` and ``up [out, r]`` (bf16, randn * 0.1 from a generator seeded by ``(seed, "lora", m,
rank, shape)``) and ``alpha = rank / 2`` (so alpha / rank = 0.5, a power of two). Folding the scale
into B (``B = up * 0.5``) is therefore exact in bf16, and all of these formats give bit-identical
``expected`` (and should give bit-identical merges):

* ``kohya``, ``bfl``, ``bfl_bare``, ``dora``/``dora_out`` (their LoRA part): down / up / alpha as is.
* ``bfl_ab``, ``fal_kontext``, ``bfl_control`` (its weight part): A = down, B = up * alpha / r, no alpha.
* ``diffusers_alpha``, ``onetrainer``: A = down, B = up[rows of that diffusers module], alpha.
* ``diffusers``, ``diffusers_bare``: A = down, B = up[rows] * alpha / r, no alpha.
* ``xlabs`` (double-block qkv/proj, single linear2): down, up * alpha / r. Its single ``qkv_lora`` is
  down with ``up[:3H] * alpha / r``, so linear1 rows [3H:] get no change there.
* ``kohya_split_qkv``: every module other than double-block qkv and single linear1 as ``kohya``.
* ``kohya_noalpha``: the same down / up as ``kohya`` but no alpha, so its delta is 2x kohya's.

``lokr*``, ``loha``, ``full_diff``, the split qkv/linear1 factors and the control-LoRA biases / norm
scales have their own generators and share nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flux2_oracle import flux2_default_targets, flux2_diffusers_modules
from safetensors.torch import save_file

from lora_ops.flux import FluxShape, flux_weight_shapes

TINY = FluxShape(hidden=32, depth=2, depth_single=2, heads=2, context_dim=48, vec_dim=24, time_dim=16,
                 in_channels=16, out_channels=16)
#: A tiny Flux.2: shared modulation, gated MLP (ratio 3), no biases, no pooled vector.
TINY_FLUX2 = FluxShape(family="flux2", hidden=64, depth=2, depth_single=3, heads=2, mlp_ratio=3, in_channels=32,
                       out_channels=32, context_dim=48, vec_dim=0, guidance=True)

#: Formats that write a LoRA which should merge into a Flux model.
MERGE_FORMATS = (
    "kohya", "kohya_noalpha", "kohya_split_qkv", "bfl", "bfl_bare", "bfl_ab", "diffusers", "diffusers_alpha",
    "diffusers_bare", "onetrainer", "xlabs", "fal_kontext", "bfl_control", "lokr", "lokr_lowrank", "lokr_t2",
    "loha", "full_diff", "dora", "dora_out", "aitoolkit",
)
#: Formats that must be refused (at load for sdxl, at merge for the wide img_in).
REFUSED_FORMATS = ("sdxl", "bfl_control_wide_img_in")
FORMATS = MERGE_FORMATS + REFUSED_FORMATS

#: Groups of formats whose files are built from the same factors in the same layout (bit-identical merges).
SAME_LAYOUT_GROUPS = (
    ("kohya", "bfl", "bfl_bare", "bfl_ab", "fal_kontext"),
    ("diffusers", "diffusers_alpha", "diffusers_bare", "onetrainer"),
)

FACTOR_STD = 0.1
DTYPE = torch.bfloat16

_ONLY_DOUBLE_QKV_PROJ_SINGLE_LINEAR = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")


# ----------------------------------------------------------------------------------------------- basics


def _gen(seed: int, *parts: object) -> torch.Generator:
    text = "|".join(str(p) for p in (seed, *parts))
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _randn(gen: torch.Generator, *size: int, std: float = FACTOR_STD) -> torch.Tensor:
    return (torch.randn(size, generator=gen, dtype=torch.float32) * std).to(DTYPE)


def base_state_dict(shape: FluxShape, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random Flux model with bare BFL names: weights randn*0.02, biases randn*0.01, norm scales 1+randn*0.1."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, dims in flux_weight_shapes(shape).items():
        noise = torch.randn(dims, generator=gen, dtype=torch.float32)
        if name.endswith(".scale"):
            value = 1.0 + noise * 0.1
        elif name.endswith(".bias"):
            value = noise * 0.01
        else:
            value = noise * 0.02
        out[name] = value.to(dtype)
    return out


def module_shapes(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """Every Linear module of Flux (BFL name without ``.weight``) -> (out, in)."""
    return {
        name[: -len(".weight")]: (dims[0], dims[1])
        for name, dims in flux_weight_shapes(shape).items()
        if name.endswith(".weight") and len(dims) == 2
    }


def default_targets(shape: FluxShape) -> list[str]:
    """Block 0 of each kind fully, the last block partly (so some block weights stay untouched), all globals."""
    if shape.family == "flux2":
        return flux2_default_targets(shape.depth, shape.depth_single, shape.guidance)
    mods: list[str] = []
    double_all = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
    double_some = ("img_attn.qkv", "txt_attn.proj", "txt_mlp.2", "txt_mod.lin")
    single_all = ("linear1", "linear2", "modulation.lin")
    single_some = ("linear2", "modulation.lin")
    for i in range(shape.depth):
        mods += [f"double_blocks.{i}.{m}" for m in (double_all if i == 0 else double_some if i == shape.depth - 1
                                                     else ())]
    for i in range(shape.depth_single):
        mods += [f"single_blocks.{i}.{m}" for m in (single_all if i == 0 else single_some
                                                     if i == shape.depth_single - 1 else ())]
    mods += ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
    if shape.guidance:
        mods += ["guidance_in.in_layer", "guidance_in.out_layer"]
    mods += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    return mods


def lora_factors(seed: int, module: str, out_f: int, in_f: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (down [r, in], up [out, r]) of a BFL module; shared by all formats listed in the module doc."""
    gen = _gen(seed, "lora", module, rank, out_f, in_f)
    down = _randn(gen, rank, in_f)
    up = _randn(gen, out_f, rank)
    return down, up


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def diffusers_modules(module: str, shape: FluxShape) -> list[tuple[str, torch.Tensor]]:
    """Diffusers module(s) of a BFL module, each with the BFL rows its output rows land in (in order)."""
    h, m = shape.hidden, shape.mlp_hidden
    if shape.family == "flux2":
        return flux2_diffusers_modules(module, h, m, shape.out_channels)

    def rows(a: int, b: int) -> torch.Tensor:
        return torch.arange(a, b)

    parts = module.split(".")
    if parts[0] == "double_blocks":
        b = f"transformer_blocks.{parts[1]}"
        rest = ".".join(parts[2:])
        qkv = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
        if rest in qkv:
            return [(f"{b}.attn.{name}", rows(j * h, (j + 1) * h)) for j, name in enumerate(qkv[rest])]
        single = {
            "img_attn.proj": ("attn.to_out.0", h), "txt_attn.proj": ("attn.to_add_out", h),
            "img_mlp.0": ("ff.net.0.proj", m), "img_mlp.2": ("ff.net.2", h),
            "txt_mlp.0": ("ff_context.net.0.proj", m), "txt_mlp.2": ("ff_context.net.2", h),
            "img_mod.lin": ("norm1.linear", 6 * h), "txt_mod.lin": ("norm1_context.linear", 6 * h),
        }
        name, out_f = single[rest]
        return [(f"{b}.{name}", rows(0, out_f))]
    if parts[0] == "single_blocks":
        b = f"single_transformer_blocks.{parts[1]}"
        rest = ".".join(parts[2:])
        if rest == "linear1":
            return [(f"{b}.attn.to_q", rows(0, h)), (f"{b}.attn.to_k", rows(h, 2 * h)),
                    (f"{b}.attn.to_v", rows(2 * h, 3 * h)), (f"{b}.proj_mlp", rows(3 * h, 3 * h + m))]
        if rest == "linear2":
            return [(f"{b}.proj_out", rows(0, h))]
        if rest == "modulation.lin":
            return [(f"{b}.norm.linear", rows(0, 3 * h))]
        raise KeyError(module)
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    if parts[0] in emb:
        layer = {"in_layer": "linear_1", "out_layer": "linear_2"}[parts[1]]
        return [(f"time_text_embed.{emb[parts[0]]}.{layer}", rows(0, h))]
    if module == "img_in":
        return [("x_embedder", rows(0, h))]
    if module == "txt_in":
        return [("context_embedder", rows(0, h))]
    if module == "final_layer.linear":
        return [("proj_out", rows(0, shape.out_channels))]
    if module == "final_layer.adaLN_modulation.1":
        # diffusers rows are [scale; shift], BFL rows are [shift; scale]: diffusers row j is BFL row (j + H) % 2H.
        return [("norm_out.linear", torch.cat([rows(h, 2 * h), rows(0, h)]))]
    raise KeyError(module)


def _small_divisor(n: int) -> int:
    for d in (4, 2):
        if n % d == 0 and n > d:
            return d
    return 1


# ----------------------------------------------------------------------------------------------- the case


@dataclass
class LoraCase:
    path: Path
    fmt: str
    #: BFL key (``<module>.weight`` / ``<module>.bias``) -> fp32 dense delta at strength 1, full target shape.
    expected: dict[str, torch.Tensor]
    #: BFL key -> the value the file replaces it with (control-LoRA norm scales), as stored (bf16).
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    te_keys: int = 0
    #: kohya_split_qkv only: the delta of the naive a/(k*r) reading (``legacy_split_qkv=True``).
    legacy_expected: dict[str, torch.Tensor] | None = None
    rank: int = 0
    alpha: float | None = None
    seed: int = 0
    shape: FluxShape | None = None
    #: BFL modules that received an adapter.
    modules: list[str] = field(default_factory=list)
    #: float64 masters of expected / legacy_expected (expected == exact.float()).
    exact: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    legacy_exact: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def expected_at(self, strength: float) -> dict[str, torch.Tensor]:
        """fp32 delta at `strength`. DoRA included: with W_dora fixed, delta(s) = s * (W_dora - W0)."""
        return {k: (v * strength).float() for k, v in self.exact.items()}

    def legacy_expected_at(self, strength: float) -> dict[str, torch.Tensor]:
        if self.legacy_exact is None:
            raise ValueError(f"{self.fmt} has no legacy reading")
        return {k: (v * strength).float() for k, v in self.legacy_exact.items()}


class _Writer:
    def __init__(self, shape: FluxShape) -> None:
        self.shape = shape
        self.mshapes = module_shapes(shape)
        self.tensors: dict[str, torch.Tensor] = {}
        self.exact: dict[str, torch.Tensor] = {}
        self.legacy: dict[str, torch.Tensor] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self.te_keys = 0
        self.modules: list[str] = []
        self.metadata: dict[str, str] = {}

    def put(self, key: str, value: torch.Tensor, te: bool = False) -> None:
        assert key not in self.tensors, key
        self.tensors[key] = value.detach().clone().contiguous()
        if te:
            self.te_keys += 1

    def add(self, target: str, delta: torch.Tensor, rows: torch.Tensor | None = None, legacy_factor: float = 1.0,
            ) -> None:
        """expected[target][rows] += delta (float64)."""
        dims = flux_weight_shapes(self.shape)[target]
        acc = self.exact.setdefault(target, torch.zeros(dims, dtype=torch.float64))
        leg = self.legacy.setdefault(target, torch.zeros(dims, dtype=torch.float64))
        delta = delta.to(torch.float64)
        if rows is None:
            acc += delta
            leg += delta * legacy_factor
        else:
            acc[rows] += delta
            leg[rows] += delta * legacy_factor

    def note(self, module: str) -> None:
        if module not in self.modules:
            self.modules.append(module)


def _mm(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return up.to(torch.float64) @ down.to(torch.float64)


def _te_kohya(w: _Writer, rank: int, seed: int, alpha: float | None, prefixes: Iterable[str]) -> None:
    d, t5 = w.shape.vec_dim, w.shape.context_dim
    table = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (d, d),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (4 * d, d),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (t5, t5),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (d, d),
    }
    for name in prefixes:
        out_f, in_f = table[name]
        gen = _gen(seed, "te", name, rank)
        w.put(f"{name}.lora_down.weight", _randn(gen, rank, in_f), te=True)
        w.put(f"{name}.lora_up.weight", _randn(gen, out_f, rank), te=True)
        if alpha is not None:
            w.put(f"{name}.alpha", torch.tensor(alpha, dtype=DTYPE), te=True)


# ----------------------------------------------------------------------------------------------- formats


def _write_plain(fmt: str, w: _Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    scale = alpha / rank
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        down, up = lora_factors(seed, mod, out_f, in_f, rank)
        folded = (up.double() * scale).to(DTYPE)
        if fmt in ("kohya", "kohya_noalpha", "bfl", "bfl_bare"):
            key = {"kohya": kohya_name(mod), "kohya_noalpha": kohya_name(mod), "bfl": f"diffusion_model.{mod}",
                   "bfl_bare": mod}[fmt]
            w.put(f"{key}.lora_down.weight", down)
            w.put(f"{key}.lora_up.weight", up)
            if fmt != "kohya_noalpha":
                w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
            w.add(f"{mod}.weight", _mm(up, down) * (1.0 if fmt == "kohya_noalpha" else scale))
        elif fmt in ("bfl_ab", "fal_kontext", "aitoolkit"):
            prefix = {"bfl_ab": "diffusion_model.", "fal_kontext": "base_model.model.", "aitoolkit": "transformer."}
            key = prefix[fmt] + mod
            w.put(f"{key}.lora_A.weight", down)
            w.put(f"{key}.lora_B.weight", folded)
            w.add(f"{mod}.weight", _mm(folded, down))
        elif fmt in ("diffusers", "diffusers_alpha", "diffusers_bare", "onetrainer"):
            for dmod, rows in diffusers_modules(mod, w.shape):
                if fmt == "onetrainer":
                    key = "lora_transformer_" + dmod.replace(".", "_")
                    b = up[rows]
                    w.put(f"{key}.lora_down.weight", down)
                    w.put(f"{key}.lora_up.weight", b)
                    w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
                    w.add(f"{mod}.weight", _mm(b, down) * scale, rows)
                    continue
                key = dmod if fmt == "diffusers_bare" else f"transformer.{dmod}"
                b = up[rows] if fmt == "diffusers_alpha" else folded[rows]
                w.put(f"{key}.lora_A.weight", down)
                w.put(f"{key}.lora_B.weight", b)
                if fmt == "diffusers_alpha":
                    w.put(f"{key}.alpha", torch.tensor([alpha], dtype=torch.float32))
                w.add(f"{mod}.weight", _mm(b, down) * (scale if fmt == "diffusers_alpha" else 1.0), rows)
        else:
            raise AssertionError(fmt)
        w.note(mod)


def _write_split_qkv(w: _Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    h, m = w.shape.hidden, w.shape.mlp_hidden
    w.metadata.update({"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                       "ss_network_alpha": str(alpha), "ss_network_args": json.dumps({"split_qkv": "True"})})
    plain = []
    for mod in modules:
        if mod.endswith("_attn.qkv"):
            splits = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
        elif mod.startswith("single_blocks.") and mod.endswith(".linear1"):
            splits = [(0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, 3 * h + m)]
        else:
            plain.append(mod)
            continue
        out_f, in_f = w.mshapes[mod]
        k = len(splits)
        gen = _gen(seed, "split", mod, rank)
        downs = [_randn(gen, rank, in_f) for _ in splits]
        ups = [_randn(gen, b - a, rank) for a, b in splits]
        down = torch.cat(downs)
        up = torch.zeros(out_f, k * rank, dtype=DTYPE)
        for i, ((a, b), u) in enumerate(zip(splits, ups)):
            up[a:b, i * rank:(i + 1) * rank] = u
        key = kohya_name(mod)
        w.put(f"{key}.lora_down.weight", down)
        w.put(f"{key}.lora_up.weight", up)
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        for (a, b), u, d in zip(splits, ups, downs):
            # intended: a/r per split; legacy (naive) reading: a/(k*r) for the whole block-diagonal product.
            w.add(f"{mod}.weight", _mm(u, d) * (alpha / rank), torch.arange(a, b), legacy_factor=1.0 / k)
        w.note(mod)
    _write_plain("kohya", w, plain, rank, seed, alpha)


def _write_xlabs(w: _Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    h = w.shape.hidden
    scale = alpha / rank
    for mod in modules:
        parts = mod.split(".")
        rest = ".".join(parts[2:])
        out_f, in_f = w.mshapes[mod]
        down, up = lora_factors(seed, mod, out_f, in_f, rank)
        folded = (up.double() * scale).to(DTYPE)
        if parts[0] == "double_blocks" and rest in _ONLY_DOUBLE_QKV_PROJ_SINGLE_LINEAR:
            kind, stream = rest.split("_attn.")[1], rest.split("_attn.")[0]
            key = f"double_blocks.{parts[1]}.processor.{kind}_lora{1 if stream == 'img' else 2}"
            rows = None
        elif parts[0] == "single_blocks" and rest in ("linear1", "linear2"):
            key = f"single_blocks.{parts[1]}.processor.{'qkv_lora' if rest == 'linear1' else 'proj_lora'}"
            rows = torch.arange(0, 3 * h) if rest == "linear1" else None
        else:
            continue
        b = folded if rows is None else folded[rows]
        w.put(f"{key}.down.weight", down)
        w.put(f"{key}.up.weight", b)
        w.add(f"{mod}.weight", _mm(b, down), rows)
        w.note(mod)


def _write_control(w: _Writer, modules: list[str], rank: int, seed: int, alpha: float,
                   targets: list[str] | None) -> None:
    modules = [m for m in modules if m != "img_in"]
    _write_plain("bfl_ab", w, modules, rank, seed, alpha)
    # _write_plain wrote diffusion_model.-prefixed keys; control LoRAs are bare: rename.
    w.tensors = {k.removeprefix("diffusion_model."): v for k, v in w.tensors.items()}
    for mod in modules:
        out_f, _ = w.mshapes[mod]
        bias = _randn(_gen(seed, "control-bias", mod, out_f), out_f, std=0.01)
        w.put(f"{mod}.lora_B.bias", bias)
        w.add(f"{mod}.bias", bias.to(torch.float64))
    norms = [k for k in flux_weight_shapes(w.shape) if k.endswith("_norm.scale")]
    if targets is not None:
        norms = [k for k in norms if k in targets or k.removesuffix(".scale") in targets]
    for k in norms:
        dims = flux_weight_shapes(w.shape)[k]
        value = (1.0 + torch.randn(dims, generator=_gen(seed, "control-norm", k)) * 0.1).to(DTYPE)
        w.put(k, value)
        w.replaced[k] = value.clone()


def _write_lokr(fmt: str, w: _Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        a, c = _small_divisor(out_f), _small_divisor(in_f)
        b, d = out_f // a, in_f // c
        gen = _gen(seed, fmt, mod, rank)
        key = kohya_name(mod)
        w1 = _randn(gen, a, c)
        w.put(f"{key}.lokr_w1", w1)
        if fmt == "lokr":
            w2 = _randn(gen, b, d)
            w.put(f"{key}.lokr_w2", w2)
            w2_64, scale = w2.double(), 1.0  # full factors: alpha is ignored
        elif fmt == "lokr_lowrank":
            w2_a, w2_b = _randn(gen, b, rank, std=0.2), _randn(gen, rank, d, std=0.2)
            w.put(f"{key}.lokr_w2_a", w2_a)
            w.put(f"{key}.lokr_w2_b", w2_b)
            w2_64, scale = _mm(w2_a, w2_b), alpha / rank
        else:
            t2 = _randn(gen, rank, rank, 1, 1, std=0.3)
            w2_a, w2_b = _randn(gen, rank, b, std=0.3), _randn(gen, rank, d, std=0.3)
            w.put(f"{key}.lokr_t2", t2)
            w.put(f"{key}.lokr_w2_a", w2_a)
            w.put(f"{key}.lokr_w2_b", w2_b)
            # w2[p, q] = sum_ij w2_a[i, p] t2[i, j] w2_b[j, q]
            w2_64, scale = w2_a.double().T @ t2[:, :, 0, 0].double() @ w2_b.double(), alpha / rank
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        w.add(f"{mod}.weight", torch.kron(w1.double(), w2_64) * scale)
        w.note(mod)


def _write_loha(w: _Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        gen = _gen(seed, "loha", mod, rank)
        w1a, w1b = _randn(gen, out_f, rank, std=0.25), _randn(gen, rank, in_f, std=0.25)
        w2a, w2b = _randn(gen, out_f, rank, std=0.25), _randn(gen, rank, in_f, std=0.25)
        key = kohya_name(mod)
        for name, t in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            w.put(f"{key}.{name}", t)
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        w.add(f"{mod}.weight", _mm(w1a, w1b) * _mm(w2a, w2b) * (alpha / rank))
        w.note(mod)


def _write_full_diff(w: _Writer, modules: list[str], seed: int) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        gen = _gen(seed, "diff", mod)
        diff, diff_b = _randn(gen, out_f, in_f, std=0.01), _randn(gen, out_f, std=0.01)
        key = kohya_name(mod)
        w.put(f"{key}.diff", diff)
        w.add(f"{mod}.weight", diff.double())
        if f"{mod}.bias" in flux_weight_shapes(w.shape):  # Flux.2 has no biases
            w.put(f"{key}.diff_b", diff_b)
            w.add(f"{mod}.bias", diff_b.double())
        w.note(mod)


def _write_dora(fmt: str, w: _Writer, modules: list[str], rank: int, seed: int, alpha: float,
                base: Mapping[str, torch.Tensor]) -> None:
    eps = torch.finfo(torch.float32).eps
    per_row = fmt == "dora_out"
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        down, up = lora_factors(seed, mod, out_f, in_f, rank)
        key = kohya_name(mod)
        w.put(f"{key}.lora_down.weight", down)
        w.put(f"{key}.lora_up.weight", up)
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        w0 = base[f"{mod}.weight"].double()
        dim = 1 if per_row else 0  # per row: norm over the input dim; per column: over the output dim
        gen = _gen(seed, fmt, mod, rank)
        base_norm = w0.norm(dim=dim, keepdim=True)
        mag = (base_norm * (1 + 0.05 * torch.randn(base_norm.shape, generator=gen, dtype=torch.float64))).to(DTYPE)
        w.put(f"{key}.dora_scale", mag)
        c = w0 + _mm(up, down) * (alpha / rank)
        n = c.norm(dim=dim, keepdim=True) + eps
        w.add(f"{mod}.weight", c * (mag.double() / n) - w0)
        w.note(mod)


def _write_sdxl(w: _Writer, rank: int, seed: int, alpha: float) -> None:
    table = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (40, 40),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (40, 48),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (40, 160),
        "lora_unet_output_blocks_2_1_proj_out": (40, 40),
    }
    for name, (out_f, in_f) in table.items():
        gen = _gen(seed, "sdxl", name, rank)
        w.put(f"{name}.lora_down.weight", _randn(gen, rank, in_f))
        w.put(f"{name}.lora_up.weight", _randn(gen, out_f, rank))
        w.put(f"{name}.alpha", torch.tensor(alpha, dtype=DTYPE))
    _te_kohya(w, rank, seed, alpha, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                     "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"])
    w.metadata.update({"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})


def write_lora(fmt: str, path: str | Path, shape: FluxShape, rank: int, seed: int,
               base: Mapping[str, torch.Tensor] | None = None, targets: Iterable[str] | None = None) -> LoraCase:
    """Write a LoRA file of format `fmt` and return it with the dense delta it should produce."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; known: {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = _Writer(shape)
    alpha = rank / 2
    target_list = None if targets is None else [t.removesuffix(".weight") for t in targets]
    modules = default_targets(shape) if target_list is None else [t for t in target_list if t in w.mshapes]
    unknown = [] if target_list is None else [t for t in target_list if t not in w.mshapes
                                             and not t.endswith("_norm") and not t.endswith("_norm.scale")]
    if unknown:
        raise ValueError(f"not Flux Linear modules: {unknown}")

    te = shape.vec_dim > 0  # Flux.1's CLIP-L / T5 text-encoder keys (Flux.2 LoRAs have none)
    if fmt in ("kohya", "kohya_noalpha"):
        _write_plain(fmt, w, modules, rank, seed, alpha)
        if te:
            _te_kohya(w, rank, seed, alpha if fmt == "kohya" else None,
                      ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                       "lora_te1_text_model_encoder_layers_0_mlp_fc1"])
        if fmt == "kohya":
            w.metadata.update({"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                               "ss_network_alpha": str(alpha)})
    elif fmt in ("bfl", "bfl_bare", "bfl_ab", "fal_kontext", "diffusers", "diffusers_alpha", "diffusers_bare",
                 "aitoolkit"):
        _write_plain(fmt, w, modules, rank, seed, alpha)
    elif fmt == "onetrainer":
        _write_plain(fmt, w, modules, rank, seed, alpha)
        if te:
            _te_kohya(w, rank, seed, alpha, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                             "lora_te2_encoder_block_0_layer_0_SelfAttention_q"])
    elif fmt == "kohya_split_qkv":
        _write_split_qkv(w, modules, rank, seed, alpha)
    elif fmt == "xlabs":
        _write_xlabs(w, modules, rank, seed, alpha)
    elif fmt == "bfl_control":
        _write_control(w, modules, rank, seed, alpha, target_list)
    elif fmt == "bfl_control_wide_img_in":
        gen = _gen(seed, "wide-img-in", rank)
        w.put("img_in.lora_A.weight", _randn(gen, rank, 2 * shape.in_channels))
        w.put("img_in.lora_B.weight", _randn(gen, shape.hidden, rank))
    elif fmt in ("lokr", "lokr_lowrank", "lokr_t2"):
        _write_lokr(fmt, w, modules, rank, seed, alpha)
    elif fmt == "loha":
        _write_loha(w, modules, rank, seed, alpha)
    elif fmt == "full_diff":
        _write_full_diff(w, modules, seed)
    elif fmt in ("dora", "dora_out"):
        if base is None:
            raise ValueError(f"{fmt} needs the base state dict (base=...)")
        _write_dora(fmt, w, modules, rank, seed, alpha, base)
    elif fmt == "sdxl":
        _write_sdxl(w, rank, seed, alpha)
    else:  # pragma: no cover
        raise AssertionError(fmt)

    save_file(w.tensors, str(path), metadata=w.metadata or None)
    exact = w.exact
    legacy = None
    if fmt == "kohya_split_qkv":
        legacy = w.legacy
    return LoraCase(
        path=path, fmt=fmt, expected={k: v.float() for k, v in exact.items()}, replaced=w.replaced,
        te_keys=w.te_keys, legacy_expected=None if legacy is None else {k: v.float() for k, v in legacy.items()},
        rank=rank, alpha=None if fmt in ("bfl_ab", "aitoolkit", "diffusers", "diffusers_bare", "xlabs", "fal_kontext",
                                         "bfl_control", "full_diff", "kohya_noalpha") else alpha,
        seed=seed, shape=shape, modules=w.modules, exact=exact, legacy_exact=legacy,
    )


def merged_reference(base: Mapping[str, torch.Tensor], parts: Iterable[tuple[LoraCase, float]],
                     legacy: bool = False) -> dict[str, torch.Tensor]:
    """What a correct merge gives: base + sum of fp32 deltas, rounded once to the base dtype; replaced keys set."""
    out = dict(base)
    total: dict[str, torch.Tensor] = {}
    for case, strength in parts:
        deltas = case.legacy_expected_at(strength) if legacy and case.legacy_exact is not None \
            else case.expected_at(strength)
        for k, d in deltas.items():
            total[k] = total[k] + d if k in total else d
    for k, d in total.items():
        out[k] = (base[k].float() + d).to(base[k].dtype)
    for case, _ in parts:
        for k, v in case.replaced.items():
            out[k] = v.to(base[k].dtype)
    return out


__all__: list[str] = [
    "FORMATS",
    "MERGE_FORMATS",
    "REFUSED_FORMATS",
    "SAME_LAYOUT_GROUPS",
    "TINY",
    "FluxShape",
    "LoraCase",
    "base_state_dict",
    "default_targets",
    "diffusers_modules",
    "flux_weight_shapes",
    "kohya_name",
    "lora_factors",
    "merged_reference",
    "module_shapes",
    "write_lora",
]
