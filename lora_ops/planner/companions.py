"""Parameter counts of the models that run beside Flux (text encoders, VAE), from their configs."""

from __future__ import annotations


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
