"""The exact flow map of Gaussian data (METHODS.md §3): a "model" with closed-form answers, for tests and demos.

Data x₀ ~ N(μ, σ²I) in `dim` dimensions, x_t = (1 − t)x₀ + tε. Then p_t = N(m_t, s_t²I) with
    m_t = (1 − t)μ,   s_t = √((1 − t)²σ² + t²),
    Φ(x, t, s) = m_s + (s_s/s_t)(x − m_t),   v(x, t) = −μ + (ṡ_t/s_t)(x − m_t),   ṡ_t = (t − (1 − t)σ²)/s_t,
    div v = dim·ṡ_t/s_t,   D(x, t, s) = −(1/(s − t))∫_t^s div v dτ = −dim·log(s_s/s_t)/(s − t).
The average velocity u = (Φ − x)/(s − t) is evaluated without cancellation: with
a = ((s + t) − σ²(2 − s − t))/s_t², s_s² = s_t²·(1 + (s − t)·a), so (s_s/s_t − 1)/(s − t) = a/(1 + s_s/s_t) and
    u = −μ + (x − m_t)·a/(1 + s_s/s_t),   D = −(dim/2)·log1p((s − t)·a)/(s − t)
(both continuous at s = t, where u = v and D = −div v). Maths in float64.
"""
from __future__ import annotations

import math

import torch


class GaussianFlowMap:
    """``model(x, t, s)`` -> u (or (u, D) with ``joint=True``) for data N(μ, σ²I); x: [B, ...], t, s: [B]."""

    def __init__(self, mu=0.0, sigma=1.0, *, joint: bool = False):
        self.mu = mu
        self.sigma = float(sigma)
        self.joint = joint

    def _mu(self, x: torch.Tensor) -> torch.Tensor:
        mu = torch.as_tensor(self.mu, dtype=torch.float64, device=x.device)
        return mu.expand(x.shape[1:]) if mu.dim() else mu

    @staticmethod
    def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64).reshape((-1,) + (1,) * (x.dim() - 1))

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """s_t (float64)."""
        t = t.to(torch.float64)
        return torch.sqrt((1 - t) ** 2 * self.sigma ** 2 + t ** 2)

    def _a(self, t, s):
        t, s = t.to(torch.float64), s.to(torch.float64)
        return ((s + t) - self.sigma ** 2 * (2 - s - t)) / self.scale(t) ** 2

    def phi(self, x, t, s) -> torch.Tensor:
        """Φ(x, t, s) in float64."""
        mu = self._mu(x)
        x64 = x.to(torch.float64)
        tc, sc = self._col(t, x), self._col(s, x)
        ratio = self._col(self.scale(s) / self.scale(t), x)
        return (1 - sc) * mu + ratio * (x64 - (1 - tc) * mu)

    def velocity(self, x, t, s) -> torch.Tensor:
        """u(x, t, s) in float64 (v(x, t) at s = t)."""
        mu = self._mu(x)
        ratio = self.scale(s) / self.scale(t)
        coef = self._col(self._a(t, s) / (1 + ratio), x)
        return -mu + coef * (x.to(torch.float64) - (1 - self._col(t, x)) * mu)

    def log_rate(self, x, t, s) -> torch.Tensor:
        """D(x, t, s) = −dim·log(s_s/s_t)/(s − t), [B] float64."""
        dim = x[0].numel()
        h = s.to(torch.float64) - t.to(torch.float64)
        a = self._a(t, s)
        safe = torch.where(h == 0, torch.ones_like(h), h)
        rate = torch.where(h == 0, a, torch.log1p(h * a) / safe)
        return -0.5 * dim * rate

    def log_prob(self, x, t) -> torch.Tensor:
        """log p_t(x), [B] float64."""
        mu = self._mu(x)
        x64 = x.to(torch.float64)
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
        sc = self._col(self.scale(t), x)
        z = ((x64 - (1 - self._col(t, x)) * mu) / sc).reshape(x.shape[0], -1)
        dim = z.shape[1]
        return -0.5 * (z * z).sum(1) - dim * torch.log(self.scale(t)) - 0.5 * dim * math.log(2 * math.pi)

    def __call__(self, x, t, s):
        u = self.velocity(x, t, s).to(x.dtype)
        if not self.joint:
            return u
        d_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return u, self.log_rate(x, t, s).to(d_dtype)
