"""TrigFlow coordinates (Lu & Song, 2024) on flowkern's path, and the pieces sCT and sCD share.

TrigFlow's state is x_t = cos t·x₀ + sin t·z, z ~ N(0, σ_d²I), t ∈ [0, π/2]. flowkern's x_τ = (1 − τ)·x₀ + τ·ε
(docs/conventions.md) is the same point of the same path, rescaled (z = σ_d·ε):

    x_t = α(t)·x_τ,   α(t) = cos t + σ_d·sin t,   τ(t) = σ_d·sin t/α(t),   t(τ) = atan2(τ, σ_d·(1 − τ)),

i.e. tan t = σ/σ_d with EDM's σ = τ/(1 − τ). Along the path, cos t·sin t·dτ/dt = τ·(1 − τ).

The network. F_θ(x_t/σ_d, t) is the flowkern network net(x_t/σ_d, τ(t), 0): it receives flowkern times τ ∈ [0, 1]
in float32 (unscaled; s = 0, the data end, as for the other consistency models). The consistency function is

    f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t)          (f_θ(x, 0) = x exactly),

and σ_d·F_θ is TrigFlow's velocity dx_t/dt for a diffusion model. The JVP along the trajectory,
cos t·sin t·dF_θ/dt, is one forward-mode pass of the network at (x_t/σ_d, τ, 0) along
(cos t·sin t·(dx_t/dt)/σ_d, τ·(1 − τ), 0).

A flowkern velocity teacher v(x_τ, τ) (`flowkern train fm`) is a TrigFlow velocity through the chain rule
(x_t = α·x_τ, dα/dt = σ_d·cos t − sin t, dτ/dt = σ_d/α²):

    dx_t/dt = (σ_d·cos t − sin t)·x_t/α + (σ_d/α)·v(x_t/α, τ(t)).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowkern import ops
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_int
from flowkern.methods.coupling import DEFAULT_BLOCK, check_coupling, couple
from flowkern.methods.edm import SIGMA_MAX, check_sample_args, col
from flowkern.nn.forward_mode import jvp

T_MAX_SIGMA = SIGMA_MAX          # the samplers start at t_max = arctan(σ_max/σ_d), σ_max = 80 (as EDM's grid)
MID_T = 1.1                      # the paper's intermediate time of its 2-step sampler


# ----------------------------------------------------------------------------------------------------- coordinates


def scale(t: Tensor, sigma_data: float) -> Tensor:
    """α(t) = cos t + σ_d·sin t, with x_t (TrigFlow) = α·x_τ (flowkern)."""
    return torch.cos(t) + sigma_data * torch.sin(t)


def network_time(t: Tensor, sigma_data: float) -> Tensor:
    """flowkern time τ(t) = σ_d·sin t/(cos t + σ_d·sin t) ∈ [0, 1] (τ(0) = 0, τ(π/2) = 1)."""
    return sigma_data * torch.sin(t) / scale(t, sigma_data)


def trig_time(tau: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow time t(τ) = atan2(τ, σ_d·(1 − τ)), the inverse of `network_time`."""
    return torch.atan2(tau, sigma_data * (1 - tau))


def t_max(sigma_data: float) -> float:
    """The samplers' first time arctan(σ_max/σ_d) (σ_max = 80): x_{t_max} is taken to be σ_d·noise."""
    return math.atan(T_MAX_SIGMA / sigma_data)


def training_times(batch: int, p_mean: float, p_std: float, sigma_data: float, device) -> Tensor:
    """t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²): [B] float32 in (0, π/2)."""
    tau = p_mean + p_std * torch.randn(batch, device=device, dtype=torch.float64)
    return torch.atan(torch.exp(tau) / sigma_data).float()


# ----------------------------------------------------------------------------------------------------- the network


