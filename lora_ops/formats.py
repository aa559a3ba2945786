"""Every Flux LoRA key format, converted into one canonical form: `LoRAFile.targets`.

`targets` maps a BFL weight key (`double_blocks.0.img_attn.qkv.weight`, no prefix) to a list of
adapters, each with its row offset inside that weight. Each naming scheme is one small resolver
that turns a module name from the file into (BFL module, row slot); each adapter kind is built
from its factor names by `_build_adapter`. The coverage report says, for every key of the file,
which weight it went to or why it did not.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, Diff, DoRA, LoHa, LoKr, LoRA, SetWeight, _as_matrix, check_factor
from .errors import FIX_BROKEN, LoRAFormatError, LoRAFormatWarning, ModelMismatchError
from .flux import is_flux_state_dict
from .safetensors_io import SafetensorsFile

#: What to do about a LoRA file whose factors are broken (appended to those errors).

# ---------------------------------------------------------------------------------------------
# Module names
# ---------------------------------------------------------------------------------------------

#: BFL Linear modules LoRAs target; {i} is a block index.
BFL_MODULES = [
    *(
        f"double_blocks.{{i}}.{s}_{m}"
        for s in ("img", "txt")
        for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    ),
    "single_blocks.{i}.linear1",
    "single_blocks.{i}.linear2",
    "single_blocks.{i}.modulation.lin",
    "img_in",
    "txt_in",
    *(f"{e}.{layer}" for e in ("time_in", "vector_in", "guidance_in") for layer in ("in_layer", "out_layer")),
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
]

# (diffusers module, BFL module, slot). Slots: None = whole weight; ("split", n) = n-th of the
# equal row blocks (q/k/v); "mlp" = linear1 rows after q,k,v; "swap" = [scale; shift] rows.
DIFFUSERS_MODULES: list[tuple[str, str, object]] = [
    *(
        (f"transformer_blocks.{{i}}.attn.{d}", f"double_blocks.{{i}}.{s}_attn.qkv", ("split", n))
        for s, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")))
        for n, d in enumerate(names)
    ),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj", None),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0", None),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2", None),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0", None),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2", None),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin", None),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin", None),
    *(
        (f"single_transformer_blocks.{{i}}.attn.{d}", "single_blocks.{i}.linear1", ("split", n))
        for n, d in enumerate(("to_q", "to_k", "to_v"))
    ),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", "mlp"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", None),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin", None),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    *(
        (f"time_text_embed.{d}.linear_{n}", f"{b}.{layer}", None)
        for d, b in (
            ("timestep_embedder", "time_in"),
            ("text_embedder", "vector_in"),
            ("guidance_embedder", "guidance_in"),
        )
        for n, layer in ((1, "in_layer"), (2, "out_layer"))
    ),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
]

XLABS_MODULES: list[tuple[str, str, object]] = [
    ("double_blocks.{i}.processor.qkv_lora1", "double_blocks.{i}.img_attn.qkv", None),
    ("double_blocks.{i}.processor.qkv_lora2", "double_blocks.{i}.txt_attn.qkv", None),
    ("double_blocks.{i}.processor.proj_lora1", "double_blocks.{i}.img_attn.proj", None),
    ("double_blocks.{i}.processor.proj_lora2", "double_blocks.{i}.txt_attn.proj", None),
    ("single_blocks.{i}.processor.qkv_lora", "single_blocks.{i}.linear1", None),
    ("single_blocks.{i}.processor.proj_lora", "single_blocks.{i}.linear2", None),
]

NORM_SCALES = [
    *(f"double_blocks.{{i}}.{s}_attn.norm.{n}_norm" for s in ("img", "txt") for n in ("query", "key")),
    *(f"single_blocks.{{i}}.norm.{n}_norm" for n in ("query", "key")),
]


def _template_regex(templates: list[tuple[str, str, object]], underscore: bool) -> list[tuple[re.Pattern, str, object]]:
    out = []
    for src, dst, slot in templates:
        text = src.replace(".", "_") if underscore else src
        pattern = re.escape(text).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(f"^{pattern}$"), dst, slot))
    return out


_BFL_DOTTED = _template_regex([(m, m, None) for m in BFL_MODULES], underscore=False)
_BFL_UNDERSCORE = _template_regex([(m, m, None) for m in BFL_MODULES], underscore=True)
_DIFFUSERS_DOTTED = _template_regex(DIFFUSERS_MODULES, underscore=False)
_DIFFUSERS_UNDERSCORE = _template_regex(DIFFUSERS_MODULES, underscore=True)
_XLABS = _template_regex(XLABS_MODULES, underscore=False)
_NORMS = _template_regex([(m, m, None) for m in NORM_SCALES], underscore=False)


def _match(table: list[tuple[re.Pattern, str, object]], name: str) -> tuple[str, object] | None:
    for pattern, dst, slot in table:
        m = pattern.match(name)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst), slot
    return None


@dataclass(frozen=True)
class Resolved:
    scheme: str
    module: str  # BFL module name, e.g. double_blocks.0.img_attn.qkv
    slot: object = None


TEXT_ENCODER_PREFIXES = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "text_encoder",
    "text_encoders.",
    "te1.",
    "te2.",
)

# (scheme, prefixes to strip, table). Order matters only for the prefix; the tables do not overlap.
_SCHEMES: list[tuple[str, tuple[str, ...], list]] = [
    ("kohya", ("lora_unet_",), _BFL_UNDERSCORE),
    ("kohya-diffusers", ("lora_unet_",), _DIFFUSERS_UNDERSCORE),
    ("onetrainer", ("lora_transformer_",), _DIFFUSERS_UNDERSCORE),
    ("lycoris", ("lycoris_",), _DIFFUSERS_UNDERSCORE),
    ("lycoris", ("lycoris_",), _BFL_UNDERSCORE),
    ("fal-kontext", ("base_model.model.",), _BFL_DOTTED),
    ("bfl", ("model.diffusion_model.", "diffusion_model.", ""), _BFL_DOTTED),
    ("diffusers", ("transformer.", ""), _DIFFUSERS_DOTTED),
    ("xlabs", ("diffusion_model.", ""), _XLABS),
]


def resolve_module(name: str) -> Resolved | None:
    """Which BFL module a module name from a LoRA file means, under which naming scheme."""
    for scheme, prefixes, table in _SCHEMES:
        for prefix in prefixes:
            if name.startswith(prefix):
                hit = _match(table, name[len(prefix) :])
                if hit:
                    return Resolved(scheme, *hit)
    return None


# ---------------------------------------------------------------------------------------------
# Keys → modules → adapters
# ---------------------------------------------------------------------------------------------

#: factor suffix → (adapter family, factor name)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "lora_A.default.weight": ("lora", "down"),
    "lora_B.default.weight": ("lora", "up"),
    "down.weight": ("lora", "down"),
    "up.weight": ("lora", "up"),
    "lora_B.bias": ("bias", "diff"),
    "diff": ("diff", "diff"),
    "diff_b": ("bias", "diff"),
    "alpha": ("meta", "alpha"),
    "dora_scale": ("meta", "dora_scale"),
    **{f"lokr_{n}": ("lokr", n) for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    **{f"hada_{n}": ("loha", n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
}
_UNSUPPORTED_SUFFIXES = {
    "lora_mid.weight": "LoRA with a mid (Tucker) factor is for convolutions; Flux has none",
    "w_norm": "norm-layer patches (w_norm/b_norm) are not supported",
    "b_norm": "norm-layer patches (w_norm/b_norm) are not supported",
    "oft_blocks": "OFT adapters are not supported",
    "oft_diag": "OFT adapters are not supported",
    "a1.weight": "GLoRA adapters are not supported",
    "reshape_weight": "control LoRA img_in reshape marker (handled by the img_in width check)",
}


def _split_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) for a factor key, longest suffix first."""
    for suffix in sorted([*SUFFIXES, *_UNSUPPORTED_SUFFIXES], key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


@dataclass
class Coverage:
    """Where every key of a LoRA file went."""

    mapped: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    text_encoder_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.mapped) + len(self.unmapped) + len(self.text_encoder_keys)

    def summary(self) -> str:
        lines = [
            f"{len(self.mapped)} of {self.total} keys map to Flux weights; "
            f"{len(self.text_encoder_keys)} text-encoder keys (not part of the diffusion model); "
            f"{len(self.unmapped)} unmapped."
        ]
        for key, reason in list(self.unmapped.items())[:10]:
            lines.append(f"  unmapped {key}: {reason}")
        if len(self.unmapped) > 10:
            lines.append(f"  ... and {len(self.unmapped) - 10} more unmapped keys")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class LoRAFile:
    """The canonical form of one LoRA file."""

    path: Path
    format: str
    targets: dict[str, list[Adapter]]
    coverage: Coverage
    metadata: dict[str, str] = field(default_factory=dict)
    #: strength multiplier per target weight (per-block strengths, see lora_ops.blocks); absent = 1
    target_scales: dict[str, float] = field(default_factory=dict)
    block_spec: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for adapters in self.targets.values() for a in adapters)

    @property
    def ranks(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for adapters in self.targets.values():
            for a in adapters:
                if a.rank is not None:
                    counts[a.rank] = counts.get(a.rank, 0) + 1
        return counts

    def only(self, targets: set[str]) -> LoRAFile:
        """The same LoRA restricted to some target weights (for merging one tensor at a time)."""
        kept = {k: v for k, v in self.targets.items() if k in targets}
        return dataclasses.replace(self, targets=kept)

    def strength_on(self, target: str, strength: float) -> float:
        """The strength this LoRA applies to one target weight (its block multiplier included)."""
        return float(strength) * self.target_scales.get(target, 1.0)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for adapters in self.targets.values():
            for a in adapters:
                counts[a.kind] = counts.get(a.kind, 0) + 1
        return counts


def _guess_architecture(keys: list[str]) -> str:
    text = " ".join(keys[:2000])
    if re.search(r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)", text):
        return "an SD 1.x / SDXL UNet LoRA"
    if "joint_blocks" in text:
        return "an SD3 (MMDiT) LoRA"
    if re.search(r"blocks[._]\d+[._](self_attn|cross_attn|ffn)", text):
        return "a Wan / video-model LoRA"
    if keys and all(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys):
        return "a text-encoder-only LoRA"
    return "something other than a Flux LoRA"


def _scalar(t: torch.Tensor, path: Path, key: str) -> float:
    if t.numel() != 1 or t.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int32,
        torch.int64,
    ):
        raise LoRAFormatError(
            f"{path}: {key!r} should be a single number (alpha), got shape {tuple(t.shape)} {t.dtype}. {FIX_BROKEN}"
        )
    value = float(t.reshape(()).item())
    if not value == value or value in (float("inf"), float("-inf")):
        raise LoRAFormatError(f"{path}: alpha {key!r} is {value}, not a finite number. {FIX_BROKEN}")
    if value <= 0:
        raise LoRAFormatError(
            f"{path}: alpha {key!r} is {value}; a LoRA alpha must be positive (0 would make the LoRA do nothing). "
            f"{FIX_BROKEN}"
        )
    return value


