"""Exact flow maps with a learnable perturbation, and the stationarity check of a flow-map training loss.

The exact flow map of Gaussian data (`flowkern.testing.GaussianFlowMap`) plus (a + c·x)·φ(t, s) (and b·ψ(t) on a
joint map's D), with a, c, b parameters at 0: the loss's mean gradient in them must vanish at 0 within Monte-Carlo
error, and at ±δ it must point back to 0 (the loss pulls a perturbation back)."""
from __future__ import annotations

import torch
from helpers import MU, SD, gaussian_batch
from torch import nn

from flowkern.flow_map import GaussianFlowMap

F64 = torch.float64


class PerturbedExactMap(nn.Module):
    """u = u*(x, t, s) + (a + c·x)·(1 + (t − s) + t); with joint=True also D = D*(x, t, s) + b·(1 + t).
    a [dim] shifts, c [1] scales (errors linear in x − m_t, such as a discretisation bias, show only in c), b [1]."""

    def __init__(self, dim: int = 2, joint: bool = False, mu=MU, sd=SD):
        super().__init__()
        self.flow = GaussianFlowMap(mu, sd, joint=joint)
        self.joint = joint
        self.a = nn.Parameter(torch.zeros(dim, dtype=F64))
        self.c = nn.Parameter(torch.zeros(1, dtype=F64))
        self.b = nn.Parameter(torch.zeros(1, dtype=F64))
        self.divergence_head = joint

    def perturbed(self) -> list[nn.Parameter]:
        return [self.a, self.c, self.b] if self.joint else [self.a, self.c]

    def perturbation(self) -> torch.Tensor:
        return torch.cat(self.perturbed())

    def set_(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            start = 0
            for p in self.perturbed():
                p.copy_(value[start:start + p.numel()])
                start += p.numel()

    def forward(self, x, t, s):
        out = self.flow(x, t, s)
        bump = (1 + (t - s) + t).to(F64)[:, None]
        shift = (self.a + self.c * x.to(F64)) * bump
        if not self.joint:
            return out + shift
        u, d = out
        return u + shift, d + self.b * (1 + t.to(F64))


def mean_gradient(method, value: torch.Tensor, *, batches: int = 8, batch: int = 2048, seed: int = 0):
    """(mean, standard error) over `batches` independent batches of the loss's gradient in the perturbation set to
    `value` (float64 Gaussian data)."""
    model = method.model
    grads = []
    for k in range(batches):
        model.set_(value)
        torch.manual_seed(seed + k)
        x0 = gaussian_batch(batch, seed=seed + 100 + k, dtype=F64)
        model.zero_grad(set_to_none=True)
        loss = method.loss(model, x0, 0)[0]
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.perturbed()]))
    g = torch.stack(grads)
    return g.mean(0), g.std(0) / batches ** 0.5


def assert_stationary_and_restoring(method, *, delta: float = 0.05, sigmas: float = 4.0):
    """Mean gradient at the exact map within `sigmas` standard errors of 0 (plus 1e-6; pulled-back gradients at
    δ = 0.05 are ~1e-1); at ±δ along each coordinate the
    gradient component is positive along the perturbation (descent pulls it back) by more than its error."""
    n = method.model.perturbation().numel()
    mean, err = mean_gradient(method, torch.zeros(n, dtype=F64))
    assert (mean.abs() <= sigmas * err + 1e-6).all(), (mean, err)   # floor: the 1e-8 bias of 2^-16 Euler legs
    for i in range(n):
        for sign in (1.0, -1.0):
            value = torch.zeros(n, dtype=F64)
            value[i] = sign * delta
            g, e = mean_gradient(method, value, batches=4)
            assert sign * g[i] > sigmas * e[i], (i, sign, g, e)
