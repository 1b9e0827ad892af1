"""Shared fixtures for the method tests: tiny networks, the exact Gaussian teacher, and "exact" consistency / CTM
networks for Gaussian data, written in EDM's σ from first principles (independent of flowkern's conversions):

data x₀ ~ N(μ, sd²I), y = x₀ + σε ~ N(μ, (sd² + σ²)I); the PF-ODE map is Φ_y(y, σ → σ') = μ + r·(y − μ) with
r = √((sd² + σ'²)/(sd² + σ²)), and the denoiser E[x₀ | y] = μ + sd²/(sd² + σ²)·(y − μ).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import flowkern
from flowkern.flow_map import GaussianFlowMap
from flowkern.nn import MLPFlowMap

MU, SD = 0.7, 0.4


@pytest.fixture
def fast_cpu():
    """The PyTorch backend (not Triton's interpreter) and one intra-op thread: tiny models run far faster so
    (a multi-threaded BLAS spins on a loaded 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with flowkern.use_backend("torch"):
        yield
    torch.set_num_threads(previous)


def ode_y(y, sigma, sigma_to, mu=MU, sd=SD):
    """Exact Φ_y(y, σ → σ') for Gaussian data, float64; sigma, sigma_to: [B] or scalars."""
    sigma, sigma_to = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, *[1] * (y.dim() - 1))
                       for v in (sigma, sigma_to))
    r = torch.sqrt((sd ** 2 + sigma_to ** 2) / (sd ** 2 + sigma ** 2))
    return mu + r * (y.to(torch.float64) - mu)


def posterior_mean(y, sigma, mu=MU, sd=SD):
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (y.dim() - 1))
    return mu + sd ** 2 / (sd ** 2 + sigma ** 2) * (y.to(torch.float64) - mu)


class GaussianTeacher(nn.Module):
    """The exact flowkern velocity of Gaussian data as a module: teacher(x, t, t) = v(x, t)."""

    def __init__(self, mu=MU, sd=SD):
        super().__init__()
        self.flow = GaussianFlowMap(mu, sd)

    def forward(self, x, t, s):
        return self.flow.velocity(x, t, t).to(x.dtype)


def _edm_inputs(x_in, t, sigma_data):
    """Invert the preconditioned network inputs: (c_in·y, t(σ)) -> (y, σ) in float64."""
    t = t.to(torch.float64)
    sigma = t / (1 - t)
    y = x_in.to(torch.float64) * torch.sqrt(sigma ** 2 + sigma_data ** 2)[:, None]
    return y, sigma


class ExactConsistencyNet(nn.Module):
    """Raw output F making f(y, σ) = c_skip·y + c_out·F equal the exact f*(y, σ) = Φ_y(y, σ → σ_min)."""

    def __init__(self, sigma_min=0.002, sigma_data=0.5):
        super().__init__()
        self.sigma_min, self.sigma_data = sigma_min, sigma_data

    def forward(self, x_in, t, s):
        y, sigma = _edm_inputs(x_in, t, self.sigma_data)
        d2 = self.sigma_data ** 2
        c_skip = d2 / ((sigma - self.sigma_min) ** 2 + d2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / torch.sqrt(sigma ** 2 + d2)
        f = ode_y(y, sigma, self.sigma_min)
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        raw = torch.where((c_out == 0)[:, None], torch.zeros_like(y), (f - c_skip[:, None] * y) / safe[:, None])
        return raw.to(x_in.dtype)


class ExactCTMNet(nn.Module):
    """Raw output F making G(y, σ_t, σ_s) equal the exact Φ_y(y, σ_t → σ_s) (g* = the denoiser at σ_s = σ_t)."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data

    def forward(self, x_in, t, s):
        y, sigma = _edm_inputs(x_in, t, self.sigma_data)
        s = s.to(torch.float64)
        sigma_s = s / (1 - s)
        ratio = (sigma_s / sigma)[:, None]
        same = (sigma_s == sigma)[:, None]
        safe = torch.where(same, torch.full_like(ratio, 0.5), ratio)
        g = torch.where(same, posterior_mean(y, sigma), (ode_y(y, sigma, sigma_s) - safe * y) / (1 - safe))
        d2 = self.sigma_data ** 2
        c_skip = d2 / (sigma ** 2 + d2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma ** 2 + d2)
        return ((g - c_skip[:, None] * y) / c_out[:, None]).to(x_in.dtype)


def tiny_net(dim=2, dropout=0.0, seed=0):
    """A small `flowkern.nn.MLPFlowMap` (its output layer is zero at init: u = 0)."""
    torch.manual_seed(seed)
    return MLPFlowMap(dim, hidden=32, depth=2, time_dim=16, dropout=dropout)


def dropout_net():
    """tiny_net with dropout 0.5 and perturbed weights (adaLN-zero switches the dropout branch off at init)."""
    net = tiny_net(dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return net


def assert_target_pass_replays_dropout(method, module, monkeypatch):
    """The caller has collapsed the method's target pair onto its prediction (same input, same times, target
    weights = model weights), so pred == target exactly iff the target pass drew the grad pass's dropout masks.
    Control: with `module`'s replay_rng made a no-op, the masks, and so the two, differ."""
    x0 = gaussian_batch(64)
    pred, target = method.targets(method.model, x0, 0)[:2]
    assert torch.equal(pred.detach(), target)
    monkeypatch.setattr(module, "replay_rng", lambda device: contextlib.nullcontext())
    pred, target = method.targets(method.model, x0, 0)[:2]
    assert not torch.equal(pred.detach(), target)


def gaussian_batch(n=256, dim=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (MU + SD * torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype)


def fixed_loss(method, x0, step=0, seed=123):
    """The method's loss on x0 with a fixed draw of times and noise (no grad; the global RNG is left as it was)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = float(method.loss(method.model, x0, step)[0])
    torch.set_rng_state(state)
    return loss


def train(method, x0, steps, lr=3e-3):
    """A minimal loop (the engine's job elsewhere). Returns (fixed-draw loss before, after)."""
    before = fixed_loss(method, x0)
    opt = torch.optim.Adam(method.model.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = method.loss(method.model, x0, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(step)
    return before, fixed_loss(method, x0)
