"""Per-block LoRA strengths: one small grammar, turned into a strength multiplier per target weight.

A block spec is comma-separated `SELECTOR=VALUE` rules; later rules override earlier ones.
Selectors: `*` (every weight, including those outside blocks), `double`, `single`, `double.3`,
`single.10-20`. A rule may also be a preset name (see BLOCK_PRESETS), which expands in place. The value
multiplies the LoRA's strength on every weight of the selected blocks; weights outside the blocks
(embedders, final layer, Flux.2's shared modulation) follow `*`.

Block counts come from the model (Flux.1: 19 double + 38 single; Flux.2 and klein their own), so an
out-of-range block is an error that names the model's range. The result is a per-target scale on
the canonical `LoRAFile`, so the one merge engine applies it and a spec change re-merges only the
weights whose multiplier changed, in one pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .errors import LoRAOpsError
from .flux import strip_model_prefix
from .formats import LoRAFile

#: Block families and the BFL weight-name prefix of each.
BLOCK_PREFIXES = {"double": "double_blocks.", "single": "single_blocks."}

#: Named starting points, as functions of the model's block counts (double, single).
BLOCK_PRESETS: dict[str, Callable[[int, int], str]] = {
    "all": lambda d, s: "*=1",
    "double only": lambda d, s: "*=0, double=1",
    "single only": lambda d, s: "*=0, single=1",
    "style: late single blocks": lambda d, s: f"*=0, single.{s // 2}-{s - 1}=1",
    "structure: double and early single blocks": lambda d, s: f"*=1, single.{s // 2}-{s - 1}=0",
}

BLOCK_SPEC_GRAMMAR = (
    "comma-separated SELECTOR=VALUE rules, later ones win; SELECTOR is * (everything, also weights outside "
    "blocks), double, single, double.3 or single.10-20; a rule may also be a preset: "
    + ", ".join(f'"{name}"' for name in BLOCK_PRESETS)
    + '. Example: "*=1, single=0.5, single.30-37=0"'
)

_SELECTOR = re.compile(r"^(double|single)(?:\.(\d+)(?:-(\d+))?)?$")


@dataclass(frozen=True)
class BlockWeights:
    """The multiplier of every block, and `other` for weights outside the blocks."""

    spec: str
    other: float
    blocks: Mapping[str, tuple[float, ...]]  # family -> one multiplier per block index

    def scale_for(self, target: str) -> float:
        """Multiplier for one BFL weight name (`single_blocks.7.linear1.weight` → single block 7)."""
        located = block_of(target)
        if located is None:
            return self.other
        family, index = located
        values = self.blocks.get(family, ())
        return values[index] if index < len(values) else self.other

    @property
    def key(self) -> tuple:
        """Hashable identity of the multipliers (for the nodes' plan token)."""
        return (self.other, tuple(self.blocks.items()))

    @property
    def is_identity(self) -> bool:
        return self.other == 1.0 and all(v == 1.0 for values in self.blocks.values() for v in values)


def block_of(target: str) -> tuple[str, int] | None:
    """(family, index) of the block a BFL weight name belongs to; None outside the blocks."""
    for family, prefix in BLOCK_PREFIXES.items():
        if target.startswith(prefix):
            head = target[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                return family, int(head)
    return None


def block_counts(names: Iterable[str]) -> dict[str, int]:
    """Blocks per family in a model, from its weight names (BFL, with or without a model prefix)."""
    counts = dict.fromkeys(BLOCK_PREFIXES, 0)
    for name in names:
        located = block_of(strip_model_prefix(name)[1])
        if located is not None:
            counts[located[0]] = max(counts[located[0]], located[1] + 1)
    return counts


def _error(spec: str, what: str) -> LoRAOpsError:
    return LoRAOpsError(f"block spec {spec!r}: {what}. Write {BLOCK_SPEC_GRAMMAR}.")


def _value(spec: str, rule: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(spec, f"{text!r} in rule {rule!r} is not a number") from None
    if not math.isfinite(value):
        raise _error(spec, f"{text!r} in rule {rule!r} is not a finite number")
    return value


def _block_range(spec: str, rule: str, selector: str, counts: Mapping[str, int]) -> tuple[str, range]:
    match = _SELECTOR.match(selector)
    if match is None:
        raise _error(spec, f"unknown selector {selector!r} in rule {rule!r}")
    family, first, last = match.group(1), match.group(2), match.group(3)
    count = counts.get(family, 0)
    if first is None:
        return family, range(count)
    lo, hi = int(first), int(last if last is not None else first)
    if lo > hi:
        raise _error(spec, f"range {selector!r} runs backwards; write {family}.{hi}-{lo}")
    if hi >= count:
        have = f"{family} blocks 0-{count - 1}" if count else f"no {family} blocks"
        raise _error(spec, f"{selector!r} is outside this model, which has {have}")
    return family, range(lo, hi + 1)


def _expand(spec: str, counts: Mapping[str, int]) -> list[str]:
    """The spec's rules with presets replaced by their own rules."""
    rules: list[str] = []
    for raw in spec.split(","):
        rule = " ".join(raw.split()).lower()
        if not rule:
            continue
        if "=" in rule:
            rules.append(rule)
        elif rule in BLOCK_PRESETS:
            preset = BLOCK_PRESETS[rule](counts.get("double", 0), counts.get("single", 0))
            rules.extend(r.strip() for r in preset.split(","))
        else:
            raise _error(spec, f"{raw.strip()!r} is neither a SELECTOR=VALUE rule nor a preset")
    return rules


def parse_block_spec(spec: str, counts: Mapping[str, int]) -> BlockWeights:
    """Read a block spec for a model with `counts` = {"double": n, "single": m} blocks.

    An empty spec means every multiplier is 1. Raises LoRAOpsError naming the faulty rule.
    """
    other = 1.0
    values = {family: [1.0] * counts.get(family, 0) for family in BLOCK_PREFIXES}
    for rule in _expand(spec or "", counts):
        selector, _, text = (part.strip() for part in rule.partition("="))
        value = _value(spec, rule, text)
        if selector == "*":
            other = value
            values = {family: [value] * len(v) for family, v in values.items()}
            continue
        family, indices = _block_range(spec, rule, selector, counts)
        for i in indices:
            values[family][i] = value
    return BlockWeights(spec.strip() if spec else "", other, {f: tuple(v) for f, v in values.items()})


def with_block_weights(lora: LoRAFile, weights: BlockWeights) -> LoRAFile:
    """The same LoRA (same adapter objects) with a strength multiplier per target weight.

    Sharing the adapters keeps the merge engine's bookkeeping: a later merge with other block
    weights changes only the weights whose multiplier differs.
    """
    scales = {t: weights.scale_for(t) for t in lora.targets}
    return dataclasses.replace(
        lora, target_scales={t: s for t, s in scales.items() if s != 1.0}, block_spec=weights.spec
    )


def blocks_touched(lora: LoRAFile) -> dict[str, list]:
    """Which blocks (per family) and which weights outside the blocks a LoRA changes."""
    out: dict[str, list] = {family: set() for family in BLOCK_PREFIXES}
    outside: set[str] = set()
    for target in lora.targets:
        located = block_of(target)
        if located is None:
            outside.add(target.rsplit(".", 1)[0])
        else:
            out[located[0]].add(located[1])
    return {**{f: sorted(v) for f, v in out.items()}, "outside": sorted(outside)}


def describe_blocks(lora: LoRAFile) -> str:
    """One line for `inspect`: the blocks a LoRA touches and the weights it changes outside them."""
    touched = blocks_touched(lora)
    parts = [f"{family} {format_ranges(touched[family]) or 'none'}" for family in BLOCK_PREFIXES]
    outside = ", ".join(touched["outside"]) or "none"
    return f"blocks: {'; '.join(parts)}; outside the blocks: {outside}"


def format_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = None
    for i in [*ordered, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)
