"""Flow matching (the teacher every other method distils).

x_t = (1 − t)·x₀ + t·ε, ε ~ N(0, I), target velocity v = ε − x₀; loss = E ‖net(x_t, t, t) − (ε − x₀)‖² (mean over
elements), with t ~ logit-normal: t = sigmoid(m + s·n), n ~ N(0, 1) (defaults m = 0, s = 1). The network is a
flow map evaluated on the diagonal s = t, where u(x, t, t) = v(x, t) (docs/conventions.md).

Sampling integrates the PF-ODE dx/dt = v(x, t) from t = 1 to t = 0 with `steps` Euler steps:
x ← x + (t_{i+1} − t_i)·v(x, t_i), i.e. the flow-map sampler with u(x, t, s) replaced by u(x, t, t).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flowkern._nvtx import nvtx_range
from flowkern._validate import check_finite_scalar
from flowkern.methods.base import Method


def logit_normal(n: int, *, mean: float = 0.0, std: float = 1.0, device=None,
                 generator: torch.Generator | None = None) -> Tensor:
    """n times in (0, 1), float32: sigmoid(mean + std·N(0, 1))."""
    z = torch.randn(n, device=device, dtype=torch.float32, generator=generator)
    return torch.sigmoid(mean + std * z)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x₀ + t·ε with t [B] broadcast over the trailing dims (computed in x0's dtype)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps


class Diagonal(nn.Module):
    """u(x, t, s) := model(x, t, t): a velocity model seen as a flow map, so the flow-map sampler does Euler steps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, s):
        out = self.model(x, t, t)
        return out[0] if isinstance(out, tuple) else out


class FlowMatching(Method):
    """Flow matching: ‖net(x_t, t, t) − (ε − x₀)‖² with logit-normal t (module docstring).

    Args:
        model: the velocity network, a flowkern network net(x, t, s) evaluated at s = t.
        t_mean: mean m of the logit-normal time distribution t = sigmoid(m + s·n).
        t_std: standard deviation s of the logit-normal time distribution (> 0).
    """

    name = "fm"

    def __init__(self, model: nn.Module, *, t_mean: float = 0.0, t_std: float = 1.0):
        super().__init__(model)
        self.t_mean = check_finite_scalar("t_mean", t_mean)
        self.t_std = check_finite_scalar("t_std", t_std, positive=True)

    def targets(self, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, v): interpolant, float32 times [B], target velocity ε − x₀ (x0's dtype)."""
        t = logit_normal(x0.shape[0], mean=self.t_mean, std=self.t_std, device=x0.device)
        eps = torch.randn_like(x0)
        return interpolate(x0, eps, t), t, eps - x0

    def loss(self, net, x0, step):
        with nvtx_range("flowkern.train.targets"):
            xt, t, v = self.targets(x0)
        out = net(xt, t, t)
        u = out[0] if isinstance(out, tuple) else out
        loss = (u.float() - v.float()).pow(2).mean()
        return loss, {"mse": loss.detach()}

    def velocity(self, model: nn.Module):
        """v(x, t) = model(x, t, t) (for `flowkern.ode_log_likelihood`)."""
        diag = Diagonal(model)
        return lambda x, t: diag(x, t, t)

    def sample(self, model, noise, steps):
        from flowkern.flow_map import sample

        return sample(Diagonal(model), noise, steps=steps)
