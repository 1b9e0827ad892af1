"""The method interface: one training method = its loss and targets; the engine (`flowkern.train`) owns the rest."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowkern._validate import check_finite_scalar
from flowkern.methods.coupling import NoisePairing
from flowkern.methods.parameters import method_parameters


@dataclass
class Auxiliary:
    """A network a method trains besides its model (CTM's discriminator), with the settings of its own Adam
    optimiser. The module is a registered submodule of the method; the engine steps, clips, schedules (the run's LR
    factor times `lr`), all-reduces and checkpoints it."""

    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def __post_init__(self):
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(self.module).__name__}")
        self.lr = check_finite_scalar("lr", self.lr, positive=True)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise TypeError(f"betas must be a tuple of two floats, got {self.betas!r}")
        self.betas = tuple(check_finite_scalar("betas", b) for b in self.betas)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        self.weight_decay = check_finite_scalar("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


class Method(torch.nn.Module):
    """One training method: loss and targets only. Owns the trainable network (self.model), any frozen teacher /
    target copies and auxiliary networks (registered, so state_dict() checkpoints them).

    Subclasses set `name` (the registry key, e.g. "fm") and implement `loss`; `sample` defaults to the flow-map
    sampler Φ(x, t, s) = x + (s − t)·u(x, t, s) on a uniform schedule from t = 1 (noise) to t = 0 (data).

    Constructor: ``__init__(self, model, *, [teacher,] <keyword-only parameters>)``. Each keyword-only parameter is
    a run value (its name in `flowkern.methods.RUN_VALUES`) or a hyperparameter with one default, documented in the
    class docstring's ``Args:`` block and stored as an attribute of the same name (`hyperparameters`).
    `needs_teacher`: the method takes ``teacher=`` (a flow-matching velocity network); `init_from_teacher`: the
    student starts from the teacher's weights. `network_time_scale` and `network_time_mode`: how the network that
    `flowkern train` builds for the method embeds its times (`flowkern.nn.TimePairEmbedding`'s time_scale and mode).
    `model_copies`: the attributes holding copies of the model that follow its weights (an EMA target; None where
    the method keeps none), sharded like it under FSDP (`flowkern.train.fsdp`).

    A method whose noise is paired with its data (minibatch OT, `flowkern.methods.coupling`) says how in
    `noise_pairing()` and takes that noise as ``loss(..., noise=)``: the engine then draws each batch's noise and
    pairs it one step ahead, off the step's critical path; called without it, the loss draws and pairs its own.
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    init_from_teacher: ClassVar[bool] = False
    network_time_scale: ClassVar[float] = 1000.0
    network_time_mode: ClassVar[str] = "ts"
    model_copies: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
        self.model = model
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.teacher = teacher

    def hyperparameters(self) -> dict:
        """Every keyword argument of the constructor (run values included, model and teacher excluded) as resolved
        at construction: ``type(m)(model, [teacher=...,] **m.hyperparameters())`` rebuilds the same method."""
        return {p.name: getattr(self, p.name) for p in method_parameters(type(self))}

    def auxiliary_networks(self) -> dict[str, Auxiliary]:
        """The networks the engine trains besides the model, by name (the keys of a dict loss); default none."""
        return {}

    def train(self, mode: bool = True) -> Method:
        """Train mode for the student; a frozen teacher stays in eval mode (no dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor | dict[str, Tensor], dict]:
        """(losses, logs) for a data batch x0 [B, ...]. `losses`: the model's scalar float32 loss, or a dict
        {"model": loss, "<auxiliary name>": loss, ...} of the terms active at this step (each entry's gradient is
        taken with respect to that network's parameters only). `logs`: Python floats or 0-d tensors. `net` is the
        callable for the GRAD pass (the DDP-wrapped self.model under DDP, else self.model itself); no-grad passes
        (teacher, EMA target, JVP) use self.model / self.teacher directly."""
        raise NotImplementedError

    def noise_pairing(self) -> NoisePairing | None:
        """How the loss's noise is paired with x0 (a `flowkern.methods.coupling.NoisePairing`), for a method whose
        `loss` takes ``noise=``; None (the default): the loss draws its own noise independently of the data."""
        return None

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """Few-step sample from noise (t = 1) to data (t = 0) with `model` (the engine passes EMA weights)."""
        from flowkern.flow_map import sample

        return sample(model, noise, steps=steps)

    def lr_scale(self, step: int) -> float:
        """A factor on the engine's learning rate at optimiser step `step` (0-based), for methods with their own
        phases (progressive distillation anneals within each round); default 1."""
        return 1.0

    def on_step_end(self, step: int) -> None:
        """Curriculum / target updates, called after optimizer.step() (also when the step was skipped)."""
