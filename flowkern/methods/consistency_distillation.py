"""Consistency distillation (Song et al., 2023) of a flowkern flow-matching teacher: loss and targets.

Convention. CD lives in EDM's σ (y = x₀ + σ·ε; `flowkern.methods.edm` maps it to flowkern's x_t = y/(1 + σ),
t = σ/(1 + σ)). The consistency function is f_θ(y, σ) = c_skip(σ)·y + c_out(σ)·F_θ(c_in·y, t(σ)) with the boundary
preconditioning of docs/methods.md, so f_θ(y, σ_min) = y exactly.

Step. On the Karras grid σ_1 = σ_min < … < σ_N = σ_max (ρ = 7), draw n ~ U{1, …, N − 1}, x₀, ε:
    y_{n+1} = x₀ + σ_{n+1}·ε,
    ŷ_n = one teacher Heun step of dy/dσ = (y − D_φ(y, σ))/σ from σ_{n+1} to σ_n (D_φ from the teacher velocity),
    loss = λ·d(f_θ(y_{n+1}, σ_{n+1}), sg f_θ⁻(ŷ_n, σ_n)),
with f_θ⁻ an EMA copy of the network (θ⁻ ← μθ⁻ + (1 − μ)θ in `on_step_end`), d the mean squared error ('l2') or
iCT's pseudo-Huber, λ = 1. Sampling: multistep consistency sampling from flowkern noise (`edm.consistency_sample`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowkern._ema import ema_update_module_
from flowkern._rng import replay_rng
from flowkern._validate import check_finite_scalar, check_int, check_tensor
from flowkern.methods._util import check_decay, frozen_copy
from flowkern.methods.base import Method
from flowkern.methods.edm import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    Distance,
    check_distance,
    check_sigmas,
    consistency_function,
    consistency_sample,
    default_huber_c,
    distance,
    heun_step,
    karras_sigmas,
)


class ConsistencyDistillation(Method):
    """Consistency distillation (module docstring).

    Args:
        model: the consistency network F_θ, a flowkern network net(x, t, s) (called with s = 0).
        teacher: a flow-matching velocity network teacher(x, t, t) (required).
        sigma_data: standard deviation of the data, σ_data of the EDM preconditioning (a run value).
        num_scales: points N of the Karras grid (>= 2).
        target_decay: EMA decay μ of the target network θ⁻, in [0, 1).
        distance: "l2" (mean squared error) or "pseudo_huber" (c = 0.00054·√dim).
        sigma_min: smallest noise level σ_min of the grid (f is the identity there).
        sigma_max: largest noise level σ_max of the grid.
        rho: exponent ρ of the Karras grid.
    """

    name: ClassVar[str] = "cd"
    model_copies: ClassVar[tuple[str, ...]] = ("target",)
    needs_teacher: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, sigma_data: float,
                 num_scales: int = 40, target_decay: float = 0.95, distance: Distance = "l2",
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
        if teacher is None:
            raise ValueError("consistency distillation needs a teacher (a flow-matching velocity network)")
        super().__init__(model, teacher=teacher)
        self.num_scales = check_int("num_scales", num_scales, minimum=2)
        self.target_decay = check_decay("target_decay", target_decay)
        self.distance = check_distance(distance)
        self.sigma_min, self.sigma_max, self.rho = check_sigmas(sigma_min, sigma_max, rho)
        self.sigma_data = check_finite_scalar("sigma_data", sigma_data, positive=True)
        self.target = frozen_copy(model)

    def f(self, net: Callable, y: Tensor, sigma: Tensor) -> Tensor:
        """f(y, σ) with this method's constants (float32)."""
        return consistency_function(net, y, sigma, sigma_min=self.sigma_min, sigma_data=self.sigma_data)

    def targets(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(f_θ(y_{n+1}, σ_{n+1}), sg f_θ⁻(ŷ_n, σ_n), weight λ) — float32, [B, ...], [B, ...], [B]."""
        check_tensor("x0", x0)
        x0 = x0.float()
        batch = x0.shape[0]
        grid = karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho, device=x0.device,
                             dtype=torch.float32)
        n = torch.randint(0, self.num_scales - 1, (batch,), device=x0.device)
        sigma, sigma_next = grid[n], grid[n + 1]
        eps = torch.randn_like(x0)
        y_next = x0 + sigma_next.view(-1, *[1] * (x0.dim() - 1)) * eps
        with torch.no_grad():
            y_hat = heun_step(self.teacher, y_next, sigma_next, sigma)
            with replay_rng(x0.device):      # the grad pass below draws the same dropout mask
                target = self.f(self.target, y_hat, sigma)
        pred = self.f(net, y_next, sigma_next)
        return pred, target, torch.ones(batch, device=x0.device)

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        pred, target, weight = self.targets(net, x0, step)
        loss = (weight * distance(pred, target, self.distance, default_huber_c(pred))).mean()
        return loss, {}

    def on_step_end(self, step: int) -> None:
        ema_update_module_(self.target, self.model, self.target_decay)

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        return consistency_sample(model, noise, steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                  rho=self.rho, sigma_data=self.sigma_data)
