"""`load_lora`: any supported Flux LoRA file into the canonical `LoRAFile`, in a few named steps.

Keys are grouped by module (`factor_keys`), each module name is resolved under the naming schemes
(`schemes`, with Flux.1's tables in `flux1`), each adapter kind builds itself from its factors
(`adapters.FILE_KINDS`), and the adapters are placed at their rows of the target weight.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import flux as architecture
from ..adapters import Adapter, Diff, DoRA, LoRA, SetWeight, check_factor
from ..errors import FIX_BROKEN, LoRAFormatError, LoRAFormatWarning
from ..flux import is_flux_state_dict, lora_module_family
from ..safetensors_io import SafetensorsFile
from .factor_keys import SUFFIXES, UNSUPPORTED_SUFFIXES, peft_alphas, read_alpha, split_key
from .flux1 import FLUX1
from .flux2 import FLUX2
from .lora_file import Coverage, LoRAFile
from .schemes import TEXT_ENCODER_PREFIXES, Resolved, Schemes
from .split_qkv import fix_split_qkv, uses_split_qkv

#: One module's keys: suffix (or "set" for a control-LoRA norm scale) -> (key, tensor).
_Parts = dict[str, tuple[str, torch.Tensor]]


@dataclass
class _Reading:
    """One file being read: what every module needs (file, schemes, alpha metadata) and the result so far."""

    path: Path
    schemes: Schemes
    legacy_split_qkv: bool
    peft_scale: float | None
    peft_pattern: dict[str, float]
    split_flag: bool | None
    coverage: Coverage = field(default_factory=Coverage)
    targets: dict[str, list[Adapter]] = field(default_factory=dict)
    formats: set[str] = field(default_factory=set)
    no_alpha: list[str] = field(default_factory=list)
    #: family -> the first key whose name or shape says the LoRA was made for that family, and why
    family_evidence: dict[str, str] = field(default_factory=dict)


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
    st = _open_lora(path)
    tensors = dict(st.iter_tensors())
    coverage = Coverage()
    modules = _group_by_module(tensors, FLUX1, coverage)
    peft_scale, peft_pattern = peft_alphas(st.metadata, path)
    reading = _Reading(path, FLUX1, legacy_split_qkv, peft_scale, peft_pattern, uses_split_qkv(st.metadata), coverage)
    for module, parts in modules.items():
        _read_module(reading, module, parts)
    _check_targets(reading, tensors)
    _warn_unmapped(reading, max_unmapped_fraction)
    family, evidence = _family(reading)
    return LoRAFile(
        path,
        "+".join(sorted(reading.formats)),
        reading.targets,
        coverage,
        dict(st.metadata),
        family=family,
        family_evidence=evidence,
    )


def _open_lora(path: Path) -> SafetensorsFile:
    """The validated file, refusing a whole Flux checkpoint given where a LoRA belongs."""
    st = SafetensorsFile(path)
    if is_flux_state_dict(st.keys()):
        raise LoRAFormatError(
            f"{path}: this is a Flux model checkpoint ({len(st.keys())} tensors with full weights such as "
            "'img_in.weight'), not a LoRA. Give it as the model and a LoRA file as the LoRA."
        )
    return st


def _group_by_module(tensors: dict[str, torch.Tensor], schemes: Schemes, coverage: Coverage) -> dict[str, _Parts]:
    """Each key under its module; text-encoder and unknown keys go to the coverage report."""
    modules: dict[str, _Parts] = {}
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            coverage.text_encoder_keys.append(key)
            continue
        split = split_key(key)
        if split is None:
            norm = schemes.norm_scale(key)
            if norm is not None:
                modules.setdefault(norm + ".scale", {})["set"] = (key, tensor)
            else:
                coverage.unmapped[key] = "not a LoRA factor name this pack knows"
            continue
        module, suffix = split
        if suffix in UNSUPPORTED_SUFFIXES:
            coverage.unmapped[key] = UNSUPPORTED_SUFFIXES[suffix]
            continue
        modules.setdefault(module, {})[suffix] = (key, tensor)
    return modules


def _read_module(reading: _Reading, module: str, parts: _Parts) -> None:
    """All adapters of one module, built, checked and placed at their rows of the target."""
    if "set" in parts:
        key, value = parts["set"]
        reading.targets.setdefault(module, []).append(SetWeight(value, source_keys=(key,), scale=1.0))
        reading.coverage.mapped[key] = module
        reading.formats.add("bfl-control")
        return
    resolved = _resolve(reading, module, parts)
    keys = [k for k, _ in parts.values()]
    if resolved is None:
        for k in keys:
            reading.coverage.unmapped[k] = f"module {module!r} is not a Flux layer under any known naming scheme"
        return
    reading.formats.add(resolved.scheme)
    alpha = read_alpha(parts["alpha"][1], reading.path, parts["alpha"][0]) if "alpha" in parts else None
    built = [
        _build(reading, module, kind, factors, names, alpha)
        for kind, (factors, names) in _factors_by_kind(reading.path, module, parts).items()
    ]
    dora = parts.get("dora_scale")
    if dora is not None:
        for adapter in built:
            if adapter.target == "weight":
                _check_dora(reading.path, dora[0], dora[1], *adapter.shape)
    for adapter in built:
        _add(reading, module, resolved, adapter, alpha, dora, keys)


def _resolve(reading: _Reading, module: str, parts: _Parts) -> Resolved | None:
    """The module under Flux.1's names, else Flux.2's; a name only one family has is evidence for it."""
    flux1, flux2 = reading.schemes.resolve(module), FLUX2.resolve(module)
    if (flux1 is None) != (flux2 is None):
        family = architecture.FLUX1 if flux1 is not None else architecture.FLUX2
        key = next(iter(parts.values()))[0]
        reading.family_evidence.setdefault(family, f"{key!r} names a {architecture.FAMILY_NAMES[family]}-only layer")
    return flux1 or flux2


def _family(reading: _Reading) -> tuple[str | None, str]:
    """The family the LoRA was made for (None when its names and shapes fit both), refusing a mix."""
    evidence = reading.family_evidence
    if len(evidence) > 1:
        raise LoRAFormatError(
            f"{reading.path}: the file mixes Flux.1 and Flux.2 layers ({evidence[architecture.FLUX1]}; "
            f"{evidence[architecture.FLUX2]}); a LoRA is made for one model. Use the file made for your model."
        )
    for family, why in evidence.items():
        return family, why
    return None, ""


def _factors_by_kind(
    path: Path, module: str, parts: _Parts
) -> dict[type[Adapter], tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """Adapter kind -> (factor name -> tensor, factor name -> key); refuses a factor given twice."""
    kinds: dict[type[Adapter] | None, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    for suffix, (key, tensor) in parts.items():
        kind, name = SUFFIXES[suffix]
        factors, names = kinds.setdefault(kind, ({}, {}))
        if name in names:
            raise LoRAFormatError(
                f"{path}: {names[name]!r} and {key!r} are the same factor of {module!r} under two "
                "naming schemes; the file mixes two copies of a LoRA. Remove one set of keys."
            )
        if suffix != "alpha":
            check_factor(path, key, tensor)
        factors[name] = tensor
        names[name] = key
    kinds.pop(None, None)
    return kinds


def _build(
    reading: _Reading,
    module: str,
    kind: type[Adapter],
    factors: dict[str, torch.Tensor],
    names: dict[str, str],
    alpha: float | None,
) -> Adapter:
    """One adapter; a LoRA without alpha takes PEFT's alpha from the header, else scale 1."""
    adapter = kind.from_file(reading.path, module, factors, names, alpha)
    if kind is LoRA and alpha is None:
        if module in reading.peft_pattern:
            adapter.scale = reading.peft_pattern[module] / adapter.rank
        elif reading.peft_scale is not None:
            adapter.scale = reading.peft_scale
        else:
            reading.no_alpha.append(module)
    return adapter


