"""Flow maps by self-distillation (Boffi, Albergo & Vanden-Eijnden, 2025): `lsd`, `esd`, `psd`, loss and targets.

Convention (docs/conventions.md): t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε, a network u(x, t, s) with
Φ(x, t, s) = x + (s − t)·u and v(x, t) = u(x, t, t). No teacher: the velocity the off-diagonal term needs is the
network's own diagonal, under stop-gradient.

A batch is split into diagonal rows (fraction 1 − `off_diagonal_fraction`), t ~ U(0, 1), trained by flow matching

    ‖u(x_t, t, t) − (ε − x₀)‖²                                                     (the tangent condition)

and off-diagonal rows, (t, s) uniform on the triangle 0 ≤ s < t ≤ 1, trained by one characterisation of the flow map:

* lsd (Lagrangian):  ‖∂_sΦ(x_t, t, s) − sg v(Φ(x_t, t, s), s)‖²,  ∂_sΦ = u + (s − t)·∂_s u from one JVP in s whose
  tangent carries gradients (the network is differentiated through its own time derivative);
* esd (Eulerian, stop-gradient target):  ‖u(x_t, t, s) − sg(v − (t − s)·du/dt)‖²  with v = sg v(x_t, t) and
  du/dt = ∂_t u + ∇_x u·v along the tangent (v, 1, 0), taken in the grad pass itself (`flowkern.jvp(grad=True)`:
  one forward gives u with its graph and du/dt detached); the Eulerian condition ∂_tΦ + ∇_xΦ·v = 0 rewritten for u;
* psd (progressive / semigroup):  ‖u(x_t, t, s) − sg u_target‖²,  u_target = (Φ(Φ(x_t, t, r), r, s) − x_t)/(s − t)
  with r uniform in [s, t] (`intermediate="uniform"`) or r = (t + s)/2 ("midpoint").

Every term is a mean squared error on velocities (psd and esd on u, so a step's error is weighted 1/(t − s)² in Φ
units; lsd on ∂_sΦ), averaged over the whole batch. Sampling: the flow-map sampler Φ(x, t_i, t_{i+1}).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from flowkern._nvtx import nvtx_range
from flowkern._validate import check_int, check_tensor
from flowkern.flow_map import jump
from flowkern.methods._flow_map_batch import (flow_map_velocity, noised, off_diagonal_rows, squared_error, time_dtype,
                                              triangle_times)
from flowkern.methods._util import check_choice, check_probability
from flowkern.methods.base import Method
from flowkern.methods.coupling import DEFAULT_BLOCK, Coupling, NoisePairing, check_coupling, noise_pairing
from flowkern.methods.edm import col
from flowkern.methods.shortcut import shortcut_target
from flowkern.nn import jvp

Intermediate = Literal["uniform", "midpoint"]


def _velocity_of(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def diagonal_velocity(model: Callable, x: Tensor, t: Tensor) -> Tensor:
    """v(x, t) = u(x, t, t) under no grad."""
    with torch.no_grad():
        return _velocity_of(model(x, t, t)).to(x.dtype)


def psd_target(model: Callable, x: Tensor, t, r, s) -> Tensor:
    """(Φ(Φ(x, t, r), r, s) − x)/(s − t): the progressive target at s ≤ r ≤ t (no grad; `shortcut_target`)."""
    out = shortcut_target(model, x, t, s, r=r)
    return out[0] if isinstance(out, tuple) else out


def esd_target(model: Callable, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """v − (t − s)·du/dt with v = u(x, t, t), du/dt = ∂_t u(x, t, s) + ∇_x u(x, t, s)·v, from one no-grad JVP with
    tangents (v, 1, 0) (`flowkern.jvp`). Equals u(x, t, s) on an exact flow map (the Eulerian condition)."""
    v = diagonal_velocity(model, x, t)
    _, du_dt = jvp(model, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    return v - col(t - s, x).to(x.dtype) * _velocity_of(du_dt).to(x.dtype)


def time_derivative_of_jump(net: Callable, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(u(x, t, s), ∂_sΦ(x, t, s)) with ∂_sΦ = u + (s − t)·∂_s u, from one forward-mode pass in s under grad mode:
    both are differentiable with respect to the network's parameters (the tangent carries gradients)."""
    with fwAD.dual_level():
        out = _velocity_of(net(x, t, fwAD.make_dual(s, torch.ones_like(s))))
        u, du_ds = fwAD.unpack_dual(out)
    if du_ds is None:
        du_ds = torch.zeros_like(u)
    return u, u + col(s - t, u).to(u.dtype) * du_ds


