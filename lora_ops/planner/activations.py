"""Activation memory of one Flux forward.

The model (the BFL reference forward, which kohya's flux_models.py copies, in bf16 with a
fused attention kernel): with B = batch x (2 with CFG), T = (h/16)(w/16) + text tokens, H = hidden,
M = mlp hidden and U = B*T*H*2 bytes, the largest live set is inside a single block at RoPE:
the block input x and the modulated x_mod (2U), linear1's output ((3H+M_in)/H U: 7U for Flux.1, where
M_in = M; 9U for Flux.2, whose gated MLP reads M_in = 2M), normed q, k
(2U) and RoPE's fp32 temporaries (q, k as fp32, the rotated q, and two products + their sum for
k: 6 x 2U = 12U), plus the text stream the caller holds (512/T U) and the fp32 RoPE table: about
23.3U = 0.61 GiB at 1024x1024, batch 1. The planner evaluates every such point of both block kinds
(linear1 with an unmerged LoRA's output-sized branch and an fp8 weight's bf16 upcast, the MLP,
linear2) and takes the largest. bench/gpu_suite.py checks it against torch.cuda.max_memory_allocated
on a GPU, and on a tiny shape against the live tensor bytes torch.profiler records on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..flux import FluxShape, flux_weight_shapes

#: Output-sized tensors an unmerged LoRA branch adds at its Linear (y += up(down(x))).
LORA_BRANCH_TRANSIENTS = 1
#: Flux packs 2x2 latent patches of an 8x-downsampling VAE: one token per 16x16 pixels.
PIXELS_PER_TOKEN_SIDE = 16
BF16, FP32 = 2, 4  # bytes per element


def tokens_for(width: int, height: int, text_tokens: int) -> tuple[int, int]:
    side = PIXELS_PER_TOKEN_SIDE
    return math.ceil(height / side) * math.ceil(width / side), text_tokens


@dataclass(frozen=True)
class _Forward:
    """One forward's sizes; `tok` is the bytes of a [B, n, width] activation."""

    shape: FluxShape
    batch: int
    image_tokens: int
    text_tokens: int
    lora_targets: frozenset[str]
    weight_dtype: Mapping[str, torch.dtype]

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def tok(self, n: int, width: int, size: int = BF16) -> int:
        return self.batch * n * width * size

    def rope_table(self) -> int:
        """RoPE table [B, 1, T, head_dim/2, 2, 2] fp32, held by the caller through all blocks."""
        return self.batch * self.tokens * self.shape.head_dim // 2 * 4 * FP32

    def call_extra(self, template: str, rows_tokens: int, out_width: int, blocks: int) -> int:
        """Largest transient at the call of a Linear: LoRA branch output and fp8 -> bf16 weight copy."""
        worst = 0
        for i in range(blocks):
            name = template.format(i=i)
            extra = self.tok(rows_tokens, out_width) * LORA_BRANCH_TRANSIENTS if name in self.lora_targets else 0
            if self.weight_dtype.get(name, torch.bfloat16).itemsize == 1:
                extra += math.prod(flux_weight_shapes_cached(self.shape)[name]) * BF16
            worst = max(worst, extra)
        return worst

    def double_block_points(self) -> dict[str, int]:
        t, ti, h, m, tok = self.tokens, self.image_tokens, self.shape.hidden, self.shape.mlp_hidden, self.tok
        depth, pe, m_in = self.shape.depth, self.rope_table(), self.shape.mlp_in
        # GELU: input + output; gated SiLU (Flux.2): input (gate and value), SiLU(gate), the product
        activation = tok(ti, m_in) + tok(ti, m) * (2 if self.shape.gated_mlp else 1)
        inputs = tok(t, h)  # img + txt, held by the caller during the call
        attn_state = inputs + tok(t, h) + tok(t, 3 * h) + 2 * tok(t, h) + 3 * tok(t, h)  # mod, qkv, q/k, cat qkv
        qkv_call = self.call_extra("double_blocks.{i}.img_attn.qkv.weight", ti, 3 * h, depth)
        mlp_state = attn_state + tok(t, h) + 2 * tok(ti, h)  # attention out, new img, MLP input
        mlp0 = self.call_extra("double_blocks.{i}.img_mlp.0.weight", ti, m_in, depth)
        mlp2 = self.call_extra("double_blocks.{i}.img_mlp.2.weight", ti, h, depth)
        return {
            "double block: img qkv Linear": pe + inputs + tok(ti, h) + tok(ti, 3 * h) + qkv_call,
            "double block: RoPE": pe + attn_state + 6 * tok(t, h, FP32),
            "double block: img MLP": pe + mlp_state + max(tok(ti, m_in) + mlp0, activation),
            "double block: img MLP out": pe + mlp_state + tok(ti, m) + tok(ti, h) + mlp2,
        }

    def single_block_points(self) -> dict[str, int]:
        t, h, m, tok = self.tokens, self.shape.hidden, self.shape.mlp_hidden, self.tok
        depth, pe = self.shape.depth_single, self.rope_table()
        held = tok(t, h) + tok(self.text_tokens, h) + tok(t, h)  # x, caller's txt, x_mod
        lin1 = tok(t, 3 * h + self.shape.mlp_in)
        l1 = self.call_extra("single_blocks.{i}.linear1.weight", t, 3 * h + self.shape.mlp_in, depth)
        attn_out = held + lin1 + 2 * tok(t, h) + tok(t, h)
        l2 = self.call_extra("single_blocks.{i}.linear2.weight", t, h, depth)
        return {
            "single block: linear1": pe + held + lin1 + l1,
            "single block: RoPE": pe + held + lin1 + 2 * tok(t, h) + 6 * tok(t, h, FP32),
            # the activation's output (m) and the cat (h + m); a gated MLP's SiLU(gate) (m) is freed before
            "single block: GELU + cat": pe + attn_out + tok(t, m) + tok(t, h + m),
            "single block: linear2": pe + attn_out + tok(t, h + m) + tok(t, h) + l2,
        }


