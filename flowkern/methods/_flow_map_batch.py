"""Batch pieces shared by the flow-map methods (shortcut, lsd/esd/psd, f2d2): rows on the diagonal and off it.

Convention (docs/conventions.md): t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε, Φ(x, t, s) = x + (s − t)·u.
A batch of B rows is split into B − n_off diagonal rows (s = t, the flow-matching term u(x_t, t, t) vs ε − x₀) and
n_off off-diagonal rows (s < t, the method's flow-map condition), n_off = round(fraction·B).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowkern._precision import accumulation_dtype
from flowkern._validate import check_int
from flowkern.methods._util import check_probability
from flowkern.methods.coupling import DEFAULT_BLOCK, check_noise, paired_noise
from flowkern.methods.edm import col
from flowkern.methods.flow_matching import Diagonal, interpolate


def off_diagonal_rows(batch: int, fraction: float) -> int:
    """n_off = round(fraction·batch), at least 1 when fraction > 0 and at most batch − 1 when fraction < 1."""
    batch = check_int("batch", batch, minimum=1)
    fraction = check_probability("fraction", fraction)
    n = int(round(fraction * batch))
    if 0.0 < fraction and n == 0:
        n = 1
    if fraction < 1.0 and n == batch and batch > 1:
        n = batch - 1
    return n


def time_dtype(x0: Tensor) -> torch.dtype:
    """Times are float32 (float64 for float64 data)."""
    return accumulation_dtype(x0.dtype)


def noised(x0: Tensor, t: Tensor, coupling: str = "independent", block: int = DEFAULT_BLOCK,
           eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, ε − x₀) for fresh noise ε ~ N(0, I) paired with x0 by `coupling` (`flowkern.methods.coupling`), or for
    `eps`, noise already paired with x0 (a loss's `noise=`): the interpolant and its conditional velocity."""
    eps = paired_noise(x0, coupling, block) if check_noise(eps, x0) is None else eps
    return interpolate(x0, eps, t), eps - x0


def triangle_times(n: int, *, device, dtype) -> tuple[Tensor, Tensor]:
    """(t, s) uniform on the triangle 0 ≤ s ≤ t ≤ 1: the larger and the smaller of two uniform draws."""
    a = torch.rand(n, device=device, dtype=dtype)
    b = torch.rand(n, device=device, dtype=dtype)
    return torch.maximum(a, b), torch.minimum(a, b)


def squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row mean over the trailing dims of (pred − target)² in float32 (float64 for float64), shape [B]."""
    acc = accumulation_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    return diff.reshape(diff.shape[0], -1).square().mean(1)


def average_velocity(phi: Tensor, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """u = (Φ − x)/(s − t) (s ≠ t): a jump's end point as an average velocity."""
    return (phi - x) / col(s - t, x).to(phi.dtype)


def flow_map_velocity(model) -> Callable:
    """v(x, t) = u(x, t, t) of a flow map model (u, or the u of (u, D))."""
    diagonal = Diagonal(model)
    return lambda x, t: diagonal(x, t, t)
