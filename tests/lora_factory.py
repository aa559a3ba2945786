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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lora_modules import (
    TINY,
    TINY_FLUX2,
    base_state_dict,
    default_targets,
    diffusers_modules,
    kohya_name,
    lora_factors,
    module_shapes,
)
from lora_writers import Writer, fill
from safetensors.torch import save_file

from lora_ops.flux import FluxShape, flux_weight_shapes

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


def write_lora(fmt: str, path: str | Path, shape: FluxShape, rank: int, seed: int,
               base: Mapping[str, torch.Tensor] | None = None, targets: Iterable[str] | None = None) -> LoraCase:
    """Write a LoRA file of format `fmt` and return it with the dense delta it should produce."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; known: {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = Writer(shape)
    alpha = rank / 2
    target_list = None if targets is None else [t.removesuffix(".weight") for t in targets]
    modules = default_targets(shape) if target_list is None else [t for t in target_list if t in w.mshapes]
    unknown = [] if target_list is None else [t for t in target_list if t not in w.mshapes
                                             and not t.endswith("_norm") and not t.endswith("_norm.scale")]
    if unknown:
        raise ValueError(f"not Flux Linear modules: {unknown}")

    fill(fmt, w, modules, rank, seed, alpha, base, target_list)
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
    "TINY_FLUX2",
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