def _add(
    reading: _Reading,
    module: str,
    resolved: Resolved,
    adapter: Adapter,
    alpha: float | None,
    dora: tuple[str, torch.Tensor] | None,
    keys: list[str],
) -> None:
    """Place one adapter at its rows (wrapping it in DoRA, or splitting kohya's split_qkv) and record it."""
    placed = _place(adapter, resolved)
    if placed is None:
        for k in keys:
            reading.coverage.unmapped[k] = (
                f"{adapter.kind} on {module!r} needs a scale/shift row swap, supported for LoRA and diff only"
            )
        return
    adapters = [placed]
    if dora is not None and placed.target == "weight":
        source_keys = placed.source_keys + (dora[0],)
        adapters = [DoRA(placed, dora[1], source_keys=source_keys, scale=1.0, row_offset=placed.row_offset)]
    elif (
        isinstance(placed, LoRA)
        and resolved.scheme in ("kohya", "lycoris")
        and not reading.legacy_split_qkv
        and reading.split_flag is not False
    ):
        adapters = fix_split_qkv(placed, module, resolved, alpha, reading.split_flag, reading.path, reading.coverage)
    target = f"{resolved.module}.{placed.target}"
    rows, cols = placed.shape
    whole = resolved.slot is None and placed.row_offset == 0
    family = lora_module_family(resolved.module, rows, cols, whole)
    if family is not None:
        reading.family_evidence.setdefault(family, f"{keys[0]!r} makes a {rows}x{cols} change to {resolved.module}")
    reading.targets.setdefault(target, []).extend(adapters)
    for k in keys:
        reading.coverage.mapped[k] = target


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


