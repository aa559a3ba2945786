"""One writer per LoRA file format for the test oracle: each puts the format's tensors and records, in float64,
the change the file must make to each BFL weight (see lora_factory.py for the factors the formats share)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch
from lora_modules import DTYPE, diffusers_modules, generator, kohya_name, lora_factors, module_shapes, randn

from lora_ops.flux import FluxShape, flux_weight_shapes

_ONLY_DOUBLE_QKV_PROJ_SINGLE_LINEAR = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")


def _small_divisor(n: int) -> int:
    for d in (4, 2):
        if n % d == 0 and n > d:
            return d
    return 1


class Writer:
    """The tensors of one file being written, and the exact change (float64) each BFL weight must get from it."""

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


def _te_kohya(w: Writer, rank: int, seed: int, alpha: float | None, prefixes: Iterable[str]) -> None:
    d, t5 = w.shape.vec_dim, w.shape.context_dim
    table = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (d, d),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (4 * d, d),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (t5, t5),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (d, d),
    }
    for name in prefixes:
        out_f, in_f = table[name]
        gen = generator(seed, "te", name, rank)
        w.put(f"{name}.lora_down.weight", randn(gen, rank, in_f), te=True)
        w.put(f"{name}.lora_up.weight", randn(gen, out_f, rank), te=True)
        if alpha is not None:
            w.put(f"{name}.alpha", torch.tensor(alpha, dtype=DTYPE), te=True)




def _write_plain(fmt: str, w: Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
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


def _write_split_qkv(w: Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
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
        gen = generator(seed, "split", mod, rank)
        downs = [randn(gen, rank, in_f) for _ in splits]
        ups = [randn(gen, b - a, rank) for a, b in splits]
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


def _write_xlabs(w: Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
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


def _write_control(w: Writer, modules: list[str], rank: int, seed: int, alpha: float,
                   targets: list[str] | None) -> None:
    modules = [m for m in modules if m != "img_in"]
    _write_plain("bfl_ab", w, modules, rank, seed, alpha)
    # _write_plain wrote diffusion_model.-prefixed keys; control LoRAs are bare: rename.
    w.tensors = {k.removeprefix("diffusion_model."): v for k, v in w.tensors.items()}
    for mod in modules:
        out_f, _ = w.mshapes[mod]
        bias = randn(generator(seed, "control-bias", mod, out_f), out_f, std=0.01)
        w.put(f"{mod}.lora_B.bias", bias)
        w.add(f"{mod}.bias", bias.to(torch.float64))
    norms = [k for k in flux_weight_shapes(w.shape) if k.endswith("_norm.scale")]
    if targets is not None:
        norms = [k for k in norms if k in targets or k.removesuffix(".scale") in targets]
    for k in norms:
        dims = flux_weight_shapes(w.shape)[k]
        value = (1.0 + torch.randn(dims, generator=generator(seed, "control-norm", k)) * 0.1).to(DTYPE)
        w.put(k, value)
        w.replaced[k] = value.clone()


def _write_lokr(fmt: str, w: Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        a, c = _small_divisor(out_f), _small_divisor(in_f)
        b, d = out_f // a, in_f // c
        gen = generator(seed, fmt, mod, rank)
        key = kohya_name(mod)
        w1 = randn(gen, a, c)
        w.put(f"{key}.lokr_w1", w1)
        if fmt == "lokr":
            w2 = randn(gen, b, d)
            w.put(f"{key}.lokr_w2", w2)
            w2_64, scale = w2.double(), 1.0  # full factors: alpha is ignored
        elif fmt == "lokr_lowrank":
            w2_a, w2_b = randn(gen, b, rank, std=0.2), randn(gen, rank, d, std=0.2)
            w.put(f"{key}.lokr_w2_a", w2_a)
            w.put(f"{key}.lokr_w2_b", w2_b)
            w2_64, scale = _mm(w2_a, w2_b), alpha / rank
        else:
            t2 = randn(gen, rank, rank, 1, 1, std=0.3)
            w2_a, w2_b = randn(gen, rank, b, std=0.3), randn(gen, rank, d, std=0.3)
            w.put(f"{key}.lokr_t2", t2)
            w.put(f"{key}.lokr_w2_a", w2_a)
            w.put(f"{key}.lokr_w2_b", w2_b)
            # w2[p, q] = sum_ij w2_a[i, p] t2[i, j] w2_b[j, q]
            w2_64, scale = w2_a.double().T @ t2[:, :, 0, 0].double() @ w2_b.double(), alpha / rank
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        w.add(f"{mod}.weight", torch.kron(w1.double(), w2_64) * scale)
        w.note(mod)


def _write_loha(w: Writer, modules: list[str], rank: int, seed: int, alpha: float) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        gen = generator(seed, "loha", mod, rank)
        w1a, w1b = randn(gen, out_f, rank, std=0.25), randn(gen, rank, in_f, std=0.25)
        w2a, w2b = randn(gen, out_f, rank, std=0.25), randn(gen, rank, in_f, std=0.25)
        key = kohya_name(mod)
        for name, t in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            w.put(f"{key}.{name}", t)
        w.put(f"{key}.alpha", torch.tensor(alpha, dtype=DTYPE))
        w.add(f"{mod}.weight", _mm(w1a, w1b) * _mm(w2a, w2b) * (alpha / rank))
        w.note(mod)


def _write_full_diff(w: Writer, modules: list[str], seed: int) -> None:
    for mod in modules:
        out_f, in_f = w.mshapes[mod]
        gen = generator(seed, "diff", mod)
        diff, diff_b = randn(gen, out_f, in_f, std=0.01), randn(gen, out_f, std=0.01)
        key = kohya_name(mod)
        w.put(f"{key}.diff", diff)
        w.add(f"{mod}.weight", diff.double())
        if f"{mod}.bias" in flux_weight_shapes(w.shape):  # Flux.2 has no biases
            w.put(f"{key}.diff_b", diff_b)
            w.add(f"{mod}.bias", diff_b.double())
        w.note(mod)


def _write_dora(fmt: str, w: Writer, modules: list[str], rank: int, seed: int, alpha: float,
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
        gen = generator(seed, fmt, mod, rank)
        base_norm = w0.norm(dim=dim, keepdim=True)
        mag = (base_norm * (1 + 0.05 * torch.randn(base_norm.shape, generator=gen, dtype=torch.float64))).to(DTYPE)
        w.put(f"{key}.dora_scale", mag)
        c = w0 + _mm(up, down) * (alpha / rank)
        n = c.norm(dim=dim, keepdim=True) + eps
        w.add(f"{mod}.weight", c * (mag.double() / n) - w0)
        w.note(mod)


def _write_sdxl(w: Writer, rank: int, seed: int, alpha: float) -> None:
    table = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (40, 40),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (40, 48),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (40, 160),
        "lora_unet_output_blocks_2_1_proj_out": (40, 40),
    }
    for name, (out_f, in_f) in table.items():
        gen = generator(seed, "sdxl", name, rank)
        w.put(f"{name}.lora_down.weight", randn(gen, rank, in_f))
        w.put(f"{name}.lora_up.weight", randn(gen, out_f, rank))
        w.put(f"{name}.alpha", torch.tensor(alpha, dtype=DTYPE))
    _te_kohya(w, rank, seed, alpha, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                     "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"])
    w.metadata.update({"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})


def fill(fmt: str, w: Writer, modules: list[str], rank: int, seed: int, alpha: float,
         base: Mapping[str, torch.Tensor] | None, targets: list[str] | None) -> None:
    """Write format `fmt`'s tensors for `modules` into `w`, with the exact delta each must produce."""
    shape = w.shape
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
        _write_control(w, modules, rank, seed, alpha, targets)
    elif fmt == "bfl_control_wide_img_in":
        gen = generator(seed, "wide-img-in", rank)
        w.put("img_in.lora_A.weight", randn(gen, rank, 2 * shape.in_channels))
        w.put("img_in.lora_B.weight", randn(gen, shape.hidden, rank))
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
