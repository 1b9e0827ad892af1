"""Shortcut models (Frans, Hafner, Levine & Abbeel, 2024): a flow map trained by its semigroup condition on a
dyadic ladder of step sizes, loss and targets.

Convention (docs/conventions.md): t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε, a network u(x, t, s) with
Φ(x, t, s) = x + (s − t)·u. The paper's step size d is t − s here (toward the data): its u(x, t, d) is our
u(x, t, t − d).

Each batch has two kinds of rows (M = `levels`, a power of two):

* flow matching on the diagonal, t ∈ {1/M, 2/M, …, 1}:   ‖u(x_t, t, t) − (ε − x₀)‖²
* self-consistency (a fraction `bootstrap_fraction`, ¼ as in the paper): a step 2d ∈ {1, ½, …, 2/M} uniform over
  the log₂ M levels, t uniform over the multiples of 2d in (0, 1], s = t − 2d, r = t − d:

      u_target = sg ½·(u(x_t, t, r) + u(x_r, r, s)),   x_r = Φ(x_t, t, r)          ‖u(x_t, t, s) − u_target‖²

  Half steps of the finest size d = 1/M use the velocity u(x, t, t) (two Euler steps): the finest level of the paper
  is its flow-matching level, which here is the diagonal. The target network is the model itself (`target_ema` off)
  or an EMA copy θ⁻ ← μθ⁻ + (1 − μ)θ; `target_clip` c clips x_r and u_target to [−c, c] as the paper's code does.

Both terms are mean squared errors on the average velocity, averaged over the whole batch. Sampling with N steps
jumps d = 1/N: x ← Φ(x, t, t − 1/N) from t = 1 down to 0 (the flow-map sampler).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowkern._ema import ema_update_module_
from flowkern._nvtx import nvtx_range
from flowkern._validate import check_bool, check_finite_scalar, check_int, check_tensor, check_times
from flowkern.flow_map import jump
from flowkern.flow_map.sampling import _unpack
from flowkern.methods._flow_map_batch import (flow_map_velocity, noised, off_diagonal_rows, squared_error,
                                              time_dtype)
from flowkern.methods._util import check_decay, check_probability, frozen_copy
from flowkern.methods.base import Method
from flowkern.methods.coupling import DEFAULT_BLOCK, Coupling, NoisePairing, check_coupling, noise_pairing
from flowkern.methods.edm import col

_LEVEL_SLACK = 1e-6  # relative slack when comparing a half step with the finest level


def check_levels(levels) -> int:
    """M, the number of finest steps: a power of two ≥ 2 (the ladder 1, ½, …, 1/M halves exactly in floats)."""
    levels = check_int("levels", levels, minimum=2)
    if levels & (levels - 1):
        raise ValueError(f"levels must be a power of two (the step sizes halve: 1, 1/2, ..., 1/levels), got {levels}")
    if levels > 2 ** 20:
        raise ValueError(f"levels must be at most 2**20, got {levels}")
    return levels


def check_clip(name: str, value) -> float | None:
    return None if value is None else check_finite_scalar(name, value, positive=True)


def grid_times(n: int, levels: int, *, device, dtype, include_zero: bool = False) -> Tensor:
    """n times uniform on the grid {1/M, 2/M, …, 1} (M = levels), or on {0, 1/M, …, 1} with `include_zero` (a
    ladder that also steps from the data toward the noise starts its finest legs at t = 0)."""
    return torch.randint(0 if include_zero else 1, levels + 1, (n,), device=device).to(dtype) / levels


def shortcut_times(n: int, levels: int, *, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(t, s) for n self-consistency rows: 2d = t − s uniform over {1, ½, …, 2/M}, t uniform over the multiples of 2d
    in (0, 1] (so s = t − 2d ≥ 0 is a multiple of 2d too). Exact in binary floating point."""
    n = check_int("n", n, minimum=0)
    levels = check_levels(levels)
    k = torch.randint(0, int(math.log2(levels)), (n,), device=device)           # 2d = 2^-k
    big = torch.pow(2.0, -k.to(torch.float64))
    j = torch.floor(torch.rand(n, device=device, dtype=torch.float64) * 2.0 ** k) + 1   # j ∈ {1, …, 2^k}
    t = j * big
    return t.to(dtype), (t - big).to(dtype)


