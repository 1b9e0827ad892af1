"""`MLPFlowMap`: an adaLN-zero residual MLP flow map u(x, t, s) for vector data (2-D toys, flattened 8×8 images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flowkern._validate import check_bool, check_finite_scalar, check_int
from flowkern.nn._inputs import check_time, check_x
from flowkern.nn._plain import network_pass
from flowkern.nn.layers import AdaLNModulation, GatedResidual, Linear, Modulate, SiLU
from flowkern.nn.time import TimePairEmbedding


class MLPBlock(torch.nn.Module):
    """h ← h + gate·W₂·drop(silu(W₁·(LN(h)·(1 + scale) + shift))), (shift, scale, gate) = adaLN(c), zero at init."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.ada = AdaLNModulation(hidden, hidden, 3)
        self.norm = Modulate("layer", eps=1e-6)
        self.fc1 = Linear(hidden, hidden)
        self.act = SiLU()
        self.fc2 = Linear(hidden, hidden)
        self.residual = GatedResidual()
        self.dropout = dropout

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c)
        y = self.act(self.fc1(self.norm(h, shift, scale)))
        y = self.fc2(F.dropout(y, self.dropout, self.training))
        return self.residual(h, gate, y)


class MLPFlowMap(torch.nn.Module):
    """A flow map u(x, t, s) for vector data, built only from `flowkern.ops` (Φ = x + (s − t)·u, docs/conventions.md).

        c = MLP(E(t, s))                           E: sinusoidal, float32 (`flowkern.ops.time_embedding`)
        h = W_in·x;  h ← MLPBlock(h, c) × depth    adaLN-zero residual blocks (LayerNorm fused with the modulation)
        u = W_out·(LN(h)·(1 + scale) + shift)      (shift, scale) = adaLN(c); W_out zero-initialised
        D = w_D·(same features)                    divergence_head=True only (F2D2's scalar head), zero-initialised

    At init u = 0 (and D = 0). Arguments: dim (features of x), hidden (width), depth (residual blocks), time_dim
    (sinusoid width per time: E is [B, 2·time_dim]), time_mode ('ts': embed (t, s); 't_delta': (t, t − s)),
    divergence_head, dropout (inside each block, after the activation; see `flowkern.jvp` for identical masks in
    the JVP and grad passes); time_scale (times are multiplied by it before the sinusoids; 1000 for t ∈ [0, 1]).

    forward(x [B, dim], t, s) -> u [B, dim], or (u, D [B]) with divergence_head=True. t, s: float32 (or float64)
    tensors of shape [B], or 0-d tensors / Python numbers broadcast over the batch; float16/bfloat16 or integer
    times raise TypeError. x must have the parameters' dtype (or run under torch.autocast). Works unchanged under
    `torch.func.jvp`, `torch.autograd.forward_ad` and backward.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 64, time_mode: str = "ts",
                 divergence_head: bool = False, dropout: float = 0.0, *, time_scale: float = 1000.0):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        depth = check_int("depth", depth, minimum=1)
        self.divergence_head = check_bool("divergence_head", divergence_head)
        dropout = check_finite_scalar("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.time = TimePairEmbedding(time_dim, hidden, mode=time_mode, time_scale=time_scale)
        self.inp = Linear(self.dim, hidden)
        self.blocks = torch.nn.ModuleList(MLPBlock(hidden, dropout) for _ in range(depth))
        self.final_ada = AdaLNModulation(hidden, hidden, 2)
        self.final_norm = Modulate("layer", eps=1e-6)
        self.out = Linear(hidden, self.dim, zero_init=True)
        self.div = Linear(hidden, 1, zero_init=True) if self.divergence_head else None

    def forward(self, x: torch.Tensor, t, s):
        batch = check_x(x, dtype=self.inp.weight.dtype, trailing=(self.dim,), shape_doc=f"[B, dim] = [B, {self.dim}]")
        t = check_time("t", t, batch, x.device)
        s = check_time("s", s, batch, x.device)
        with network_pass(x, self.inp.weight.dtype):
            c = self.time(t, s)
            h = self.inp(x)
            for block in self.blocks:
                h = block(h, c)
            shift, scale = self.final_ada(c)
            h = self.final_norm(h, shift, scale)
            u = self.out(h)
            if self.div is None:
                return u
            return u, self.div(h).squeeze(-1)
