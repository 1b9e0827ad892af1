"""EDM σ-space helpers shared by the consistency methods (CD, CT, CTM): one place for the maths.

Conventions (docs/conventions.md; the consistency models' maths: docs/methods.md). flowkern's state is
x_t = (1 − t)·x₀ + t·ε (t = 0 data, t = 1 noise). EDM's is y = x₀ + σ·ε. They are the same point of the same
probability path, rescaled:

    y = x_t / (1 − t),   σ = t / (1 − t),   t = σ / (1 + σ),   x_t = y / (1 + σ).

Consistency models keep EDM's σ internally (Karras grid, c_skip/c_out, Heun in σ) and convert at the edges: the
network is a flowkern network ``net(x, t, s)`` that always receives flowkern times t = σ/(1 + σ) ∈ [0, 1) in float32
(no log-σ or ×1000 scaling), and samplers take flowkern noise (t = 1) and return data (t = 0).

* A flowkern velocity teacher v(x, t) = E[ε − x₀ | x_t = x] is an EDM denoiser through x₀ = x_t − t·v:
  D(y, σ) = x_t − t·v(x_t, t) with x_t = y/(1 + σ), t = σ/(1 + σ); the EDM PF-ODE is dy/dσ = (y − D(y, σ))/σ.
* The Euler/DDIM step of that ODE, (σ'/σ)·y + (1 − σ'/σ)·D, is in flowkern coordinates exactly the Euler step
  x_t + (s − t)·v of the flowkern ODE (s = σ'/(1 + σ')), and CTM's jump G(y, σ, σ') = (σ'/σ)·y + (1 − σ'/σ)·g is the
  same map with g in place of D: `ddim_jump` does it with `flowkern.flow_map.jump` (its prevalidated form) in flowkern time. Heun's
  correction differs between the two coordinates; `heun_step` is EDM's (in σ), as CD and CTM prescribe.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from flowkern._precision import accumulation_dtype
from flowkern._validate import check_finite_scalar, check_int, check_tensor
from flowkern.flow_map.jump import jump_prevalidated
from flowkern.methods._util import check_choice
from flowkern.methods.coupling import DEFAULT_BLOCK, check_coupling, couple

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5      # the σ_data of the image data EDM's and iCT's constants were chosen for
Distance = Literal["l2", "pseudo_huber"]


# ----------------------------------------------------------------------------------------------------- coordinates


def sigma_to_t(sigma: Tensor) -> Tensor:
    """flowkern time t = σ/(1 + σ) (t → 1 as σ → ∞)."""
    return sigma / (1 + sigma)


def t_to_sigma(t: Tensor) -> Tensor:
    """EDM noise level σ = t/(1 − t) (t < 1)."""
    return t / (1 - t)


def col(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample [B] tensor shaped to broadcast against x [B, ...]."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


# ----------------------------------------------------------------------------------------------------- grids, checks


def check_sigmas(sigma_min, sigma_max, rho) -> tuple[float, float, float]:
    """Validate (σ_min, σ_max, ρ): 0 < σ_min < σ_max, ρ > 0."""
    sigma_min = check_finite_scalar("sigma_min", sigma_min, positive=True)
    sigma_max = check_finite_scalar("sigma_max", sigma_max, positive=True)
    rho = check_finite_scalar("rho", rho, positive=True)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max, rho


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO, *,
                  device=None, dtype=torch.float64) -> Tensor:
    """The Karras grid, ASCENDING as in the CM papers: σ_i = (σ_min^{1/ρ} + (i−1)/(n−1)·(σ_max^{1/ρ} −
    σ_min^{1/ρ}))^ρ, i = 1..n, so σ_1 = σ_min and σ_n = σ_max exactly. Returns [n] in `dtype`."""
    n = check_int("n", n, minimum=2)
    sigma_min, sigma_max, rho = check_sigmas(sigma_min, sigma_max, rho)
    i = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    grid = (lo + i * (hi - lo)) ** rho
    grid[0], grid[-1] = sigma_min, sigma_max
    return grid.to(dtype)


def check_distance(distance) -> str:
    return check_choice("distance", distance, Distance)


# ----------------------------------------------------------------------------------------------------- scalings


def consistency_scalings(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of the consistency-model boundary preconditioning (CM paper, App. C; docs/methods.md):
    c_skip = σ_d²/((σ − σ_min)² + σ_d²), c_out = (σ − σ_min)·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²).
    At σ = σ_min, c_skip = 1 and c_out = 0 exactly, so f(y, σ_min) = y whatever the network says."""
    d2 = sigma_data ** 2
    c_skip = d2 / ((sigma - sigma_min) ** 2 + d2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma ** 2 + d2)
    c_in = 1 / torch.sqrt(sigma ** 2 + d2)
    return c_skip, c_out, c_in


