"""Sample-quality metrics against held-out data: sliced Wasserstein-2 and a histogram KL on a fixed grid.

* `sliced_wasserstein2(x, y, projections=256, seed=0)`:
  SW₂(x, y) = ( E_θ W₂²(θᵀx, θᵀy) )^{1/2}, θ uniform on the unit sphere, the expectation over a FIXED set of
  directions drawn from `seed` (comparable across runs). Each 1-D W₂² is the mean squared difference of the sorted
  projections (equal sample sizes) or of the empirical quantiles at levels (k + ½)/K, K = max(n, m).
* `histogram_kl(p_samples, q_samples, low, high, bins)`: KL(P‖Q) = Σ_b P_b log(P_b / Q_b) between histograms of the
  two sample sets on a fixed grid (2-D: a bins×bins grid; for d > 2 the mean over coordinates of the 1-D KLs, i.e.
  per-pixel marginals for digits); both histograms get `eps` mass per bin before normalising so Q_b > 0.
"""
from __future__ import annotations

import math

import torch

from flowkern._validate import check_finite_scalar, check_int, check_tensor


def _check_pair(x, y):
    check_tensor("x", x)
    check_tensor("y", y)
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be [N, D] point sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError("x and y must be non-empty")
    return x.detach().double().cpu(), y.detach().double().cpu()


def projections(dim: int, count: int = 256, seed: int = 0) -> torch.Tensor:
    """`count` unit directions in R^dim [count, dim] (float64), the same for a given seed."""
    dim, count = check_int("dim", dim, minimum=1), check_int("count", count, minimum=1)
    theta = torch.randn(count, dim, generator=torch.Generator().manual_seed(check_int("seed", seed)),
                        dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function of column-sorted values [n, P] at `levels` in (0, 1): the ⌊level·n⌋-th value."""
    n = sorted_values.shape[0]
    idx = torch.clamp((levels * n).floor().long(), 0, n - 1)
    return sorted_values[idx]


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, *, projections_count: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point sets x [N, D] and y [M, D] (a float, computed in float64)."""
    x, y = _check_pair(x, y)
    theta = projections(x.shape[1], projections_count, seed)
    px, _ = (x @ theta.T).sort(dim=0)
    py, _ = (y @ theta.T).sort(dim=0)
    if px.shape[0] != py.shape[0]:
        k = max(px.shape[0], py.shape[0])
        levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return math.sqrt(((px - py) ** 2).mean().item())


def _hist2d(x, low, high, bins):
    idx = ((x - low) / (high - low) * bins).floor().long()
    keep = ((idx >= 0) & (idx < bins)).all(-1)
    idx = idx[keep]
    counts = torch.zeros(bins * bins, dtype=torch.float64)
    counts.index_add_(0, idx[:, 0] * bins + idx[:, 1], torch.ones(len(idx), dtype=torch.float64))
    return counts, x.shape[0]


def _hist1d(x, low, high, bins):
    """Per-coordinate histograms [D, bins] of x [N, D] (values outside [low, high] clamp into the end bins)."""
    idx = ((x - low) / (high - low) * bins).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(x.shape[1], bins, dtype=torch.float64)
    counts.scatter_add_(1, idx.T, torch.ones_like(idx.T, dtype=torch.float64))
    return counts


def _kl(p_counts, q_counts, eps):
    p = (p_counts + eps) / (p_counts + eps).sum(-1, keepdim=True)
    q = (q_counts + eps) / (q_counts + eps).sum(-1, keepdim=True)
    return (p * (p / q).log()).sum(-1)


def histogram_kl(p_samples: torch.Tensor, q_samples: torch.Tensor, *, low: float = -4.5, high: float = 4.5,
                 bins: int = 32, eps: float = 1e-3) -> float:
    """KL(P‖Q) in nats between histograms of `p_samples` (the data) and `q_samples` (the model) on a fixed grid.

    2-D points: one bins×bins grid over [low, high]² (points outside count towards no bin but still towards the
    total, so mass a model puts off the grid is penalised). D ≠ 2: mean over coordinates of 1-D KLs on [low, high]
    (the end bins take the values outside)."""
    p, q = _check_pair(p_samples, q_samples)
    low, high = check_finite_scalar("low", low), check_finite_scalar("high", high)
    if high <= low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")
    bins = check_int("bins", bins, minimum=2)
    eps = check_finite_scalar("eps", eps, positive=True)
    if p.shape[1] == 2:
        (pc, pn), (qc, qn) = _hist2d(p, low, high, bins), _hist2d(q, low, high, bins)
        # an extra "off the grid" bin so the two distributions are normalised over the same events
        pc, qc = torch.cat([pc, (pn - pc.sum()).view(1)]), torch.cat([qc, (qn - qc.sum()).view(1)])
        return _kl(pc, qc, eps).item()
    return _kl(_hist1d(p, low, high, bins), _hist1d(q, low, high, bins), eps).mean().item()


__all__ = ["histogram_kl", "projections", "sliced_wasserstein2"]