def activation_points(
    shape: FluxShape,
    image_tokens: int,
    text_tokens: int,
    batch: int,
    *,
    lora_targets: Iterable[str] = (),
    weight_dtype: Mapping[str, torch.dtype] | None = None,
) -> dict[str, int]:
    """Bytes live (beyond weights and resident LoRA) at each candidate peak of one Flux forward.

    Follows the BFL reference forward in bf16 (see the module docstring): a block's Python locals
    stay alive until it returns, RMSNorm and RoPE compute in fp32, attention is a fused kernel.
    `lora_targets`: weights with an unmerged LoRA branch (adds an output-sized tensor at the call);
    `weight_dtype`: a weight stored in fp8 is upcast to a bf16 copy for the call.
    """
    forward = _Forward(shape, batch, image_tokens, text_tokens, frozenset(lora_targets), weight_dtype or {})
    points: dict[str, int] = {}
    if shape.depth:
        points.update(forward.double_block_points())
    if shape.depth_single:
        points.update(forward.single_block_points())
    return points


_SHAPES_CACHE: dict[FluxShape, dict[str, tuple[int, ...]]] = {}


def flux_weight_shapes_cached(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    if shape not in _SHAPES_CACHE:
        _SHAPES_CACHE[shape] = flux_weight_shapes(shape)
    return _SHAPES_CACHE[shape]


ACTIVATION_FORMULA = (
    "peak over the forward's live sets (BFL reference forward, bf16, fused attention); the usual maximum is "
    "single-block RoPE: U*(2 + (3H+M_in)/H + 2 + 12) + B*txt*H*2 + RoPE table, U = B*T*H*2 bytes, "
    "B = batch x (2 with CFG), T = (h/16)(w/16) + text tokens, M_in = M (2M for Flux.2's gated MLP); "
    "checked against a GPU by bench/gpu_suite.py when one is available (Flux.1)"
)
