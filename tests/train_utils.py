"""Helpers for the training tests: tiny networks, deterministic toy methods, the torch backend."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import flowkern
from flowkern.methods.base import Method
from flowkern.nn import MLPFlowMap


def tiny_net(dim: int = 2, seed: int = 0) -> MLPFlowMap:
    torch.manual_seed(seed)
    return MLPFlowMap(dim, hidden=32, depth=1, time_dim=8)


class Regression(Method):
    """A deterministic loss (no RNG): ‖net(x₀, ½, ½) − (x₀ flipped)‖², for engine tests (DDP parity, NaN guard)."""

    name = "regression"

    def __init__(self, model, *, nan_at=(), inf_grad_at=()):
        super().__init__(model)
        self.nan_at, self.inf_grad_at = set(nan_at), set(inf_grad_at)

    def loss(self, net, x0, step):
        half = torch.full((x0.shape[0],), 0.5)
        loss = (net(x0, half, half) - x0.flip(-1)).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        if step in self.inf_grad_at:   # finite loss, non-finite gradient: d/dp sqrt(0·Σp) = 0/0
            loss = loss + torch.sqrt((next(self.model.parameters()) * 0.0).sum())
        return loss, {}


@contextlib.contextmanager
def torch_backend():
    with flowkern.use_backend("torch"):
        yield


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a busy 2-core machine spinning
    threads make them ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Aux:
    """The fields of `flowkern.methods.base.Auxiliary` the engine reads."""

    module: torch.nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


class WithCritic(Method):
    """Regression plus an auxiliary network `critic` (a linear map on samples). The model's term goes through the
    critic, the critic's term through the model: each network must get only its own term's gradient. Deterministic
    (no RNG); `nan_critic_at`: steps whose critic term is NaN."""

    name = "with_critic"

    def __init__(self, model, *, critic_lr: float = 1e-2, nan_critic_at=()):
        super().__init__(model)
        torch.manual_seed(3)
        self.critic = torch.nn.Linear(2, 1)
        self.critic_lr, self.nan_critic_at = critic_lr, set(nan_critic_at)

    def auxiliary_networks(self):
        return {"critic": Aux(self.critic, self.critic_lr, betas=(0.5, 0.9))}

    def terms(self, net, x0, step):
        half = torch.full((x0.shape[0],), 0.5)
        y = net(x0, half, half)
        model = (y - x0.flip(-1)).pow(2).mean() + self.critic(y).mean()
        critic = (self.critic(x0) - 1).pow(2).mean() + self.critic(y).pow(2).mean()
        if step in self.nan_critic_at:
            critic = critic * float("nan")
        return {"model": model, "critic": critic}

    def loss(self, net, x0, step):
        return self.terms(net, x0, step), {}
