"""flowkern.testing's closed forms against autodiff (torch.func) and quadrature, in float64."""
from __future__ import annotations

import pytest
import torch

from flowkern.testing import (GaussianFlowMap, gaussian_divergence, gaussian_log_prob, gaussian_mixture_log_prob,
                              gaussian_mixture_velocity, gaussian_velocity)

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
SIGMA = 0.4


def _points(batch=4, seed=0):
    return torch.randn(batch, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _continuity_residual(log_prob, velocity, x, t):
    """∂_t log p + v·∇ log p + div v per sample: zero for the velocity that transports p_t (∂_t p + ∇·(p v) = 0)."""
    out = []
    for xb, tb in zip(x, t):
        dlogp_dt = torch.func.grad(lambda tt: log_prob(xb[None], tt[None])[0])(tb)
        grad_x = torch.func.grad(lambda xx: log_prob(xx[None], tb[None])[0])(xb)
        jac = torch.func.jacrev(lambda xx: velocity(xx[None], tb[None])[0])(xb)
        out.append(dlogp_dt + velocity(xb[None], tb[None])[0] @ grad_x + torch.trace(jac))
    return torch.stack(out)


def test_gaussian_flow_map_transports_the_gaussian_marginals():
    flow = GaussianFlowMap(MU, SIGMA)
    x = _points()
    t = torch.tensor([0.1, 0.35, 0.6, 0.95], dtype=F64)
    res = _continuity_residual(flow.log_prob, lambda xx, tt: flow.velocity(xx, tt, tt), x, t)
    torch.testing.assert_close(res, torch.zeros(4, dtype=F64), rtol=0, atol=1e-10)
    # at t = 0 the marginal is the data law, at t = 1 the standard normal
    data = torch.distributions.Normal(MU, SIGMA).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x, 0.0), data, rtol=0, atol=1e-12)
    torch.testing.assert_close(gaussian_log_prob(x, MU, SIGMA), data, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.log_prob(x, 1.0), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1),
                               rtol=0, atol=1e-12)


def test_gaussian_phi_is_the_flow_of_the_velocity():
    """∂Φ(x, t, s)/∂s at s = t is v(x, t); u = (Φ − x)/(s − t); Φ(x, 0, 1) whitens the data; Φ composes."""
    flow = GaussianFlowMap(MU, SIGMA)
    x = _points(seed=1)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=F64)
    s = torch.tensor([0.9, 0.5, 0.1, 0.3], dtype=F64)
    _, dphi_ds = torch.func.jvp(lambda ss: flow.phi(x, t, ss), (t,), (torch.ones(4, dtype=F64),))
    torch.testing.assert_close(dphi_ds, flow.velocity(x, t, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.velocity(x, t, s), (flow.phi(x, t, s) - x) / (s - t)[:, None], rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(flow.phi(x, 0.0, 1.0), (x - MU) / SIGMA, rtol=0, atol=1e-12)
    r = torch.full((4,), 0.45, dtype=F64)
    torch.testing.assert_close(flow.phi(flow.phi(x, t, r), r, s), flow.phi(x, t, s), rtol=0, atol=1e-12)


def test_gaussian_divergence_and_log_rate():
    flow = GaussianFlowMap(MU, SIGMA)
    x = _points(seed=2)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=F64)
    jac = torch.func.vmap(torch.func.jacrev(lambda xx, tt: flow.velocity(xx[None], tt[None], tt[None])[0]))(x, t)
    trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(flow.divergence(x, t), trace, rtol=0, atol=1e-12)
    torch.testing.assert_close(gaussian_divergence(SIGMA, 3)(x, t), trace, rtol=0, atol=1e-12)
    # (s − t)·D = −∫_t^s div v dτ (trapezoid on a fine grid), and log p_s(Φ) = log p_t(x) + (s − t)·D
    s = torch.full((4,), 0.75, dtype=F64)
    taus = torch.linspace(0, 1, 20001, dtype=F64)
    for b in range(4):
        grid = t[b] + (s[b] - t[b]) * taus
        integral = torch.trapezoid(flow.divergence(x[:1].expand(len(grid), 3), grid), grid)
        torch.testing.assert_close(flow.log_rate(x, t, s)[b] * (s[b] - t[b]), -integral, rtol=0, atol=1e-8)
    torch.testing.assert_close(flow.log_prob(flow.phi(x, t, s), s),
                               flow.log_prob(x, t) + (s - t) * flow.log_rate(x, t, s), rtol=0, atol=1e-10)
    torch.testing.assert_close(flow.log_rate(x, t, t), -flow.divergence(x, t), rtol=0, atol=1e-12)


def test_gaussian_flow_map_as_a_model():
    x = _points(seed=3).float()
    t, s = torch.full((4,), 0.8), torch.full((4,), 0.2)
    u, d = GaussianFlowMap(MU, SIGMA, joint=True)(x, t, s)
    assert u.dtype == torch.float32 and d.dtype == torch.float32 and d.shape == (4,)
    flow = GaussianFlowMap(MU, SIGMA)
    torch.testing.assert_close(u, flow.velocity(x, t, s).float())
    torch.testing.assert_close(gaussian_velocity(MU, SIGMA)(x, t), flow.velocity(x, t, t).float())
    with pytest.raises(ValueError, match="sigma must be"):
        GaussianFlowMap(MU, 0.0)
    with pytest.raises(TypeError, match="joint must be a bool"):
        GaussianFlowMap(MU, SIGMA, joint=1)
    with pytest.raises(ValueError, match="samples of 2 elements"):
        gaussian_divergence(SIGMA, 2)(x, t)


def test_gaussian_mixture_velocity_transports_the_mixture():
    w = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=F64)
    sigmas = torch.tensor([0.4, 0.6, 0.3], dtype=F64)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) * 1.5
    t = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=F64)
    res = _continuity_residual(lambda xx, tt: gaussian_mixture_log_prob(xx, w, means, sigmas, t=tt),
                               gaussian_mixture_velocity(w, means, sigmas), x, t)
    torch.testing.assert_close(res, torch.zeros(5, dtype=F64), rtol=0, atol=1e-9)
    comps = torch.distributions.Independent(torch.distributions.Normal(means, sigmas[:, None]), 1)
    law = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(w), comps)
    torch.testing.assert_close(gaussian_mixture_log_prob(x, w, means, sigmas), law.log_prob(x), rtol=0, atol=1e-12)
    std = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(gaussian_mixture_log_prob(x, w, means, sigmas, t=1.0), std, rtol=0, atol=1e-12)
    # one component is the Gaussian
    one = gaussian_mixture_velocity(torch.ones(1, dtype=F64), means[:1], sigmas[:1])
    torch.testing.assert_close(one(x, t), gaussian_velocity(means[0], float(sigmas[0]))(x, t), rtol=0, atol=1e-12)
