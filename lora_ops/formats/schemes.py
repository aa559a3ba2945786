"""Naming schemes: which model module a module name from a LoRA file means.

An architecture lists its module names once per family of names (`ModuleNames`: BFL, diffusers,
XLabs, norm scales); `Schemes` compiles them into the prefixed, dotted or underscored spellings
each trainer writes. Slots say where in a fused weight a module's rows go: None = the whole
weight; ("split", n) = the n-th of the equal row blocks (q/k/v); "mlp" = linear1 rows after
q,k,v; "swap" = [scale; shift] rows stored the other way round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: (module name in the file's family, BFL module, slot); {i} is a block index.
Template = tuple[str, str, object]
_Table = list[tuple[re.Pattern, str, object]]

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


@dataclass(frozen=True)
class ModuleNames:
    """One architecture's LoRA-targetable modules under each family of names."""

    bfl: tuple[str, ...]  # BFL Linear modules (the canonical names)
    diffusers: tuple[Template, ...]
    xlabs: tuple[Template, ...] = ()
    norm_scales: tuple[str, ...] = ()  # RMSNorm scales a control LoRA replaces


@dataclass(frozen=True)
class Resolved:
    scheme: str
    module: str  # BFL module name, e.g. double_blocks.0.img_attn.qkv
    slot: object = None


def _template_regex(templates: tuple[Template, ...], underscore: bool) -> _Table:
    out = []
    for src, dst, slot in templates:
        text = src.replace(".", "_") if underscore else src
        pattern = re.escape(text).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(f"^{pattern}$"), dst, slot))
    return out


def _match(table: _Table, name: str) -> tuple[str, object] | None:
    for pattern, dst, slot in table:
        m = pattern.match(name)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst), slot
    return None


class Schemes:
    """Every naming scheme of one architecture, compiled once."""

    def __init__(self, names: ModuleNames) -> None:
        bfl = tuple((m, m, None) for m in names.bfl)
        bfl_dotted = _template_regex(bfl, underscore=False)
        bfl_underscore = _template_regex(bfl, underscore=True)
        diffusers_dotted = _template_regex(names.diffusers, underscore=False)
        diffusers_underscore = _template_regex(names.diffusers, underscore=True)
        # (scheme, prefixes to strip, table). Order matters only for the prefix; the tables do not overlap.
        self.schemes: list[tuple[str, tuple[str, ...], _Table]] = [
            ("kohya", ("lora_unet_",), bfl_underscore),
            ("kohya-diffusers", ("lora_unet_",), diffusers_underscore),
            ("onetrainer", ("lora_transformer_",), diffusers_underscore),
            ("lycoris", ("lycoris_",), diffusers_underscore),
            ("lycoris", ("lycoris_",), bfl_underscore),
            ("fal-kontext", ("base_model.model.",), bfl_dotted),
            ("bfl", ("model.diffusion_model.", "diffusion_model.", "transformer.", ""), bfl_dotted),  # ai-toolkit
            ("diffusers", ("transformer.", ""), diffusers_dotted),
            ("xlabs", ("diffusion_model.", ""), _template_regex(names.xlabs, underscore=False)),
        ]
        self.norms = _template_regex(tuple((m, m, None) for m in names.norm_scales), underscore=False)

    def resolve(self, name: str) -> Resolved | None:
        """Which BFL module a module name from a LoRA file means, under which naming scheme."""
        for scheme, prefixes, table in self.schemes:
            for prefix in prefixes:
                if name.startswith(prefix):
                    hit = _match(table, name[len(prefix) :])
                    if hit:
                        return Resolved(scheme, *hit)
        return None

    def norm_scale(self, key: str) -> str | None:
        """The BFL norm module a control LoRA's `<norm>.scale` key replaces, or None."""
        if not key.endswith(".scale"):
            return None
        hit = _match(self.norms, key.removeprefix("diffusion_model.").removesuffix(".scale"))
        return hit[0] if hit else None
