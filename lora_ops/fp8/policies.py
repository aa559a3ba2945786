"""Layer policies: which Flux Linear weights are stored in fp8, and what a checkpoint then weighs.

What stays bf16 was decided by output error per byte saved (bench/fp8_policy_error.py, BENCHMARKS.md):
the first and last Linears (img_in, final_layer) and the timestep / guidance embedders put their rounding
error straight into the output for almost no bytes, and Flux.2's shared modulation (one Linear steering
every block) costs 15-43 times the error per byte of the block Linears, so every preset but `all`
keeps them bf16. Flux.1's per-block modulation is 3.2 B parameters: `default` stores it in fp8, `quality`
keeps it bf16. Flux.2 and Chroma have no per-block modulation, so there `quality` equals `default`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import LoRAOpsError
from ..flux import (
    FLUX2_SHARED_MODULATIONS,
    FluxShape,
    flux_weight_shapes,
    is_block_linear,
    is_modulation,
    strip_model_prefix,
)

#: Linears outside the blocks (embedders, final layer, Flux.2's shared modulation, Chroma's modulation
#: network), by their first name component.
OUTSIDE_LINEARS = (
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    *FLUX2_SHARED_MODULATIONS,
    "distilled_guidance_layer",
)


@dataclass(frozen=True)
class FP8Policy:
    """Which Linear weights are stored in fp8 (every other tensor keeps its 16-bit dtype)."""

    name: str
    modulation: bool
    outside_blocks: bool
    description: str

    def selects(self, key: str, shape: Sequence[int] | None = None) -> bool:
        """True if the weight `key` (any prefix) goes to fp8 under this policy."""
        name = strip_model_prefix(key)[1]
        if not name.endswith(".weight") or (shape is not None and len(shape) != 2):
            return False
        if is_block_linear(name):
            return self.modulation or not is_modulation(name)
        return self.outside_blocks and name.split(".", 1)[0] in OUTSIDE_LINEARS


PRESETS: dict[str, FP8Policy] = {
    "default": FP8Policy(
        "default",
        True,
        False,
        "every Linear weight of double and single blocks (attention, MLP, Flux.1's per-block modulation) in fp8; "
        "embedders, final_layer, Flux.2's shared modulation, norms and biases bf16",
    ),
    "quality": FP8Policy(
        "quality",
        False,
        False,
        "like default, but Flux.1's per-block modulation Linears (_mod.lin, modulation.lin) stay bf16 too (for "
        "Flux.2 and Chroma, which have none, the same as default)",
    ),
    "all": FP8Policy(
        "all",
        True,
        True,
        "every Linear weight in fp8 (embedders, final_layer, Flux.2's shared modulation too); norms and biases "
        "bf16. Use for ComfyUI 0.3.x, whose scaled-fp8 loader makes every Linear fp8 anyway",
    ),
}


def get_policy(policy: str | FP8Policy) -> FP8Policy:
    if isinstance(policy, FP8Policy):
        return policy
    try:
        return PRESETS[policy]
    except KeyError:
        raise LoRAOpsError(f"unknown fp8 policy {policy!r}; presets: {', '.join(PRESETS)}") from None


def fp8_keys(shapes: Mapping[str, Sequence[int]], policy: str | FP8Policy = "default") -> list[str]:
    """The weight keys a policy stores in fp8."""
    pol = get_policy(policy)
    return [k for k, s in shapes.items() if pol.selects(k, s)]


@dataclass(frozen=True)
class FP8Size:
    """Bytes of a checkpoint's tensors under a policy (header not included)."""

    policy: str
    fp8_tensors: int
    fp8_bytes: int
    other_bytes: int
    scale_bytes: int
    marker_bytes: int
    bf16_bytes: int  # the same model all in bf16

    @property
    def total(self) -> int:
        return self.fp8_bytes + self.other_bytes + self.scale_bytes + self.marker_bytes

    @property
    def ratio(self) -> float:
        return self.total / self.bf16_bytes


def policy_size(
    shape: FluxShape, policy: str | FP8Policy = "default", *, other_itemsize: int = 2, fp8_matmul: bool = False
) -> FP8Size:
    """Tensor bytes of a Flux checkpoint of `shape` written with `policy` (other tensors `other_itemsize`)."""
    pol = get_policy(policy)
    fp8 = other = n = total = 0
    for name, dims in flux_weight_shapes(shape).items():
        numel = math.prod(dims)
        total += numel * 2
        if pol.selects(name, dims):
            fp8 += numel
            n += 1
        else:
            other += numel * other_itemsize
    return FP8Size(pol.name, n, fp8, other, 4 * n, 0 if fp8_matmul else 2, total)


def preset_sizes(shape: FluxShape) -> dict[str, FP8Size]:
    return {name: policy_size(shape, name) for name in PRESETS}
