"""Two-time conditioning: sinusoidal embedding of (t, s) or (t, t − s) in float32, then an MLP (DiT's
TimestepEmbedder for a time pair)."""
from __future__ import annotations

import torch

from flowkern import ops
from flowkern._validate import check_finite_scalar, check_int
from flowkern.nn._cast import autocast_dtype
from flowkern.nn.layers import Linear, SiLU

TIME_MODES = ("ts", "t_delta")


class TimePairEmbedding(torch.nn.Module):
    """c = W₂·silu(W₁·E(t, s) + b₁) + b₂, E = `flowkern.ops.time_embedding(t, s, freq_dim)` ([B, 2·freq_dim]).

    E is computed in float32 whatever the autocast (float64 when a time is float64); it enters the MLP in the
    MLP's parameter dtype (the autocast dtype under autocast). mode: 'ts' embeds (t, s), 't_delta' (t, t − s).
    time_scale multiplies the times before the sinusoids (1000 for t ∈ [0, 1], as DiT's timesteps).
    """

    def __init__(self, freq_dim: int, out_dim: int, *, mode: str = "ts", time_scale: float = 1000.0,
                 max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = check_int("time_dim", freq_dim, minimum=2)
        if self.freq_dim % 2:
            raise ValueError(f"time_dim must be even (cos and sin halves), got {freq_dim}")
        if mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {mode!r}")
        self.mode = mode
        self.time_scale = check_finite_scalar("time_scale", time_scale, positive=True)
        self.max_period = check_finite_scalar("max_period", max_period, positive=True)
        self.fc1 = Linear(2 * self.freq_dim, out_dim)
        self.act = SiLU()
        self.fc2 = Linear(out_dim, out_dim)
        torch.nn.init.normal_(self.fc1.weight, std=0.02)
        torch.nn.init.normal_(self.fc2.weight, std=0.02)

    def forward(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        e = ops.time_embedding(t, s, self.freq_dim, mode=self.mode, max_period=self.max_period,
                               time_scale=self.time_scale)
        if autocast_dtype(e) is None:
            e = e.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(e)))

    def extra_repr(self) -> str:
        return f"time_dim={self.freq_dim}, mode={self.mode!r}, time_scale={self.time_scale}"
