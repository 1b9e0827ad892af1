"""`flowkern.likelihood`: exact-ODE and few-step (joint flow map) log-likelihoods, and bits per dimension.

Convention (docs/conventions.md): t = 0 is data, t = 1 is noise, dx/dt = v(x, t). Along the flow
d/dt log p_t(x_t) = −div v(x_t, t), hence, integrating from the data point x₀ to x₁:

    log p₀(x₀) = log N(x₁; 0, I) + ∫₀¹ div v(x_t, t) dt.

A joint flow map returns (u, D) with Φ_Y((x, ℓ), t, s) = (x, ℓ) + (s − t)·(u(x, t, s), D(x, t, s)), where
D(x, t, s) = −(1/(s − t))·∫_t^s div v dτ; so jumping from t = 0 to t = 1 over a grid 0 = t₀ < … < t_N = 1:

    log p₀(x₀) = log N(x₁; 0, I) − Σ_n (t_{n+1} − t_n)·D(x_{t_n}, t_n, t_{n+1}).

(Sampling-direction jumps, s < t, give the equivalent "log N(x₁) + Σ (s − t)·D" of the F2D2 paper.)
"""
from __future__ import annotations

import itertools
import math

import torch

from flowkern._nvtx import nvtx_range
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_finite_scalar, check_int, check_tensor
from flowkern.divergence import METHODS as DIVERGENCE_METHODS
from flowkern.divergence import divergence as _divergence
from flowkern.flow_map.jump import _check_state, _time_dtype
from flowkern.flow_map.sampling import (_check_max_batch, _check_model, _run_schedules, _zero_logp,
                                        standard_normal_logp, uniform_schedule)

SOLVERS = ("euler", "heun", "rk4", "dopri5")

# Dormand–Prince 5(4): nodes, stage weights, 5th-order weights (FSAL: the last stage is the next first), 4th-order.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def ode_log_likelihood(velocity, x0, *, steps=64, solver="rk4", divergence="exact", probes=1,
                       distribution="rademacher", seed=None, fresh_probes=True, rtol=1e-5, atol=1e-5,
                       max_steps=10_000, return_x1=False):
    """log p₀(x₀) of a velocity model by integrating x and ∫div v from t = 0 (data) to t = 1 (noise).

    Args:
        velocity: v(x, t) -> tensor like x, with t a [B] tensor (float32; float64 for float64 x).
        x0: [B, ...] data points.
        steps: fixed steps for euler/heun/rk4 (ignored by dopri5).
        solver: ``"euler"``, ``"heun"``, ``"rk4"`` or ``"dopri5"`` (adaptive Dormand–Prince 5(4), `rtol`/`atol`
            per sample on (x, ℓ), at most `max_steps` steps; no extra dependency).
        divergence: a `flowkern.divergence` method (``"exact"``, ``"hutchinson"``, ``"hutch++"``, with `probes`,
            `distribution`), or a callable div(x, t) -> [B]. Hutchinson on a fixed-step solver draws fresh probes
            each step (seed + step; about N× less variance than one probe per trajectory) shared by the stages of
            the step (`fresh_probes=False`: one probe set for the whole trajectory); on dopri5 one probe set always
            serves the whole solve so the right-hand side stays deterministic.
        seed: base seed for the probes (None: drawn from torch's default generator).
        return_x1: also return x₁, the end of the trajectory.
    Returns:
        log p₀(x₀) [B] (float32; float64 for float64 x), and x₁ when `return_x1`. Runs without autograd graph
        unless grad mode is on and the model needs it (wrap in `torch.no_grad()` for evaluation).
    """
    check_tensor("x0", x0)
    if x0.dim() < 1 or x0.numel() == 0:
        raise ValueError(f"x0 must be [B, ...] and non-empty, got {tuple(x0.shape)}")
    if not callable(velocity):
        raise TypeError(f"velocity must be callable v(x, t), got {type(velocity).__name__}")
    _check_choice("solver", solver, SOLVERS)
    steps = check_int("steps", steps, minimum=1)
    if not callable(divergence):
        _check_choice("divergence", divergence, DIVERGENCE_METHODS)
    rtol = check_finite_scalar("rtol", rtol, positive=True)
    atol = check_finite_scalar("atol", atol, positive=True)
    max_steps = check_int("max_steps", max_steps, minimum=1)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(fresh_probes, bool):
        raise TypeError(f"fresh_probes must be a bool, got {type(fresh_probes).__name__}")
    batch = x0.shape[0]
    tdt = accumulation_dtype(x0.dtype)

    def rhs(x, t: float, step: int):
        tt = torch.full((batch,), t, dtype=tdt, device=x.device)
        if callable(divergence):
            v = velocity(x, tt)
            div = divergence(x, tt)
        else:
            div, v = _divergence(velocity, x, tt, method=divergence, probes=probes, distribution=distribution,
                                 seed=(seed + step * fresh_probes) % 2 ** 63,
                                 return_output=True)
        if not isinstance(div, torch.Tensor) or div.shape != (batch,):
            raise ValueError(f"the divergence must be a [B] = [{batch}] tensor, got "
                             f"{tuple(div.shape) if isinstance(div, torch.Tensor) else type(div).__name__}")
        return v, div.to(tdt)

    with nvtx_range("flowkern.ode_log_likelihood"):
        ell = torch.zeros(batch, dtype=tdt, device=x0.device)
        if solver == "dopri5":
            x1, integral = _dopri5(rhs, x0, ell, rtol, atol, max_steps)
        else:
            x1, integral = _fixed(rhs, x0, ell, steps, solver)
        logp = standard_normal_logp(x1) + integral
    return (logp, x1) if return_x1 else logp