class _SelfDistillation(Method):
    """Diagonal flow matching plus one off-diagonal flow-map term (module docstring); subclasses give the term."""

    network_time_mode: ClassVar[str] = "t_delta"   # embed (t, t − s): the jump size is an input of its own

    def __init__(self, model: nn.Module, *, off_diagonal_fraction: float = 0.25,
                 coupling: Coupling = "ot", coupling_block: int = DEFAULT_BLOCK):
        super().__init__(model)
        self.off_diagonal_fraction = check_probability("off_diagonal_fraction", off_diagonal_fraction)
        self.coupling = check_coupling(coupling)
        self.coupling_block = check_int("coupling_block", coupling_block, minimum=1)

    def noise_pairing(self) -> NoisePairing | None:
        return noise_pairing(self.coupling, self.coupling_block)

    def draw(self, x0: Tensor, noise: Tensor | None = None):
        """(x_t, t, s, conditional velocity ε − x₀, number of diagonal rows); rows [0, n) have s = t. noise: ε
        paired with x0 (None: drawn here)."""
        check_tensor("x0", x0)
        batch = x0.shape[0]
        n_off = off_diagonal_rows(batch, self.off_diagonal_fraction)
        n_diag = batch - n_off
        tdt = time_dtype(x0)
        t_diag = torch.rand(n_diag, device=x0.device, dtype=tdt)
        t_off, s_off = triangle_times(n_off, device=x0.device, dtype=tdt)
        t, s = torch.cat([t_diag, t_off]), torch.cat([t_diag, s_off])
        x_t, velocity = noised(x0, t, self.coupling, self.coupling_block, noise)
        return x_t, t, s, velocity, n_diag

    def off_diagonal_target(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def targets(self, net: Callable, x0: Tensor, noise: Tensor | None = None):
        """(prediction, target, number of diagonal rows): rows [0, n) flow matching, the rest the off-diagonal term;
        the target carries no grad."""
        x_t, t, s, velocity, n = self.draw(x0, noise)
        with nvtx_range("flowkern.train.targets"):
            target = velocity
            if n < x_t.shape[0]:
                off = self.off_diagonal_target(x_t[n:], t[n:], s[n:])
                target = torch.cat([velocity[:n], off.to(velocity.dtype)])
        return _velocity_of(net(x_t, t, s)), target.detach(), n

    def loss(self, net, x0, step, noise: Tensor | None = None):
        pred, target, n = self.targets(net, x0, noise)
        err = squared_error(pred, target)
        logs = {"fm_mse": err[:n].mean().detach()} if n else {}
        if n < err.shape[0]:
            logs[f"{self.name}_mse"] = err[n:].mean().detach()
        return err.mean(), logs

    def velocity(self, model: nn.Module):
        """v(x, t) = u(x, t, t) (for `flowkern.ode_log_likelihood`)."""
        return flow_map_velocity(model)


class ProgressiveSelfDistillation(_SelfDistillation):
    """Progressive self-distillation: diagonal flow matching plus the semigroup target (module docstring).

    Args:
        model: the flow map network u(x, t, s).
        off_diagonal_fraction: fraction of each batch with s < t (the rest: flow matching on the diagonal).
        intermediate: the time r of the two-jump target, "uniform" in [s, t] or the "midpoint" (t + s)/2.
        coupling: pairing of data and noise in a batch, "ot" (minibatch optimal transport,
            `flowkern.methods.coupling`: straighter paths, the flow map of the coupled process) or "independent"
            (the paper's).
        coupling_block: rows per minibatch-OT block.
    """

    name: ClassVar[str] = "psd"

    def __init__(self, model: nn.Module, *, off_diagonal_fraction: float = 0.25,
                 intermediate: Intermediate = "uniform", coupling: Coupling = "ot",
                 coupling_block: int = DEFAULT_BLOCK):
        super().__init__(model, off_diagonal_fraction=off_diagonal_fraction, coupling=coupling,
                         coupling_block=coupling_block)
        self.intermediate = check_choice("intermediate", intermediate, Intermediate)

    def off_diagonal_target(self, x, t, s):
        r = None
        if self.intermediate == "uniform":
            r = torch.minimum(s + torch.rand_like(t) * (t - s), t)
        return psd_target(self.model, x, t, r, s)


class EulerianSelfDistillation(_SelfDistillation):
    """Eulerian self-distillation: diagonal flow matching plus the stop-gradient Eulerian target (module docstring).

    Args:
        model: the flow map network u(x, t, s).
        off_diagonal_fraction: fraction of each batch with s < t (the rest: flow matching on the diagonal).
        coupling: pairing of data and noise in a batch, "ot" (minibatch optimal transport,
            `flowkern.methods.coupling`: straighter paths, the flow map of the coupled process) or "independent"
            (the paper's).
        coupling_block: rows per minibatch-OT block.
    """

    name: ClassVar[str] = "esd"
    network_time_mode: ClassVar[str] = "ts"   # (t, t − s) makes du/dt blow up: docs/methods.md
    network_time_scale: ClassVar[float] = 1.0   # unscaled times: du/dt in the target not inflated ×1000

    def targets(self, net: Callable, x0: Tensor, noise: Tensor | None = None):
        """(prediction, target, number of diagonal rows). One no-grad pass gives v = u(x_t, t, t) on the
        off-diagonal rows, then ONE forward-mode pass with autograd on (`flowkern.jvp(..., grad=True)`) gives the
        prediction u(x_t, t, s) of every row and, on the off-diagonal rows, du/dt along the tangent (v, 1, 0)
        (zero tangents on the diagonal rows): the target v − (t − s)·du/dt is stop-gradient."""
        x_t, t, s, velocity, n = self.draw(x0, noise)
        with nvtx_range("flowkern.train.targets"):
            v = diagonal_velocity(self.model, x_t[n:], t[n:])
            x_dot = torch.cat([torch.zeros_like(x_t[:n]), v.to(x_t.dtype)])
            t_dot = torch.cat([torch.zeros_like(t[:n]), torch.ones_like(t[n:])])
        out, out_t = jvp(net, (x_t, t, s), (x_dot, t_dot, torch.zeros_like(s)), grad=True)
        pred, du_dt = _velocity_of(out), _velocity_of(out_t)
        off = v - col(t[n:] - s[n:], v).to(v.dtype) * du_dt[n:].to(v.dtype)
        target = torch.cat([velocity[:n], off.to(velocity.dtype)])
        return pred, target.detach(), n


class LagrangianSelfDistillation(_SelfDistillation):
    """Lagrangian self-distillation: diagonal flow matching plus ‖∂_sΦ − sg v(Φ, s)‖² (module docstring).

    Args:
        model: the flow map network u(x, t, s).
        off_diagonal_fraction: fraction of each batch with s < t (the rest: flow matching on the diagonal).
        coupling: pairing of data and noise in a batch, "ot" (minibatch optimal transport,
            `flowkern.methods.coupling`: straighter paths, the flow map of the coupled process) or "independent"
            (the paper's).
        coupling_block: rows per minibatch-OT block.
    """

    name: ClassVar[str] = "lsd"

    def targets(self, net: Callable, x0: Tensor, noise: Tensor | None = None):
        """(prediction, target, number of diagonal rows): the prediction is u on the diagonal rows and ∂_sΦ on the
        others (one JVP in s through the grad pass), the target ε − x₀ and sg v(Φ(x_t, t, s), s)."""
        x_t, t, s, velocity, n = self.draw(x0, noise)
        u, ds_phi = time_derivative_of_jump(net, x_t, t, s)
        target = velocity
        if n < x_t.shape[0]:
            with nvtx_range("flowkern.train.targets"), torch.no_grad():
                end = jump(x_t[n:], u[n:].detach().to(x_t.dtype), t[n:], s[n:])
                off = diagonal_velocity(self.model, end, s[n:])
            target = torch.cat([velocity[:n], off.to(velocity.dtype)])
        pred = torch.cat([u[:n], ds_phi[n:]])
        return pred, target.detach(), n
