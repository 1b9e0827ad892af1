"""Exponential moving averages of a model's parameters, several decays at once.

After every optimiser step n (n = 1, 2, ...), for each decay d: θ̄_d ← β·θ̄_d + (1 − β)·θ with the warmed-up decay
β = min(d, (1 + n)/(10 + n)), so early averages are not dominated by the initial weights. `averaged(decay)` gives
a frozen copy of the model carrying θ̄_d, for sampling and evaluation.

`update(applied)` takes the training step's outcome as a device tensor (False: the step was skipped, nothing
moves and n does not advance), so the engine never waits for the device to decide."""
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
        device = next(iter(model.parameters()), torch.empty(0)).device
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def updates(self) -> int:
        """n: the optimiser steps averaged so far."""
        return int(self._updates)

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """One EMA step; with `applied` (a bool tensor on the model's device) only where it is True."""
        params = [p.detach() for p in self.model.parameters()]
        if applied is None:
            self._updates += 1
            n = int(self._updates)
            for d, shadow in self.shadow.items():
                ema_update_(shadow, params, min(d, (1 + n) / (10 + n)))
            return
        applied = applied.to(self._updates.device)
        self._updates += applied.to(torch.int64)
        n = self._updates.to(torch.float32)
        warm = (1 + n) / (10 + n)
        for d, shadow in self.shadow.items():
            # decay 1 (weight 0) on a skipped step: the average stays bit for bit
            ema_update_(shadow, params, torch.where(applied, torch.clamp(warm, max=d), torch.ones_like(warm)))

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
        self._updates.fill_(int(state["updates"]))
        with torch.no_grad():
            for d in self.decays:
                for s, v in zip(self.shadow[d], state["shadow"][str(d)]):
                    s.copy_(v)