def denoiser_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of EDM's denoiser preconditioning: σ_d²/(σ² + σ_d²), σσ_d/√(σ² + σ_d²), 1/√(σ² + σ_d²)."""
    return consistency_scalings(sigma, 0.0, sigma_data)


def precondition(net: Callable, y: Tensor, sigma: Tensor, s_time: Tensor, scalings) -> Tensor:
    """c_skip·y + c_out·net(c_in·y, t(σ), s_time) in float32 (float64 for float64 y), the network given flowkern
    times t(σ) = σ/(1 + σ) and `s_time` ([B] flowkern times). `scalings` = (c_skip, c_out, c_in), each [B]."""
    c_skip, c_out, c_in = (col(c, y) for c in scalings)
    t = sigma_to_t(sigma).to(accumulation_dtype(y.dtype))
    raw = net((c_in * y).to(y.dtype), t, s_time.to(t.dtype))
    if not isinstance(raw, Tensor) or raw.shape != y.shape:
        got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        raise ValueError(f"the network must return a tensor shaped like its input {tuple(y.shape)}, got {got}")
    acc = accumulation_dtype(y.dtype)
    return c_skip.to(acc) * y.to(acc) + c_out.to(acc) * raw.to(acc)


def consistency_function(net: Callable, y: Tensor, sigma: Tensor, *, sigma_min: float, sigma_data: float) -> Tensor:
    """The consistency function f_θ(y, σ) = c_skip(σ)·y + c_out(σ)·F_θ(c_in(σ)·y, t(σ)) ≈ x₀, with F_θ =
    net(·, t, s = 0): the flowkern network is asked for the map to the data end (s = 0). f(y, σ_min) = y exactly."""
    zeros = torch.zeros_like(sigma)
    return precondition(net, y, sigma, zeros, consistency_scalings(sigma, sigma_min, sigma_data))


# ----------------------------------------------------------------------------------------------------- teacher, ODE


def teacher_denoiser(teacher: Callable, y: Tensor, sigma: Tensor) -> Tensor:
    """EDM denoiser D(y, σ) = x_t − t·v(x_t, t) from a flowkern velocity teacher v = teacher(x, t, t), where
    x_t = y/(1 + σ), t = σ/(1 + σ). Float32 (float64 for float64 y)."""
    acc = accumulation_dtype(y.dtype)
    t = sigma_to_t(sigma).to(acc)
    x = (y.to(acc) / col(1 + sigma.to(acc), y))
    v = teacher(x.to(y.dtype), t, t)
    return x - col(t, x) * v.to(acc)


