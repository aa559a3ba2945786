"""Parameter counts of the models that run beside Flux (text encoders, VAE), from their configs.

Which text encoder a Flux model needs follows from its architecture: `txt_in` reads the encoder's
hidden state (T5-XXL's 4096 for Flux.1 and Chroma); Flux.2 stacks three hidden states of its language
model, so `txt_in` reads 3 x that model's width (Mistral Small 3.1: 5120, Qwen3-4B: 2560, Qwen3-8B: 4096).
Sizes are those ComfyUI loads (comfy/text_encoders/llama.py, flux.py in 0.33): the language model
without a vision tower, with an output head only where the checkpoint has an untied one.
"""

from __future__ import annotations

from dataclasses import dataclass


def t5_xxl_encoder_params(
    vocab: int = 32128,
    d_model: int = 4096,
    d_ff: int = 10240,
    layers: int = 24,
    heads: int = 64,
    d_kv: int = 64,
    buckets: int = 32,
) -> int:
    """T5 v1.1 XXL encoder (gated-GELU FF, no biases, relative position bias in layer 0)."""
    attention = 4 * d_model * heads * d_kv
    feed_forward = 3 * d_model * d_ff
    norms = 2 * d_model
    return vocab * d_model + layers * (attention + feed_forward + norms) + buckets * heads + d_model


def t5_xxl_bf16_resident_params(vocab: int = 32128, d_model: int = 4096, layers: int = 24) -> int:
    """Parameters kohya keeps in bf16 when T5 is stored in fp8: the embedding and the layer norms."""
    return vocab * d_model + (2 * layers + 1) * d_model


def clip_l_text_params(
    vocab: int = 49408, positions: int = 77, width: int = 768, layers: int = 12, mlp: int = 3072
) -> int:
    """CLIP ViT-L/14 text tower with its projection, as ComfyUI loads it."""
    per_layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return (vocab + positions) * width + layers * per_layer + 2 * width + width * width


def flux_ae_params(
    ch: int = 128,
    ch_mult: tuple[int, ...] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    z_channels: int = 16,
    io_channels: int = 3,
) -> int:
    """The Flux autoencoder (encoder + decoder)."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def res(cin: int, cout: int) -> int:
        shortcut = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + shortcut

    def mid(c: int) -> int:
        return 2 * res(c, c) + 2 * c + 4 * conv(c, c, 1)

    n = conv(io_channels, ch, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n += res(block_in, ch * m)
            block_in = ch * m
        if i != len(ch_mult) - 1:
            n += conv(block_in, block_in, 3)
    n += mid(block_in) + 2 * block_in + conv(block_in, 2 * z_channels, 3)
    block_in = ch * ch_mult[-1]
    n += conv(z_channels, block_in, 3) + mid(block_in)
    for i in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n += res(block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            n += conv(block_in, block_in, 3)
    return n + 2 * block_in + conv(block_in, io_channels, 3)


def decoder_lm_params(
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    qk_norm: bool = False,
    lm_head: bool = False,
) -> int:
    """A Llama-style decoder (Mistral, Qwen3): grouped-query attention, gated SiLU MLP, RMSNorms, no biases."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    norms = 2 * hidden + (2 * head_dim if qk_norm else 0)
    per_layer = attention + 3 * hidden * intermediate + norms
    return vocab * hidden * (2 if lm_head else 1) + layers * per_layer + hidden


def decoder_lm_bf16_in_fp8(vocab: int, hidden: int, layers: int, head_dim: int, *, qk_norm: bool = False) -> int:
    """Parameters an fp8 text-encoder file keeps in bf16: the embedding and the norms (every Linear is fp8)."""
    return vocab * hidden + layers * (2 * hidden + (2 * head_dim if qk_norm else 0)) + hidden


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder's size: all parameters, and those that stay bf16 when it is stored in fp8."""

    name: str
    short: str
    params: int
    bf16_in_fp8: int

    def bytes(self, storage: str) -> int:
        """Bytes on the GPU stored as `storage` ("bf16" or "fp8"; fp8 keeps the embedding and norms bf16)."""
        if storage == "fp8":
            return (self.params - self.bf16_in_fp8) + 2 * self.bf16_in_fp8
        return 2 * self.params


def _qwen3(name: str, hidden: int, intermediate: int, lm_head: bool) -> TextEncoder:
    params = decoder_lm_params(151936, hidden, intermediate, 36, 32, 8, 128, qk_norm=True, lm_head=lm_head)
    keep = decoder_lm_bf16_in_fp8(151936, hidden, 36, 128, qk_norm=True)
    return TextEncoder(name, "Qwen3", params, keep)


T5_XXL = TextEncoder("T5-XXL", "T5", t5_xxl_encoder_params(), t5_xxl_bf16_resident_params())
MISTRAL_SMALL_3_1 = TextEncoder(
    "Mistral Small 3.1 24B (language model)",
    "Mistral",
    decoder_lm_params(131072, 5120, 32768, 40, 32, 8, 128),
    decoder_lm_bf16_in_fp8(131072, 5120, 40, 128),
)
QWEN3_4B = _qwen3("Qwen3-4B", 2560, 9728, lm_head=False)  # tied embedding: no separate output head
QWEN3_8B = _qwen3("Qwen3-8B", 4096, 12288, lm_head=True)

#: The text encoder by the width `txt_in` reads (Flux.2: three stacked hidden states of its LLM).
TEXT_ENCODER_BY_CONTEXT = {4096: T5_XXL, 3 * 5120: MISTRAL_SMALL_3_1, 3 * 2560: QWEN3_4B, 3 * 4096: QWEN3_8B}
#: Flux.1's pooled-vector input width (CLIP-L); Chroma and Flux.2 have no vector_in.
CLIP_L_WIDTH = 768


def text_encoder_for(context_dim: int) -> TextEncoder | None:
    """The text encoder feeding a `txt_in` of this width, None when no known one does."""
    return TEXT_ENCODER_BY_CONTEXT.get(context_dim)


def vae_params(in_channels: int) -> int:
    """The family's autoencoder: Flux packs 2x2 latent patches, so the latent has in_channels / 4 channels
    (Flux.1 and Chroma 16, Flux.2 32)."""
    return flux_ae_params(z_channels=in_channels // 4)