def _place(adapter: Adapter, resolved: Resolved) -> Adapter | None:
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


def _check_targets(reading: _Reading, tensors: dict[str, torch.Tensor]) -> None:
    """The whole file: something applies to Flux, no two adapters on the same rows, every factor valid."""
    if reading.no_alpha and reading.targets:
        reading.coverage.notes.append(
            f"{len(reading.no_alpha)} LoRA module(s) have no alpha (e.g. {reading.no_alpha[0]!r}); applied with "
            "scale 1 (alpha = rank), as for files that fold alpha into the factors"
        )
    _check_overlaps(reading.path, reading.targets)
    if not reading.targets:
        what = _guess_architecture(list(tensors))
        raise LoRAFormatError(
            f"{reading.path}: nothing in this file applies to Flux: it looks like {what} "
            f"({len(tensors)} keys, e.g. {next(iter(tensors), '(none)')!r}). Use a Flux LoRA."
        )
    for adapters in reading.targets.values():
        for a in adapters:
            a.validate(reading.path)


def _warn_unmapped(reading: _Reading, max_unmapped_fraction: float | None) -> None:
    """Warn about diffusion-model keys not applied; refuse the file over `max_unmapped_fraction`."""
    coverage = reading.coverage
    if not coverage.unmapped:
        return
    n_model_keys = len(coverage.mapped) + len(coverage.unmapped)
    fraction = len(coverage.unmapped) / max(n_model_keys, 1)
    examples = ", ".join(list(coverage.unmapped)[:3])
    message = (
        f"{reading.path}: {len(coverage.unmapped)} of {n_model_keys} diffusion-model keys were not applied "
        f"(e.g. {examples}); see the coverage report."
    )
    if max_unmapped_fraction is not None and fraction > max_unmapped_fraction:
        raise LoRAFormatError(message + f" That is over the allowed {max_unmapped_fraction:.0%}.")
    warnings.warn(message, LoRAFormatWarning, stacklevel=3)  # the caller of load_lora


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