def heun_step(teacher: Callable, y: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Heun (2nd-order) step of EDM's PF-ODE dy/dσ = (y − D(y, σ))/σ from σ to σ_next (both [B], > 0):
    d₁ = (y − D(y, σ))/σ, ỹ = y + h·d₁, d₂ = (ỹ − D(ỹ, σ_next))/σ_next, y' = y + h·(d₁ + d₂)/2, h = σ_next − σ.
    Local error O(h³). Float32 (float64 for float64 y)."""
    acc = accumulation_dtype(y.dtype)
    y = y.to(acc)
    sigma, sigma_next = sigma.to(acc), sigma_next.to(acc)
    h = col(sigma_next - sigma, y)
    d1 = (y - teacher_denoiser(teacher, y, sigma)) / col(sigma, y)
    y_euler = y + h * d1
    d2 = (y_euler - teacher_denoiser(teacher, y_euler, sigma_next)) / col(sigma_next, y)
    return y + h * (d1 + d2) / 2


def ddim_jump(x: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """The DDIM jump of the linear interpolant in flowkern coordinates, x_s = (s/t)·x_t + (1 − s/t)·x̂₀, done as
    `flowkern.flow_map.jump(x, u, t, s)` with u = (x_t − x̂₀)/t (the Euler velocity). t > 0; t, s: [B] in [0, 1].
    It equals EDM's (σ_s/σ_t)·y + (1 − σ_s/σ_t)·x̂₀ mapped by y = x/(1 − t) (module docstring)."""
    acc = accumulation_dtype(x.dtype)
    u = (x.to(acc) - x0_hat.to(acc)) / col(t.to(acc), x)
    return jump_prevalidated(x.to(acc), u, t.to(acc), s.to(acc))


# ----------------------------------------------------------------------------------------------------- losses


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """iCT's pseudo-Huber distance on the whole vector, per sample: √(‖a − b‖² + c²) − c, [B] float32."""
    diff = (a.float() - b.float()).reshape(a.shape[0], -1)
    return torch.sqrt((diff * diff).sum(1) + c * c) - c


def distance(a: Tensor, b: Tensor, kind: str, huber_c: float) -> Tensor:
    """Per-sample distance [B] float32: 'l2' = mean squared error over the features, 'pseudo_huber' as above."""
    if kind == "pseudo_huber":
        return pseudo_huber(a, b, huber_c)
    diff = (a.float() - b.float()).reshape(a.shape[0], -1)
    return (diff * diff).mean(1)


def default_huber_c(x: Tensor) -> float:
    """iCT's c = 0.00054·√dim (dim = features per sample)."""
    return 0.00054 * math.sqrt(x[0].numel())


# ----------------------------------------------------------------------------------------------------- sampling


def check_sample_args(model, noise, steps) -> int:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, s), got {type(model).__name__}")
    check_tensor("noise", noise)
    if noise.dim() < 1:
        raise ValueError("noise must have a batch dimension, shape [B, ...]")
    return check_int("steps", steps, minimum=1)


def sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float, *, device, dtype) -> Tensor:
    """The `steps` + 1 noise levels σ_max = σ'_0 > … > σ'_steps = σ_min of a few-step sampler: the Karras grid with
    steps + 1 points, descending."""
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho, device=device, dtype=dtype).flip(0)


def consistency_sample(model: Callable, noise: Tensor, steps: int, *, sigma_min: float, sigma_max: float, rho: float,
                       sigma_data: float, generator: torch.Generator | None = None, renoise: str = "independent",
                       coupling_block: int = DEFAULT_BLOCK) -> Tensor:
    """Multistep consistency sampling (CM paper, Alg. 1), from flowkern noise (t = 1) to data (t = 0).

    y = σ_max·noise (the EDM state at σ_max, whose data part is negligible); x̂₀ = f(y, σ_max); then for each of
    the next steps − 1 levels σ of `sampling_sigmas` (above σ_min): re-noise y = x̂₀ + √(σ² − σ_min²)·z with fresh
    z ~ N(0, I) and denoise again x̂₀ = f(y, σ). Returns x̂₀ in the dtype of noise.

    renoise: how z is paired with x̂₀, the coupling the model was trained with ('independent', or 'ot': the
    batch's x̂₀ paired with fresh draws by minibatch optimal transport in blocks of `coupling_block`, see
    `flowkern.methods.coupling`; the samples of one block are then not independent of each other, as in training).
    """
    steps = check_sample_args(model, noise, steps)
    renoise = check_coupling(renoise)
    acc = accumulation_dtype(noise.dtype)
    sig = sampling_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device, dtype=acc)
    batch = noise.shape[0]
    with torch.no_grad():
        y = noise.to(acc) * sigma_max
        x0 = consistency_function(model, y, sig[0].expand(batch), sigma_min=sigma_min, sigma_data=sigma_data)
        for level in sig[1:-1]:
            z = torch.randn(noise.shape, dtype=acc, device=noise.device, generator=generator)
            z = couple(x0, z, renoise, coupling_block, generator)
            y = x0 + math.sqrt(max(float(level) ** 2 - sigma_min ** 2, 0.0)) * z
            x0 = consistency_function(model, y, level.expand(batch), sigma_min=sigma_min, sigma_data=sigma_data)
    return x0.to(noise.dtype)
