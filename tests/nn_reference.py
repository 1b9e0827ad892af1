"""Plain-PyTorch twins of the flowkern networks (torch.nn layers, F ops, explicit softmax attention), with the same
parameter names, so `twin.load_state_dict(flowkern_model.state_dict())` loads the same weights. Test oracles only."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_pair_embedding(t, s, dim, *, mode="ts", time_scale=1000.0, max_period=10000.0):
    """[cos fτ₀, sin fτ₀, cos fτ₁, sin fτ₁], τ = (t, s) or (t, t − s), f_k = time_scale·max_period^(−k/half)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=t.device)
    f = (time_scale * torch.exp(-math.log(max_period) * k / half)).to(t.dtype)
    taus = (t, s) if mode == "ts" else (t, t - s)
    return torch.cat([fn(tau[:, None] * f) for tau in taus for fn in (torch.cos, torch.sin)], dim=-1)


def modulate(x, shift, scale, eps=1e-6):
    if shift.dim() < x.dim():
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def randomize(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Every parameter ~ N(0, std²) (zero-initialised layers would make the comparison trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
    return model


class TimeMLP(nn.Module):
    def __init__(self, freq_dim, out_dim, mode, time_scale):
        super().__init__()
        self.freq_dim, self.mode, self.time_scale = freq_dim, mode, time_scale
        self.fc1 = nn.Linear(2 * freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t, s):
        e = time_pair_embedding(t, s, self.freq_dim, mode=self.mode, time_scale=self.time_scale)
        return self.fc2(F.silu(self.fc1(e.to(self.fc1.weight.dtype))))


class Ada(nn.Module):
    def __init__(self, cond_dim, dim, chunks):
        super().__init__()
        self.chunks = chunks
        self.proj = nn.Linear(cond_dim, chunks * dim)

    def forward(self, c):
        return self.proj(F.silu(c)).chunk(self.chunks, dim=-1)


class MLPBlock(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.ada = Ada(hidden, hidden, 3)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h, c):
        shift, scale, gate = self.ada(c)
        return h + gate * self.fc2(F.silu(self.fc1(modulate(h, shift, scale))))


class PlainMLPFlowMap(nn.Module):
    """Twin of `flowkern.nn.MLPFlowMap` (no dropout)."""

    def __init__(self, dim, hidden=256, depth=4, time_dim=64, time_mode="ts", divergence_head=False,
                 time_scale=1000.0):
        super().__init__()
        self.time = TimeMLP(time_dim, hidden, time_mode, time_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(depth))
        self.final_ada = Ada(hidden, hidden, 2)
        self.out = nn.Linear(hidden, dim)
        self.div = nn.Linear(hidden, 1) if divergence_head else None

    def forward(self, x, t, s):
        c = self.time(t, s)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        h = modulate(h, *self.final_ada(c))
        u = self.out(h)
        return u if self.div is None else (u, self.div(h).squeeze(-1))


def softmax_attention(q, k, v):
    """softmax(q kᵀ/√d) v, written out (differentiable in both modes)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def sdpa_attention(q, k, v):
    """`F.scaled_dot_product_attention` (the benchmark forces its math backend: the only one with a JVP rule)."""
    return F.scaled_dot_product_attention(q, k, v)


class PlainAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm, attend):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, d))


class PlainDiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm, attend):
        super().__init__()
        self.ada = Ada(dim, dim, 6)
        self.attn = PlainAttention(dim, heads, qk_norm, attend)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, c):
        b1, a1, g1, b2, a2, g2 = self.ada(c)
        x = x + g1.unsqueeze(1) * self.attn(modulate(x, b1, a1))
        mlp = self.fc2(F.gelu(self.fc1(modulate(x, b2, a2)), approximate="tanh"))
        return x + g2.unsqueeze(1) * mlp


class PlainDiT(nn.Module):
    """Twin of `flowkern.nn.DiT` (torch.nn layers, explicit patchify by reshapes, F ops, `attend` for attention)."""

    def __init__(self, model, attend=softmax_attention):
        """Built with the hyper-parameters of the flowkern `model` (load its state dict afterwards)."""
        super().__init__()
        block = model.blocks[0]
        dim, heads = model.patch_embed.out_features, block.attn.heads
        self.patch, self.in_ch, self.out_ch, self.img_size = model.patch, model.in_ch, model.out_ch, model.img_size
        self.num_classes = model.num_classes
        self.patch_embed = nn.Linear(model.patch_embed.in_features, dim)
        self.register_buffer("pos_embed", torch.zeros_like(model.pos_embed))
        tm = model.time
        self.time = TimeMLP(tm.freq_dim, dim, tm.mode, tm.time_scale)
        self.label_embed = nn.Embedding(self.num_classes + 1, dim) if self.num_classes else None
        self.blocks = nn.ModuleList(PlainDiTBlock(dim, heads, block.fc1.out_features / dim, model.qk_norm, attend)
                                    for _ in model.blocks)
        self.final_ada = Ada(dim, dim, 2)
        self.out = nn.Linear(dim, model.out.out_features)

    def forward(self, x, t, s, y=None):
        b, c, h, w = x.shape
        p = self.patch
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        tokens = self.patch_embed(tokens) + self.pos_embed.to(x.dtype)
        cond = self.time(t, s)
        if self.label_embed is not None:
            y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device) if y is None else y
            cond = cond + self.label_embed(y)
        for block in self.blocks:
            tokens = block(tokens, cond)
        tokens = self.out(modulate(tokens, *self.final_ada(cond)))
        out = tokens.reshape(b, h // p, w // p, self.out_ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, self.out_ch, h, w)