def _axpy(y, h, ks, weights):
    """y + h·Σ w_i k_i over the (x, ℓ) pair."""
    x, ell = y
    dx = sum(w * k[0] for w, k in zip(weights, ks) if w != 0.0)
    dl = sum(w * k[1] for w, k in zip(weights, ks) if w != 0.0)
    return x + h * dx, ell + h * dl


def _fixed(rhs, x, ell, steps, solver):
    h = 1.0 / steps
    y = (x, ell)
    for n in range(steps):
        t = n * h
        k1 = rhs(y[0], t, n)
        if solver == "euler":
            y = _axpy(y, h, [k1], [1.0])
        elif solver == "heun":
            k2 = rhs(_axpy(y, h, [k1], [1.0])[0], t + h, n)
            y = _axpy(y, h, [k1, k2], [0.5, 0.5])
        else:  # rk4
            k2 = rhs(_axpy(y, h / 2, [k1], [1.0])[0], t + h / 2, n)
            k3 = rhs(_axpy(y, h / 2, [k2], [1.0])[0], t + h / 2, n)
            k4 = rhs(_axpy(y, h, [k3], [1.0])[0], t + h, n)
            y = _axpy(y, h, [k1, k2, k3, k4], [1 / 6, 1 / 3, 1 / 3, 1 / 6])
    return y


def _dopri5(rhs, x, ell, rtol, atol, max_steps):
    """Adaptive Dormand–Prince 5(4) from t = 0 to 1 with one step size for the batch (the worst sample decides)."""
    t, h = 0.0, 0.05
    y = (x, ell)
    k1 = rhs(x, 0.0, 0)
    for _ in range(max_steps):
        if t >= 1.0 - 1e-12:
            return y
        h = min(h, 1.0 - t)
        ks = [k1]
        for i in range(1, 7):
            ks.append(rhs(_axpy(y, h, ks, _DP_A[i])[0], t + _DP_C[i] * h, 0))
        y5 = _axpy(y, h, ks, _DP_A[6])
        err = _axpy((torch.zeros_like(y[0]), torch.zeros_like(y[1])), h, ks,
                    [b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4)])
        norm = _error_norm(err, y, y5, rtol, atol)
        if norm <= 1.0:
            t, y, k1 = t + h, y5, ks[6]
        h = h * min(10.0, max(0.2, 0.9 * (max(norm, 1e-10) ** -0.2)))
    raise RuntimeError(f"ode_log_likelihood: dopri5 did not reach t = 1 in max_steps={max_steps} steps (t = {t:.4g}); "
                       "raise max_steps or loosen rtol/atol")


def _error_norm(err, y0, y1, rtol, atol) -> float:
    """max over samples of the RMS of err/(atol + rtol·max(|y0|, |y1|)) over (x, ℓ)."""
    parts = []
    for e, a, b in zip(err, y0, y1):
        e, a, b = e.reshape(e.shape[0], -1), a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        parts.append((e.abs() / (atol + rtol * torch.maximum(a.abs(), b.abs()))).double() ** 2)
    sq = torch.cat(parts, 1)
    return float(sq.mean(1).sqrt().max())


