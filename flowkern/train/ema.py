"""Exponential moving averages of a model's parameters, several decays at once.

After every optimiser step n (n = 1, 2, ...), for each decay d: θ̄_d ← β·θ̄_d + (1 − β)·θ with the warmed-up decay
β = min(d, (1 + n)/(10 + n)), so early averages are not dominated by the initial weights. `averaged(decay)` gives
a frozen copy of the model carrying θ̄_d, for sampling and evaluation."""
from __future__ import annotations

import copy

import torch
from torch import nn

from flowkern._ema import ema_update_


class EMA:
    def __init__(self, model: nn.Module, decays):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.decays = tuple(float(d) for d in decays)
        self.shadow = {d: [p.detach().clone() for p in model.parameters()] for d in self.decays}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        warm = (1 + self.updates) / (10 + self.updates)
        params = [p.detach() for p in self.model.parameters()]
        for d, shadow in self.shadow.items():
            ema_update_(shadow, params, min(d, warm))

    def averaged(self, decay: float | None) -> nn.Module:
        """A frozen eval-mode copy of the model with the EMA weights of `decay` (None: the current weights)."""
        out = copy.deepcopy(self.model).eval().requires_grad_(False)
        if decay is None:
            return out
        if decay not in self.shadow:
            raise ValueError(f"decay {decay} is not tracked; EMA decays: {self.decays}")
        with torch.no_grad():
            for p, s in zip(out.parameters(), self.shadow[decay]):
                p.copy_(s)
        return out

    def state_dict(self) -> dict:
        return {"decays": self.decays, "updates": self.updates,
                "shadow": {str(d): [s.clone() for s in v] for d, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        decays = tuple(float(d) for d in state["decays"])
        if decays != self.decays:
            raise ValueError(f"checkpoint EMA decays {decays} differ from this run's {self.decays}")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for d in self.decays:
                for s, v in zip(self.shadow[d], state["shadow"][str(d)]):
                    s.copy_(v)