def _times(t: Tensor, x: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(τ(t), zeros) in x's accumulation dtype, the network's (t, s)."""
    tau = network_time(t.to(accumulation_dtype(x.dtype)), sigma_data)
    return tau, torch.zeros_like(tau)


def _as_output(raw, x: Tensor) -> Tensor:
    if not isinstance(raw, Tensor) or raw.shape != x.shape:
        got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        raise ValueError(f"the network must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
    return raw.to(accumulation_dtype(x.dtype))


def network_output(net: Callable, x: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """F_θ(x_t/σ_d, t) = net(x_t/σ_d, τ(t), 0), float32 (float64 for float64 x)."""
    tau, zero = _times(t, x, sigma_data)
    return _as_output(net((x / sigma_data).to(x.dtype), tau, zero), x)


def network_jvp(net: Callable, x: Tensor, t: Tensor, dx_dt: Tensor, sigma_data: float, *,
                grad: bool = False) -> tuple[Tensor, Tensor]:
    """(F_θ(x_t/σ_d, t), cos t·sin t·dF_θ/dt) along dx_t/dt, from one forward-mode pass (`flowkern.jvp`).

    grad=False: both detached (the stop-gradient pass; `net` should be the raw model, the RNG state is restored so
    a following grad pass draws the same dropout masks). grad=True: F_θ carries the graph through `net` (the
    DDP-wrapped model under DDP), the tangent is detached. Both float32 (float64 for float64 x)."""
    acc = accumulation_dtype(x.dtype)
    t = t.to(acc)
    tau, zero = _times(t, x, sigma_data)
    cs = torch.cos(t) * torch.sin(t)
    primals = ((x / sigma_data).to(x.dtype), tau, zero)
    tangents = ((col(cs, x) * dx_dt.to(acc) / sigma_data).to(x.dtype), tau * (1 - tau), torch.zeros_like(zero))
    out, out_t = jvp(net, primals, tangents, grad=grad)
    return _as_output(out, x), _as_output(out_t, x)


def consistency_function(net: Callable, x: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t) (float32; float64 for float64 x)."""
    t = t.to(accumulation_dtype(x.dtype))
    return col(torch.cos(t), x) * x.to(t.dtype) - col(torch.sin(t) * sigma_data, x) * network_output(
        net, x, t, sigma_data)


def teacher_velocity(teacher: Callable, x: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow's dx_t/dt from a flowkern velocity teacher(x, τ, τ) (module docstring): (σ_d·cos t − sin t)·x_t/α
    + (σ_d/α)·v(x_t/α, τ(t)). Float32 (float64 for float64 x), no graph."""
    acc = accumulation_dtype(x.dtype)
    t = t.to(acc)
    a = scale(t, sigma_data)
    x_flowkern = x.to(acc) / col(a, x)
    tau = network_time(t, sigma_data)
    with torch.no_grad():
        v = _as_output(teacher(x_flowkern.to(x.dtype), tau, tau), x)
    return col(sigma_data * torch.cos(t) - torch.sin(t), x) * x_flowkern + col(sigma_data / a, x) * v


# ----------------------------------------------------------------------------------------------------- weighting


class AdaptiveWeight(nn.Module):
    """The learned adaptive weight w_φ(t): a linear layer on a sinusoidal embedding of the network time τ(t)
    (`flowkern.ops.time_embedding`, float32), zero at initialisation (weight e^{−w} = 1)."""

    def __init__(self, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = check_int("freq_dim", freq_dim, minimum=2)
        self.linear = nn.Linear(self.freq_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tau: Tensor) -> Tensor:
        """w [B] float32 for network times τ [B] (autocast off: the weight is part of the float32 loss)."""
        device_type = tau.device.type
        with torch.autocast(device_type, enabled=False):
            e = ops.time_embedding(tau.float(), tau.float(), self.freq_dim, time_scale=1000.0)[:, :self.freq_dim]
            return self.linear(e.to(self.linear.weight.dtype)).squeeze(1).float()


# ----------------------------------------------------------------------------------------------------- sampling


def sampling_times(steps: int, sigma_data: float, mid_t: float = MID_T) -> list[float]:
    """The times t_0 = t_max > t_1 > … > t_{steps−1} > 0 of a `steps`-step sampler: t_max, then `mid_t` (the
    paper's 1.1 for 2 steps), then evenly spaced from mid_t towards 0: t_i = mid_t·(steps − i)/(steps − 1)."""
    steps = check_int("steps", steps, minimum=1)
    return [t_max(sigma_data)] + [mid_t * (steps - i) / (steps - 1) for i in range(1, steps)]


def trigflow_sample(model: Callable, noise: Tensor, steps: int, sigma_data: float, mid_t: float = MID_T,
                    generator: torch.Generator | None = None, renoise: str = "independent",
                    coupling_block: int = DEFAULT_BLOCK) -> Tensor:
    """Multistep consistency sampling in TrigFlow, from flowkern noise (t = 1) to data (t = 0): x = σ_d·noise at
    t_max, x̂₀ = f_θ(x, t_max); for each later time t_i of `sampling_times`: x = cos t_i·x̂₀ + sin t_i·z (fresh
    z ~ N(0, σ_d²I), paired with x̂₀ by `renoise`, the coupling the model was trained with: 'independent' or 'ot',
    see `flowkern.methods.coupling`), x̂₀ = f_θ(x, t_i). Returns x̂₀ in the dtype of noise."""
    steps = check_sample_args(model, noise, steps)
    renoise = check_coupling(renoise)
    acc = accumulation_dtype(noise.dtype)
    batch = noise.shape[0]
    times = sampling_times(steps, sigma_data, mid_t)
    with torch.no_grad():
        x = noise.to(acc) * sigma_data
        x0 = None
        for i, t in enumerate(times):
            if i:
                z = torch.randn(noise.shape, dtype=acc, device=noise.device, generator=generator) * sigma_data
                z = couple(x0, z, renoise, coupling_block, generator, scale=sigma_data)
                x = math.cos(t) * x0 + math.sin(t) * z
            x0 = consistency_function(model, x.to(noise.dtype), torch.full((batch,), t, dtype=acc,
                                                                              device=noise.device), sigma_data)
    return x0.to(noise.dtype)