def _peft_alphas(metadata: dict[str, str], path: Path | None = None) -> tuple[float | None, dict[str, float]]:
    """Default alpha/r and per-module alphas from PEFT's `lora_adapter_metadata` header entry.

    Refuses an entry it cannot read: the LoRA's scale would be unknown.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    where = f"{path}: metadata entry 'lora_adapter_metadata'"
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise LoRAFormatError(f"{where} is not a JSON object, so the LoRA's alpha is unknown. {FIX_BROKEN}")

    def positive(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise LoRAFormatError(
                f"{where}: {name} is {value!r}; it must be a positive number (it sets the LoRA's scale). {FIX_BROKEN}"
            )
        return float(value)

    alpha = config.get("lora_alpha")
    rank = config.get("r")
    alpha = None if alpha is None else positive("lora_alpha", alpha)
    rank = None if rank is None else positive("r", rank)
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoRAFormatError(f"{where}: alpha_pattern is not a JSON object. {FIX_BROKEN}")
    return (alpha / rank if alpha is not None and rank is not None else None), {
        k: positive(f"alpha_pattern[{k!r}]", v) for k, v in pattern.items()
    }


def _uses_split_qkv(metadata: dict[str, str]) -> bool | None:
    """kohya's split_qkv flag from `ss_network_args`; None when absent or unreadable (then the layout decides)."""
    args = metadata.get("ss_network_args")
    if not args:
        return None
    try:
        parsed = json.loads(args)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return str(parsed.get("split_qkv", "false")).lower() == "true"


