"""A minimal Flux forward in the BFL reference structure, over a dict of weights: Flux.1 and Flux.2, with an
optional unmerged LoRA branch run the way kohya's inference scripts run it. The benchmarks measure peak memory
and fp8 error with it, and tests/test_fp8_forward.py checks fp8-merged weights through it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Runtime:
    """How Linears run: plain, or with an unmerged LoRA branch y += s * up(down(x)) (kohya style)."""

    lora: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, int]]] | None = None  # name -> (down, up, s, row0)
    autocast: bool = False  # run the branch under bf16 autocast (fp32 leaf params -> cached bf16 copies)
    device_type: str = "cuda"


#: Flux.2's shared modulations, by the per-block modulation they replace.
FLUX2_SHARED = {
    "img_mod.lin": "double_stream_modulation_img.lin",
    "txt_mod.lin": "double_stream_modulation_txt.lin",
    "modulation.lin": "single_stream_modulation.lin",
}


class Flux:
    """Flux.1 (per-block modulation, GELU MLP) and Flux.2 (shared modulation, gated SiLU MLP, no biases)."""

    def __init__(self, weights: dict[str, torch.Tensor], shape, runtime: Runtime | None = None) -> None:
        self.w = weights
        self.shape = shape
        self.rt = runtime or Runtime()

    # --- pieces ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))
        branches = self.rt.lora.get(name) if self.rt.lora else None
        if branches:
            ctx = (torch.autocast(self.rt.device_type, dtype=torch.bfloat16) if self.rt.autocast
                   else contextlib.nullcontext())
            for down, up, scale, row0 in branches:
                with ctx:
                    branch = F.linear(F.linear(x, down), up)
                y[..., row0 : row0 + branch.shape[-1]].add_(branch.to(y.dtype), alpha=scale)
                del branch
        return y

    def mlp_embedder(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.linear(F.silu(self.linear(x, f"{name}.in_layer")), f"{name}.out_layer")

    def modulation(self, vec: torch.Tensor, name: str, n: int) -> list[torch.Tensor]:
        """A block's modulation; Flux.2 has one shared by all double blocks (img, txt) and one by all single."""
        if not self.shape.block_modulation:
            name = FLUX2_SHARED.get(name.split(".", 2)[-1], name)
        return self.linear(F.silu(vec), name)[:, None, :].chunk(n, dim=-1)

    def mlp_act(self, x: torch.Tensor) -> torch.Tensor:
        """Flux.1: tanh-GELU. Flux.2: gated SiLU over the two halves of the MLP input Linear."""
        if self.shape.gated_mlp:
            gate, value = x.chunk(2, dim=-1)
            return F.silu(gate) * value
        return F.gelu(x, approximate="tanh")

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.w[name + ".scale"]

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    @staticmethod
    def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
        xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
        xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
        xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
        xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
        return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)

    def attention(self, q, k, v, pe):
        q, k = self.apply_rope(q, k, pe)
        x = F.scaled_dot_product_attention(q, k, v)
        b, h, L, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, L, h * d)

    def split_heads(self, qkv: torch.Tensor):
        b, L, _ = qkv.shape
        heads = self.shape.heads
        return qkv.view(b, L, 3, heads, -1).permute(2, 0, 3, 1, 4)  # "B L (K H D) -> K B H L D"

    # --- blocks (locals live until return, as in the reference code) ----------------------------
    def double_block(self, i: int, img, txt, vec, pe):
        p = f"double_blocks.{i}"
        img_mod1_shift, img_mod1_scale, img_mod1_gate, img_mod2_shift, img_mod2_scale, img_mod2_gate = \
            self.modulation(vec, f"{p}.img_mod.lin", 6)
        txt_mod1_shift, txt_mod1_scale, txt_mod1_gate, txt_mod2_shift, txt_mod2_scale, txt_mod2_gate = \
            self.modulation(vec, f"{p}.txt_mod.lin", 6)
        img_modulated = self.layer_norm(img)
        img_modulated = (1 + img_mod1_scale) * img_modulated + img_mod1_shift
        img_qkv = self.linear(img_modulated, f"{p}.img_attn.qkv")
        img_q, img_k, img_v = self.split_heads(img_qkv)
        img_q, img_k = self.rms_norm(img_q, f"{p}.img_attn.norm.query_norm"), \
            self.rms_norm(img_k, f"{p}.img_attn.norm.key_norm")
        txt_modulated = self.layer_norm(txt)
        txt_modulated = (1 + txt_mod1_scale) * txt_modulated + txt_mod1_shift
        txt_qkv = self.linear(txt_modulated, f"{p}.txt_attn.qkv")
        txt_q, txt_k, txt_v = self.split_heads(txt_qkv)
        txt_q, txt_k = self.rms_norm(txt_q, f"{p}.txt_attn.norm.query_norm"), \
            self.rms_norm(txt_k, f"{p}.txt_attn.norm.key_norm")
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = self.attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + img_mod1_gate * self.linear(img_attn, f"{p}.img_attn.proj")
        img = img + img_mod2_gate * self.linear(
            self.mlp_act(self.linear((1 + img_mod2_scale) * self.layer_norm(img) + img_mod2_shift, f"{p}.img_mlp.0")),
            f"{p}.img_mlp.2")
        txt = txt + txt_mod1_gate * self.linear(txt_attn, f"{p}.txt_attn.proj")
        txt = txt + txt_mod2_gate * self.linear(
            self.mlp_act(self.linear((1 + txt_mod2_scale) * self.layer_norm(txt) + txt_mod2_shift, f"{p}.txt_mlp.0")),
            f"{p}.txt_mlp.2")
        return img, txt

    def single_block(self, i: int, x, vec, pe):
        p = f"single_blocks.{i}"
        h = self.shape.hidden
        mod_shift, mod_scale, mod_gate = self.modulation(vec, f"{p}.modulation.lin", 3)
        x_mod = (1 + mod_scale) * self.layer_norm(x) + mod_shift
        qkv, mlp = torch.split(self.linear(x_mod, f"{p}.linear1"), [3 * h, self.shape.mlp_in], dim=-1)
        q, k, v = self.split_heads(qkv)
        q, k = self.rms_norm(q, f"{p}.norm.query_norm"), self.rms_norm(k, f"{p}.norm.key_norm")
        attn = self.attention(q, k, v, pe)
        output = self.linear(torch.cat((attn, self.mlp_act(mlp)), 2), f"{p}.linear2")
        return x + mod_gate * output

    # --- embeddings and the whole model -----------------------------------------------------------
    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000, time_factor: float = 1000.0):
        t = time_factor * t
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t)

    def axes_dim(self) -> list[int]:
        d = self.shape.head_dim
        side = (d * 7 // 16) // 2 * 2
        return [d - 2 * side, side, side]

    def rope(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, dim in enumerate(self.axes_dim()):
            pos = ids[..., i]
            scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
            omega = 1.0 / (10000**scale)
            out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
            out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
            parts.append(out.reshape(*out.shape[:-1], 2, 2).float())
        return torch.cat(parts, dim=-3).unsqueeze(1)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        s = self.shape
        img = self.linear(img, "img_in")
        vec = self.mlp_embedder(self.timestep_embedding(timesteps, s.time_dim), "time_in")
        if s.guidance:
            vec = vec + self.mlp_embedder(self.timestep_embedding(guidance, s.time_dim), "guidance_in")
        if s.vec_dim:
            vec = vec + self.mlp_embedder(y, "vector_in")
        txt = self.linear(txt, "txt_in")
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.rope(ids)
        for i in range(s.depth):
            img, txt = self.double_block(i, img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for i in range(s.depth_single):
            img = self.single_block(i, img, vec, pe)
        img = img[:, txt.shape[1] :, ...]
        shift, scale = self.linear(F.silu(vec), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
        img = (1 + scale[:, None, :]) * self.layer_norm(img) + shift[:, None, :]
        return self.linear(img, "final_layer.linear")


def make_inputs(shape, width: int, height: int, batch: int, text_tokens: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(7)
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    bf16 = torch.bfloat16
    img = torch.randn(batch, h * w, shape.in_channels, generator=gen, device=device, dtype=bf16)
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    img_ids = img_ids.reshape(1, h * w, 3).repeat(batch, 1, 1)
    txt = torch.randn(batch, text_tokens, shape.context_dim, generator=gen, device=device, dtype=bf16)
    txt_ids = torch.zeros(batch, text_tokens, 3, device=device)
    timesteps = torch.full((batch,), 0.5, device=device, dtype=bf16)
    y = torch.randn(batch, shape.vec_dim, generator=gen, device=device, dtype=bf16)
    guidance = torch.full((batch,), 3.5, device=device, dtype=bf16)
    return img, img_ids, txt, txt_ids, timesteps, y, guidance


def unmerged_runtime(lora, device: torch.device) -> tuple[Runtime, list[torch.Tensor]]:
    """kohya's LoRAInfModule: fp32 nn.Linear factors (requires_grad=True) run under bf16 autocast."""
    table: dict[str, list] = {}
    params = []
    for target, adapters in lora.targets.items():
        name = target.removesuffix(".weight")
        for a in adapters:
            down = a.down.to(device, torch.float32).requires_grad_(True)
            up = a.up.to(device, torch.float32).requires_grad_(True)
            params += [down, up]
            table.setdefault(name, []).append((down, up, a.scale, a.row_offset))
    return Runtime(table, autocast=True, device_type=device.type), params