def _data_to_noise_grid(steps, x0: torch.Tensor) -> torch.Tensor:
    """`steps` (N, or a time grid 0 = t₀ < … < t_N = 1) -> the [N + 1] times, in the time dtype of x0."""
    tdt = _time_dtype(x0)
    if not isinstance(steps, (list, tuple)):
        return uniform_schedule(check_int("steps", steps, minimum=1), device=x0.device, dtype=tdt).flip(0)
    times = [check_finite_scalar(f"steps[{i}]", s) for i, s in enumerate(steps)]
    if len(times) < 2 or times[0] != 0.0 or times[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"steps as a time grid must increase strictly from 0 to 1, got {steps}")
    return torch.tensor(times, dtype=tdt, device=x0.device)


def flow_map_log_likelihood(model, x0, steps=1, *, max_batch=None, return_x1=False):
    """Few-step log p₀(x₀) of a joint flow map: no divergence, no ODE, `steps` model calls.

    The jumps are those of `flowkern.flow_map.sample(..., likelihood=True)` run from data to noise: the joint
    state (x, ℓ) starts at (x₀, 0) and jumps (x, ℓ) ← (x, ℓ) + (t_{n+1} − t_n)·(u, D) along the grid.

    Args:
        model: model(x, t, s) -> (u, D): u like x (average velocity, Φ(x, t, s) = x + (s − t)·u), D [B] or [B, 1]
            (average of −div v over [t, s]); t, s are [B] tensors (float32; float64 for float64 x0).
        x0: [B, ...] data points.
        steps: N ≥ 1 uniform jumps 0 → 1/N → … → 1, or a strictly increasing sequence of times from 0 to 1.
        max_batch: most rows per model call (None: the whole batch).
    Returns:
        log p₀(x₀) = log N(x₁; 0, I) − Σ_n (t_{n+1} − t_n)·D(x_{t_n}, t_n, t_{n+1}), [B] (float32; float64 for
        float64 x0); and x₁ when `return_x1`.
    """
    op = "flowkern.flow_map_log_likelihood"
    _check_model(model)
    _check_state("x0", x0)
    if x0.numel() == 0:
        raise ValueError(f"x0 must be [B, ...] and non-empty, got {tuple(x0.shape)}")
    grid = _data_to_noise_grid(steps, x0)
    max_batch = _check_max_batch(max_batch)
    x1, integral = _run_schedules(op, model, x0, [grid], _zero_logp(x0.shape[0], x0), max_batch)[0]
    logp = standard_normal_logp(x1) - integral
    return (logp, x1) if return_x1 else logp


def dequantize(images, *, num_bins=256, low=-1.0, high=1.0, generator=None, dtype=torch.float32):
    """Uniform dequantization: integer pixels k ∈ {0, …, num_bins − 1} -> low + (high − low)·(k + U)/num_bins,
    U ~ Uniform[0, 1) elementwise (so each bin becomes an interval of width (high − low)/num_bins)."""
    check_tensor("images", images, dtypes=None)
    if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"images must be an integer tensor of bin indices, got {images.dtype}")
    num_bins = check_int("num_bins", num_bins, minimum=2)
    low, high = check_finite_scalar("low", low), check_finite_scalar("high", high)
    if high <= low:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= num_bins):
        raise ValueError(f"images must lie in [0, {num_bins}), got values in [{int(images.min())}, "
                         f"{int(images.max())}]")
    u = torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)
    return low + (high - low) * (images.to(dtype) + u) / num_bins


def bits_per_dim(log_density, dim, *, num_bins=256, low=-1.0, high=1.0):
    """Bits per dimension of discrete data from the model's log density of its dequantized version.

    With bins of width w = (high − low)/num_bins in model space (`dequantize`), log P(k) ≥ E_U[log p(y)] + dim·log w,
    so bpd = −(log p(y) + dim·log w)/(dim·ln 2). A model uniform on [low, high]^dim scores log₂(num_bins) (8 for
    8-bit images). Average the result over the data (and dequantization draws) for the usual figure.
    """
    check_tensor("log_density", log_density, dtypes=None)
    dim = check_int("dim", dim, minimum=1)
    num_bins = check_int("num_bins", num_bins, minimum=2)
    low, high = check_finite_scalar("low", low), check_finite_scalar("high", high)
    if high <= low:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    width = (high - low) / num_bins
    return -(log_density + dim * math.log(width)) / (dim * math.log(2.0))