def _call(model: Callable, x: Tensor, t: Tensor, s: Tensor):
    return _unpack(model(x, t, s), x)


def shortcut_target(model: Callable, x: Tensor, t, s, *, r=None, finest: float | None = None,
                    clip: float | None = None):
    """The semigroup (self-consistency) target of a step t → s through an intermediate time r (no grad); the step
    goes toward the data (s < t) or toward the noise (s > t), row by row:

        u_target = w·u(x, t, r) + (1 − w)·u(x_r, r, s),   x_r = Φ(x, t, r),   w = (t − r)/(t − s)

    i.e. (Φ(Φ(x, t, r), r, s) − x)/(s − t) written without the cancellation; r = None is the midpoint (w = ½, the
    shortcut target, the mean of the two half-step velocities). For a joint model returning (u, D) also
    D_target = w·D(x, t, r) + (1 − w)·D(x_r, r, s), the log-density jump of the two legs over their sum. On the exact
    flow map u_target = u(x, t, s) (and D_target = D(x, t, s)): two jumps are one jump.

    Args:
        model: ``model(x, t, s)`` -> u or (u, D).
        x: [B, ...] states at t; t, s: times in [0, 1] with s ≠ t (numbers or [B] tensors).
        r: the intermediate time, between s and t (number or [B] tensor); None: (t + s)/2.
        finest: legs of at most this length use the velocity u(x, t, t) instead of u(x, t, t − d) (the finest
            level of a shortcut ladder is the flow-matching diagonal). None: never.
        clip: clip x_r and u_target to [−clip, clip] (None: no clipping).
    Returns:
        u_target [B, ...] in the dtype of x, or (u_target, D_target [B]) for a joint model.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, shape [B, ...]")
    batch, tdt = x.shape[0], time_dtype(x)
    t = check_times("t", t, batch, device=x.device, dtype=tdt)
    s = check_times("s", s, batch, device=x.device, dtype=tdt)
    if not bool((s != t).all()):
        raise ValueError("the target needs s ≠ t in every row (a step toward the data, s < t, or the noise, s > t)")
    if r is None:
        r = (t + s) * 0.5
    else:
        r = check_times("r", r, batch, device=x.device, dtype=tdt)
        if not bool(((torch.minimum(s, t) <= r) & (r <= torch.maximum(s, t))).all()):
            raise ValueError("r must lie between s and t in every row (the intermediate time of the two jumps)")
    finest = None if finest is None else check_finite_scalar("finest", finest, positive=True)
    clip = check_clip("clip", clip)
    with torch.no_grad():
        w = (t - r) / (t - s)
        limit = float("-inf") if finest is None else finest * (1 + _LEVEL_SLACK)   # legs taken as the velocity
        first, second = (t - r).abs() <= limit, (r - s).abs() <= limit
        u1, d1 = _call(model, x, t, torch.where(first, t, r))
        x_r = jump(x, u1, t, r)
        if clip is not None:
            x_r = x_r.clamp(-clip, clip)
        u2, d2 = _call(model, x_r, r, torch.where(second, r, s))
        wx = col(w, x).to(x.dtype)
        u_target = wx * u1 + (1 - wx) * u2
        if clip is not None:
            u_target = u_target.clamp(-clip, clip)
        if (d1 is None) != (d2 is None):
            raise ValueError("model returned (u, D) for one of its two calls and u alone for the other")
        if d1 is None:
            return u_target
        w = w.to(d1.dtype)
        return u_target, w * d1 + (1 - w) * d2


class Shortcut(Method):
    """Shortcut model: flow matching on the diagonal plus self-consistency of dyadic steps (module docstring).

    Args:
        model: the flow map network u(x, t, s).
        levels: M, the finest number of steps (a power of two); steps 2d ∈ {1, 1/2, ..., 2/M} are trained by
            self-consistency and the half steps of size 1/M are the velocity u(x, t, t).
        bootstrap_fraction: fraction of each batch trained on the self-consistency target (the rest: flow matching
            on the diagonal).
        target_ema: build the self-consistency target with an EMA copy of the weights instead of the weights being
            trained.
        target_decay: EMA decay of the target copy (with target_ema).
        target_clip: clip the intermediate state and the target velocity to [-c, c] (None: no clipping).
        coupling: pairing of data and noise in a batch, "ot" (minibatch optimal transport,
            `flowkern.methods.coupling`: straighter paths, the flow map of the coupled process) or "independent"
            (the paper's).
        coupling_block: rows per minibatch-OT block.
    """

    name: ClassVar[str] = "shortcut"
    model_copies: ClassVar[tuple[str, ...]] = ("target",)
    network_time_mode: ClassVar[str] = "t_delta"   # embed (t, t − s), the paper's (x, t, d) conditioning

    def __init__(self, model: nn.Module, *, levels: int = 128, bootstrap_fraction: float = 0.25,
                 target_ema: bool = False, target_decay: float = 0.999, target_clip: float | None = None,
                 coupling: Coupling = "ot", coupling_block: int = DEFAULT_BLOCK):
        super().__init__(model)
        self.levels = check_levels(levels)
        self.bootstrap_fraction = check_probability("bootstrap_fraction", bootstrap_fraction)
        self.target_ema = check_bool("target_ema", target_ema)
        self.target_decay = check_decay("target_decay", target_decay)
        self.target_clip = check_clip("target_clip", target_clip)
        self.target = frozen_copy(model) if self.target_ema else None
        self.coupling = check_coupling(coupling)
        self.coupling_block = check_int("coupling_block", coupling_block, minimum=1)

    def target_model(self) -> nn.Module:
        return self.target if self.target is not None else self.model

    def noise_pairing(self) -> NoisePairing | None:
        return noise_pairing(self.coupling, self.coupling_block)

    def targets(self, net: Callable, x0: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """(prediction, target, number of diagonal rows) for a batch x0 [B, ...]: rows [0, n) flow matching,
        rows [n, B) self-consistency. The target carries no grad. noise: ε paired with x0 (None: drawn here)."""
        check_tensor("x0", x0)
        batch = x0.shape[0]
        n_off = off_diagonal_rows(batch, self.bootstrap_fraction)
        n_diag = batch - n_off
        tdt = time_dtype(x0)
        with nvtx_range("flowkern.train.targets"):
            t_diag = grid_times(n_diag, self.levels, device=x0.device, dtype=tdt)
            t_off, s_off = shortcut_times(n_off, self.levels, device=x0.device, dtype=tdt)
            t, s = torch.cat([t_diag, t_off]), torch.cat([t_diag, s_off])
            x_t, velocity = noised(x0, t, self.coupling, self.coupling_block, noise)
            target = velocity
            if n_off:
                u_target = shortcut_target(self.target_model(), x_t[n_diag:], t_off, s_off, finest=1.0 / self.levels,
                                           clip=self.target_clip)
                target = torch.cat([velocity[:n_diag], u_target.to(velocity.dtype)])
        out = net(x_t, t, s)
        pred = out[0] if isinstance(out, tuple) else out
        return pred, target.detach(), n_diag

    def loss(self, net, x0, step, noise: Tensor | None = None):
        pred, target, n_diag = self.targets(net, x0, noise)
        err = squared_error(pred, target)
        logs = {"fm_mse": err[:n_diag].mean().detach()} if n_diag else {}
        if n_diag < err.shape[0]:
            logs["shortcut_mse"] = err[n_diag:].mean().detach()
        return err.mean(), logs

    def velocity(self, model: nn.Module):
        """v(x, t) = u(x, t, t) (for `flowkern.ode_log_likelihood`)."""
        return flow_map_velocity(model)

    def on_step_end(self, step: int) -> None:
        if self.target is not None:
            ema_update_module_(self.target, self.model, self.target_decay)
