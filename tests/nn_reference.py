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