def _block_diagonal_parts(up: torch.Tensor, down: torch.Tensor, module: str) -> list[tuple[int, int, int, int]] | None:
    """(row0, rows, col0, cols) of the blocks if `up` is block-diagonal over q,k,v(,mlp) splits."""
    out_features, stacked = up.shape
    hidden = down.shape[1]
    if module.endswith("attn.qkv"):
        row_sizes = [out_features // 3] * 3
    elif module.endswith("linear1"):
        row_sizes = [hidden, hidden, hidden, out_features - 3 * hidden]
    else:
        return None
    k = len(row_sizes)
    if stacked % k or stacked == k or min(row_sizes) <= 0:
        return None
    r = stacked // k
    parts, row0 = [], 0
    for i, rows in enumerate(row_sizes):
        parts.append((row0, rows, i * r, r))
        row0 += rows
    for row0, rows, col0, cols in parts:
        block = up[row0 : row0 + rows]
        outside = torch.cat([block[:, :col0], block[:, col0 + cols :]], dim=1)
        if bool(outside.any()):
            return None
    return parts


def _matrix(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    m = _as_matrix(t)
    if m.dim() != 2:
        raise LoRAFormatError(
            f"{path}: {key!r} has shape {tuple(t.shape)}; a Flux LoRA factor is a matrix (this looks like a "
            "convolution LoRA for another model; Flux has no convolutions). Use a Flux LoRA."
        )
    return m


def _build_adapter(
    path: Path,
    module: str,
    factors: dict[str, torch.Tensor],
    alpha: float | None,
    family: str,
    names: dict[str, str] | None = None,
) -> Adapter:
    """One adapter from the factors of one module; `names` maps each factor to its key in the file."""
    names = names or {k: f"{module}.{k}" for k in factors}
    keys = tuple(names[k] for k in factors)
    if family == "lora":
        if set(factors) != {"up", "down"}:
            missing = {"up", "down"} - set(factors)
            raise LoRAFormatError(
                f"{path}: {keys[0]!r} has no matching {' / '.join(sorted(missing))} factor in the file "
                f"(module {module!r}). {FIX_BROKEN}"
            )
        up, down = _matrix(path, names["up"], factors["up"]), _matrix(path, names["down"], factors["down"])
        if up.shape[1] != down.shape[0]:
            raise LoRAFormatError(
                f"{path}: {names['up']!r} is {tuple(up.shape)} but {names['down']!r} is {tuple(down.shape)}; their "
                f"ranks ({up.shape[1]} vs {down.shape[0]}) disagree. {FIX_BROKEN}"
            )
        rank = down.shape[0]
        if rank == 0:
            raise LoRAFormatError(
                f"{path}: {names['down']!r} and {names['up']!r} have rank 0 (shapes {tuple(down.shape)}, "
                f"{tuple(up.shape)}), so the LoRA changes nothing. {FIX_BROKEN}"
            )
        return LoRA(up, down, source_keys=keys, scale=(alpha / rank) if alpha is not None else 1.0)
    if family == "loha":
        rank = factors["w1_b"].shape[0] if "w1_b" in factors and factors["w1_b"].dim() else 0
        if not {"w1_a", "w1_b", "w2_a", "w2_b"} <= set(factors) or rank == 0:
            raise LoRAFormatError(
                f"{path}: LoHa module {module!r} lacks hada_w1_a/w1_b/w2_a/w2_b or has rank 0. {FIX_BROKEN}"
            )
        if "t1" not in factors and "t2" not in factors:
            w1a, w1b, w2a, w2b = (_matrix(path, names[n], factors[n]) for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
            if (
                w1a.shape[1] != w1b.shape[0]
                or w2a.shape[1] != w2b.shape[0]
                or w1a.shape[0] != w2a.shape[0]
                or (w1b.shape[1] != w2b.shape[1])
            ):
                shapes = ", ".join(f"{names[n]} {tuple(factors[n].shape)}" for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
                raise LoRAFormatError(f"{path}: LoHa factors do not fit together ({shapes}). {FIX_BROKEN}")
        return LoHa(
            factors["w1_a"],
            factors["w1_b"],
            factors["w2_a"],
            factors["w2_b"],
            factors.get("t1"),
            factors.get("t2"),
            source_keys=keys,
            scale=(alpha / rank) if alpha is not None else 1.0,
        )
    if family == "lokr":
        has_w1 = "w1" in factors or {"w1_a", "w1_b"} <= set(factors)
        has_w2 = "w2" in factors or {"w2_a", "w2_b"} <= set(factors)
        if not (has_w1 and has_w2):
            raise LoRAFormatError(f"{path}: LoKr module {module!r} lacks its w1 or w2 factor. {FIX_BROKEN}")
        for name, t in factors.items():
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise LoRAFormatError(f"{path}: LoKr factor {names[name]!r} has dtype {t.dtype}, not floating point")
        try:
            return LoKr.from_factors(factors, alpha, source_keys=keys)
        except (RuntimeError, IndexError) as e:
            shapes = ", ".join(f"{names[n]} {tuple(t.shape)}" for n, t in factors.items())
            raise LoRAFormatError(f"{path}: LoKr factors do not fit together ({shapes}): {e}. {FIX_BROKEN}") from None
    return Diff(factors["diff"], source_keys=keys, scale=1.0)


def _check_dora(path: Path, key: str, magnitude: torch.Tensor, rows: int, cols: int) -> None:
    """DoRA's magnitude is one value per input column (1, in) or per output row (out, 1)."""
    fits = magnitude.dim() >= 1 and (
        (magnitude.shape[0] == 1 and magnitude.numel() == cols) or (magnitude.numel() == rows)
    )
    if not fits:
        raise LoRAFormatError(
            f"{path}: DoRA magnitude {key!r} has shape {tuple(magnitude.shape)}, but its LoRA makes a {rows}x{cols} "
            f"change (expected (1, {cols}) or ({rows}, 1)). {FIX_BROKEN}"
        )


def _place(adapter: Adapter, resolved: Resolved, path: Path, module: str) -> Adapter | None:
    """Set the row offset of a split (q/k/v, mlp) adapter; swap scale/shift rows. None = cannot."""
    slot = resolved.slot
    rows, cols = adapter.shape
    if isinstance(slot, tuple):
        adapter.row_offset = slot[1] * rows
    elif slot == "mlp":
        adapter.row_offset = 3 * cols
    elif slot == "swap":
        half = rows // 2
        if isinstance(adapter, LoRA):
            adapter.up = torch.cat([adapter.up[half:], adapter.up[:half]])
        elif isinstance(adapter, Diff):
            adapter.diff = torch.cat([adapter.diff[half:], adapter.diff[:half]])
        else:
            return None
    return adapter


def load_lora(
    path: str | Path,
    *,
    legacy_split_qkv: bool = False,
    max_unmapped_fraction: float | None = None,
) -> LoRAFile:
    """Read a LoRA safetensors file (any supported format) into the canonical form.

    Raises LoRAFormatError when nothing maps to Flux, when factors are broken, or when more than
    `max_unmapped_fraction` of the diffusion-model keys cannot be mapped.
    """
    path = Path(path)
    st = SafetensorsFile(path)
    if is_flux_state_dict(st.keys()):
        raise LoRAFormatError(
            f"{path}: this is a Flux model checkpoint ({len(st.keys())} tensors with full weights such as "
            "'img_in.weight'), not a LoRA. Give it as the model and a LoRA file as the LoRA."
        )
    tensors = dict(st.iter_tensors())
    coverage = Coverage()
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            coverage.text_encoder_keys.append(key)
            continue
        split = _split_key(key)
        if split is None:
            resolved_norm = _match(_NORMS, key.removeprefix("diffusion_model.").removesuffix(".scale"))
            if key.endswith(".scale") and resolved_norm:
                modules.setdefault(resolved_norm[0] + ".scale", {})["set"] = (key, tensor)
            else:
                coverage.unmapped[key] = "not a LoRA factor name this pack knows"
            continue
        module, suffix = split
        if suffix in _UNSUPPORTED_SUFFIXES:
            coverage.unmapped[key] = _UNSUPPORTED_SUFFIXES[suffix]
            continue
        modules.setdefault(module, {})[suffix] = (key, tensor)

    peft_scale, peft_pattern = _peft_alphas(st.metadata, path)
    split_flag = _uses_split_qkv(st.metadata)
    targets: dict[str, list[Adapter]] = {}
    schemes: set[str] = set()
    no_alpha: list[str] = []
    for module, parts in modules.items():
        if "set" in parts:
            key, value = parts["set"]
            target = module
            targets.setdefault(target, []).append(SetWeight(value, source_keys=(key,), scale=1.0))
            coverage.mapped[key] = target
            schemes.add("bfl-control")
            continue
        resolved = resolve_module(module)
        keys = [k for k, _ in parts.values()]
        if resolved is None:
            for k in keys:
                coverage.unmapped[k] = f"module {module!r} is not a Flux layer under any known naming scheme"
            continue
        schemes.add(resolved.scheme)
        alpha = None
        if "alpha" in parts:
            alpha = _scalar(parts["alpha"][1], path, parts["alpha"][0])
        families: dict[str, dict[str, torch.Tensor]] = {}
        names: dict[str, dict[str, str]] = {}
        for suffix, (key, tensor) in parts.items():
            family, name = SUFFIXES[suffix]
            if name in names.get(family, {}):
                raise LoRAFormatError(
                    f"{path}: {names[family][name]!r} and {key!r} are the same factor of {module!r} under two "
                    "naming schemes; the file mixes two copies of a LoRA. Remove one set of keys."
                )
            if suffix != "alpha":
                check_factor(path, key, tensor)
            families.setdefault(family, {})[name] = tensor
            names.setdefault(family, {})[name] = key
        families.pop("meta", None)
        built: list[tuple[Adapter, str]] = []
        for family, factors in families.items():
            suffix_target = ".bias" if family == "bias" else ".weight"
            adapter = _build_adapter(path, module, factors, alpha, family, names[family])
            if family == "lora" and alpha is None:
                if module in peft_pattern:
                    adapter.scale = peft_pattern[module] / adapter.rank
                elif peft_scale is not None:
                    adapter.scale = peft_scale
                else:
                    no_alpha.append(module)
            built.append((adapter, suffix_target))
        dora = parts.get("dora_scale")
        if dora is not None:
            for adapter, suffix_target in built:
                if suffix_target == ".weight":
                    _check_dora(path, dora[0], dora[1], *adapter.shape)
        for adapter, suffix_target in built:
            placed = _place(adapter, resolved, path, module)
            if placed is None:
                for k in keys:
                    coverage.unmapped[k] = (
                        f"{adapter.kind} on {module!r} needs a scale/shift row swap, supported for LoRA and diff only"
                    )
                continue
            adapters = [placed]
            if dora is not None and suffix_target == ".weight":
                adapters = [
                    DoRA(
                        placed,
                        dora[1],
                        source_keys=placed.source_keys + (dora[0],),
                        scale=1.0,
                        row_offset=placed.row_offset,
                    )
                ]
            elif (
                isinstance(placed, LoRA)
                and resolved.scheme in ("kohya", "lycoris")
                and not legacy_split_qkv
                and split_flag is not False
            ):
                adapters = _fix_split_qkv(placed, module, resolved, alpha, split_flag, path, coverage)
            target = resolved.module + suffix_target
            targets.setdefault(target, []).extend(adapters)
            for k in keys:
                coverage.mapped[k] = target

    if no_alpha and targets:
        coverage.notes.append(
            f"{len(no_alpha)} LoRA module(s) have no alpha (e.g. {no_alpha[0]!r}); applied with scale 1 "
            "(alpha = rank), as for files that fold alpha into the factors"
        )
    _check_overlaps(path, targets)
    if not targets:
        what = _guess_architecture(list(tensors))
        raise LoRAFormatError(
            f"{path}: nothing in this file applies to Flux: it looks like {what} "
            f"({len(tensors)} keys, e.g. {next(iter(tensors), '(none)')!r}). Use a Flux LoRA."
        )
    for adapters in targets.values():
        for a in adapters:
            a.validate(path)
    n_model_keys = len(coverage.mapped) + len(coverage.unmapped)
    if coverage.unmapped:
        fraction = len(coverage.unmapped) / max(n_model_keys, 1)
        examples = ", ".join(list(coverage.unmapped)[:3])
        message = (
            f"{path}: {len(coverage.unmapped)} of {n_model_keys} diffusion-model keys were not applied "
            f"(e.g. {examples}); see the coverage report."
        )
        if max_unmapped_fraction is not None and fraction > max_unmapped_fraction:
            raise LoRAFormatError(message + f" That is over the allowed {max_unmapped_fraction:.0%}.")
        warnings.warn(message, LoRAFormatWarning, stacklevel=2)
    return LoRAFile(path, "+".join(sorted(schemes)), targets, coverage, dict(st.metadata))


def _fix_split_qkv(
    lora: LoRA,
    module: str,
    resolved: Resolved,
    alpha: float | None,
    split_flag: bool | None,
    path: Path,
    coverage: Coverage,
) -> list[Adapter]:
    """kohya split_qkv files store q,k,v(,mlp) as one block-diagonal LoRA but keep the per-split alpha.

    Read naively (alpha / stacked rank) they are 3-4x too weak (sd-scripts issue #2204). Each split
    becomes its own LoRA with scale alpha / split rank. Files converted by convert_flux_lora.py set
    alpha = stacked rank, so (without kohya metadata) those are left as they are.
    """
    if alpha is None:
        return [lora]
    parts = _block_diagonal_parts(lora.up, lora.down, resolved.module)
    if parts is None:
        return [lora]
    stacked = lora.down.shape[0]
    if split_flag is None and abs(alpha - stacked) < 1e-6:
        return [lora]
    out: list[Adapter] = []
    for row0, rows, col0, cols in parts:
        out.append(
            LoRA(
                lora.up[row0 : row0 + rows, col0 : col0 + cols],
                lora.down[col0 : col0 + cols],
                source_keys=lora.source_keys,
                scale=alpha / cols,
                row_offset=lora.row_offset + row0,
            )
        )
    note = (
        f"{module}: kohya split_qkv layout (block-diagonal, {len(parts)} splits, alpha {alpha:g}); "
        f"scaled each split by alpha/{cols} instead of alpha/{stacked} (sd-scripts issue #2204). "
        "Pass legacy_split_qkv=True for the old, 3-4x weaker reading."
    )
    coverage.notes.append(note)
    warnings.warn(f"{path}: {note}", LoRAFormatWarning, stacklevel=3)
    return out


def _check_overlaps(path: Path, targets: dict[str, list[Adapter]]) -> None:
    """Two adapters on the same rows of one weight means the file mixes naming schemes."""
    for target, adapters in targets.items():
        spans = sorted((a.row_offset, a.row_offset + a.shape[0], a.source_keys[0]) for a in adapters)
        for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise LoRAFormatError(
                    f"{path}: {key!r} and {other!r} both change {target} (rows {begin}..{end}); the file "
                    "holds the same LoRA under two naming schemes. Remove one set of keys."
                )


#: GPU bytes per LoRA parameter when applied unmerged the way kohya's flux_minimal_inference does:
#: fp32 factors (4 B) plus the bf16 copy autocast caches for the whole run (2 B).
UNMERGED_BYTES_PER_PARAM = 6


def describe(lora: LoRAFile) -> dict[str, object]:
    """Facts about a LoRA for `inspect` and the planner."""
    params = sum(t.numel() for adapters in lora.targets.values() for a in adapters for t in a.factors().values())
    alphas = sorted({round(a.scale * a.rank, 4) for ads in lora.targets.values() for a in ads if a.rank})
    return {
        "path": str(lora.path),
        "format": lora.format,
        "targets": len(lora.targets),
        "kinds": lora.kinds(),
        "ranks": lora.ranks,
        "alphas": alphas,
        "params": params,
        "file_mib": lora.nbytes / 2**20,
        "unmerged_runtime_mib": params * UNMERGED_BYTES_PER_PARAM / 2**20,
        "mapped_keys": len(lora.coverage.mapped),
        "unmapped": lora.coverage.unmapped,
        "text_encoder_keys": len(lora.coverage.text_encoder_keys),
        "notes": lora.coverage.notes,
    }


ShapeLookup = Callable[[str], "tuple[int, ...] | None"]


def check_fits(lora: LoRAFile, shape_of: ShapeLookup, model_name: str = "the model") -> None:
    """Raise ModelMismatchError unless every adapter fits a weight of the model."""
    for target, adapters in lora.targets.items():
        shape = shape_of(target)
        if shape is None:
            raise ModelMismatchError(
                f"{lora.path}: the LoRA changes {target!r} (from {adapters[0].source_keys[0]!r}), which "
                f"{model_name} does not have: the LoRA is for another Flux variant or model. Use a LoRA made "
                "for this model."
            )
        rows = shape[0]
        cols = shape[1] if len(shape) > 1 else 1
        for a in adapters:
            a_rows, a_cols = a.shape
            if a_cols != cols or a.row_offset + a_rows > rows:
                hint = " Use a LoRA made for this model."
                if target == "img_in.weight" and a_cols > cols:
                    hint = (
                        f" This is a Flux control LoRA (Canny/Depth) whose img_in takes {a_cols} input channels; "
                        f"the base model's img_in takes {cols}. Use it with a Flux Canny/Depth base model."
                    )
                raise ModelMismatchError(
                    f"{lora.path}: {a.source_keys[0]!r} makes a {a_rows}x{a_cols} change at row {a.row_offset} of "
                    f"{target!r}, but {model_name} has shape {tuple(shape)}; the LoRA was made for a model of "
                    f"another size.{hint}"
                )
