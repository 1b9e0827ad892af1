"""F2D2: joint distillation of a flow map and its log-density (few-step sampling AND few-step likelihood).

Convention (docs/conventions.md): t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε. The network is a joint flow map
model(x, t, s) -> (u, D): Φ(x, t, s) = x + (s − t)·u and ℓ_s = ℓ_t + (s − t)·D, D in log-density units per unit time,
D(x, t, s) = −(1/(s − t))·∫_t^s div v dτ, so `flowkern.flow_map_log_likelihood(model, x, steps)` uses the trained
model as it is. The teacher is a flow-matching velocity v_T(x, t) = teacher(x, t, t).

    L = L_VM + L_div + L_u + L_D

* diagonal rows (t on the grid {0, 1/M, …, 1}, M = `levels`):
      L_VM  = ‖u(x_t, t, t) − v_T(x_t, t)‖²
      L_div = ((D(x_t, t, t) − sg(−div v_T(x_t, t)))/κ)²
  with div v_T from `flowkern.divergence`: Hutchinson with `probes` Rademacher probes (1 by default; unbiased, so the
  square loss has the exact divergence as its minimiser), or exact. κ = `divergence_scale` puts the divergence on the
  velocity's scale in the loss (a weight 1/κ²); D itself stays in log-density units.
* off-diagonal rows (`bootstrap_fraction` of the batch), `consistency="semigroup"` (default, the shortcut form,
  `flowkern.methods.shortcut`): 2d ∈ {1, …, 2/M}, t on the multiples of 2d, s = t − 2d, r = t − d,
      L_u = ‖u(x_t, t, s) − sg ½(u(x_t, t, r) + u(x_r, r, s))‖²
      L_D = ((D(x_t, t, s) − sg ½(D(x_t, t, r) + D(x_r, r, s)))/κ)²
  (the half steps of size 1/M are the diagonal (u, D)(x, t, t)); `consistency="lagrangian"`: (t, s) uniform on the
  triangle, with ∂_s from one JVP in s whose tangent carries gradients,
      L_u = ‖∂_sΦ(x_t, t, s) − sg u(Φ, s, s)‖²,   L_D = ((∂_s[(s − t)·D(x_t, t, s)] − sg D(Φ, s, s))/κ)².
  A fraction `toward_noise_fraction` (½) of the off-diagonal rows has t and s swapped: a step from the data side
  toward the noise (s > t), the direction `flowkern.flow_map_log_likelihood` jumps in (data at 0 to noise at 1);
  the rest step toward the data, the direction of sampling. Both conditions hold for either order of t and s.

Each term is averaged over the whole batch (rows of the other kind count as zero), as in `shortcut`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from flowkern._nvtx import nvtx_range
from flowkern._validate import check_bool, check_finite_scalar, check_int, check_tensor
from flowkern.divergence import divergence as estimate_divergence
from flowkern.flow_map import jump
from flowkern.methods._flow_map_batch import (flow_map_velocity, noised, off_diagonal_rows, squared_error,
                                              time_dtype, triangle_times)
from flowkern.methods._util import check_choice, check_probability, frozen_copy
from flowkern.methods.base import Method
from flowkern.methods.edm import col
from flowkern.methods.shortcut import check_clip, check_levels, grid_times, shortcut_target, shortcut_times

DivergenceMethod = Literal["hutchinson", "exact"]
Consistency = Literal["semigroup", "lagrangian"]


def joint_output(out, x: Tensor) -> tuple[Tensor, Tensor]:
    """A joint model's output -> (u like x, D [B]); ValueError for a model without a D output."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("f2d2 needs a joint flow map returning (u, D) (e.g. MLPFlowMap(..., divergence_head=True)); "
                         f"the model returned {type(out).__name__}")
    u, d = out
    if not isinstance(d, torch.Tensor) or d.shape not in ((x.shape[0],), (x.shape[0], 1)):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"the model's D (log-density rate) must have shape [B] = [{x.shape[0]}], got {got}")
    return u, d.reshape(x.shape[0])


def check_joint_model(model: nn.Module) -> None:
    """A network that declares it has no D output (`divergence_head=False`) is refused before training."""
    if getattr(model, "divergence_head", True) is False:
        raise ValueError("f2d2 needs a joint flow map returning (u, D): build the network with divergence_head=True "
                         f"({type(model).__name__} has no D output)")


def teacher_velocity_and_divergence(teacher: Callable, x: Tensor, t: Tensor, *, method: str = "hutchinson",
                                    probes: int = 1) -> tuple[Tensor, Tensor]:
    """(v_T(x, t), div v_T(x, t)) of a velocity teacher(x, t, t) from one batched JVP pass, no grad
    (`flowkern.divergence`; Hutchinson with Rademacher probes, or exact)."""
    def velocity(x_, t_):
        out = teacher(x_, t_, t_)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        div, v = estimate_divergence(velocity, x, t, method=method, probes=probes, return_output=True)
    return v.to(x.dtype), div


def joint_time_derivative(net: Callable, x: Tensor, t: Tensor, s: Tensor):
    """(u, D, ∂_sΦ_x, ∂_sΦ_ℓ) with ∂_sΦ_x = u + (s − t)·∂_s u and ∂_sΦ_ℓ = D + (s − t)·∂_s D: one forward-mode pass
    in s under grad mode, all four differentiable with respect to the network's parameters."""
    with fwAD.dual_level():
        u, d = joint_output(net(x, t, fwAD.make_dual(s, torch.ones_like(s))), x)
        u, du = fwAD.unpack_dual(u)
        d, dd = fwAD.unpack_dual(d)
    du = torch.zeros_like(u) if du is None else du
    dd = torch.zeros_like(d) if dd is None else dd
    h = s - t
    return u, d, u + col(h, u).to(u.dtype) * du, d + h.to(d.dtype) * dd


class F2D2(Method):
    """F2D2: a joint flow map (u, D) distilled from a flow-matching teacher, for few-step samples and likelihoods
    (module docstring).

    Args:
        model: the joint flow map network returning (u, D), e.g. MLPFlowMap(..., divergence_head=True).
        teacher: the flow-matching teacher (required), a velocity network teacher(x, t, t).
        levels: M, the finest number of steps of the self-consistency ladder (a power of two).
        bootstrap_fraction: fraction of each batch trained on the self-consistency terms (the rest: the teacher's
            velocity and divergence on the diagonal).
        divergence: estimator of the teacher's divergence, "hutchinson" or "exact".
        probes: Rademacher probes per sample of the Hutchinson estimate (>= 1).
        divergence_scale: scale of the log-density terms in the loss: (D - target)/scale is compared (a weight
            1/scale**2); D itself stays in log-density units.
        consistency: the off-diagonal condition on (u, D), "semigroup" (two half steps, the shortcut form) or
            "lagrangian" (the time derivative in s against the model's own diagonal).
        warm_start: start the model's velocity from the teacher's weights (same architecture plus the D head).
        target_clip: clip the intermediate state and the target velocity of the semigroup target to [-c, c]
            (None: no clipping).
        toward_noise_fraction: fraction of the off-diagonal rows stepping toward the noise (s > t: the data-to-noise
            jumps of the few-step likelihood); the rest step toward the data (sampling). 0: sampling steps only.
    """

    name: ClassVar[str] = "f2d2"
    needs_teacher: ClassVar[bool] = True
    divergence_head: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, levels: int = 128,
                 bootstrap_fraction: float = 0.25, divergence: DivergenceMethod = "hutchinson", probes: int = 1,
                 divergence_scale: float = 10.0, consistency: Consistency = "semigroup", warm_start: bool = True,
                 target_clip: float | None = None, toward_noise_fraction: float = 0.5):
        if teacher is None:
            raise ValueError("f2d2 distils a teacher: pass teacher= (a flow-matching velocity network)")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        check_joint_model(model)
        super().__init__(model, teacher=frozen_copy(teacher))
        self.levels = check_levels(levels)
        self.bootstrap_fraction = check_probability("bootstrap_fraction", bootstrap_fraction)
        self.divergence = check_choice("divergence", divergence, DivergenceMethod)
        self.probes = check_int("probes", probes, minimum=1)
        self.divergence_scale = check_finite_scalar("divergence_scale", divergence_scale, positive=True)
        self.consistency = check_choice("consistency", consistency, Consistency)
        self.warm_start = check_bool("warm_start", warm_start)
        self.target_clip = check_clip("target_clip", target_clip)
        self.toward_noise_fraction = check_probability("toward_noise_fraction", toward_noise_fraction)
        if self.warm_start:
            self._load_teacher_weights()

    def _load_teacher_weights(self) -> None:
        try:
            missing, unexpected = self.model.load_state_dict(self.teacher.state_dict(), strict=False)
        except RuntimeError as err:
            raise ValueError("warm_start: the model must have the teacher's architecture plus a D head: "
                             f"{err}") from None
        if unexpected or any(k.split(".")[-2] != "div" for k in missing):  # only the D head's div.weight/div.bias
            raise ValueError("warm_start: the model must have the teacher's architecture plus a D head; "
                             f"missing {missing}, unexpected {unexpected}")

    def _times(self, x0: Tensor):
        batch = x0.shape[0]
        n_off = off_diagonal_rows(batch, self.bootstrap_fraction)
        n_diag = batch - n_off
        tdt = time_dtype(x0)
        t_diag = grid_times(n_diag, self.levels, device=x0.device, dtype=tdt, include_zero=True)
        if self.consistency == "semigroup":
            t_off, s_off = shortcut_times(n_off, self.levels, device=x0.device, dtype=tdt)
        else:
            t_off, s_off = triangle_times(n_off, device=x0.device, dtype=tdt)
        toward_noise = torch.arange(n_off, device=x0.device) >= n_off - round(self.toward_noise_fraction * n_off)
        t_off, s_off = torch.where(toward_noise, s_off, t_off), torch.where(toward_noise, t_off, s_off)
        return torch.cat([t_diag, t_off]), torch.cat([t_diag, s_off]), n_diag

    def targets(self, net: Callable, x0: Tensor):
        """((u prediction, D prediction), (u target, D target), number of diagonal rows); rows [0, n) are diagonal.
        Targets carry no grad; the predictions of off-diagonal rows are ∂_s of the jump with `lagrangian`."""
        check_tensor("x0", x0)
        t, s, n = self._times(x0)
        x_t, _ = noised(x0, t)
        with nvtx_range("flowkern.train.targets"):
            v_teacher, div_teacher = teacher_velocity_and_divergence(
                self.teacher, x_t[:n], t[:n], method=self.divergence, probes=self.probes)
        if self.consistency == "lagrangian":
            u, d, ds_x, ds_l = joint_time_derivative(net, x_t, t, s)
            u_pred, d_pred = torch.cat([u[:n], ds_x[n:]]), torch.cat([d[:n], ds_l[n:]])
        else:
            u, d = u_pred, d_pred = joint_output(net(x_t, t, s), x_t)
        with nvtx_range("flowkern.train.targets"):
            u_off, d_off = self._off_diagonal_targets(x_t[n:], t[n:], s[n:], u[n:])
        u_target = torch.cat([v_teacher, u_off.to(v_teacher.dtype)])
        d_target = torch.cat([-div_teacher.to(d_pred.dtype), d_off.to(d_pred.dtype)])
        return (u_pred, d_pred), (u_target.detach(), d_target.detach()), n

    def _off_diagonal_targets(self, x, t, s, u):
        if x.shape[0] == 0:
            return x.new_zeros(x.shape), x.new_zeros(0, dtype=time_dtype(x))
        if self.consistency == "semigroup":
            return shortcut_target(lambda *a: joint_output(self.model(*a), a[0]), x, t, s, finest=1.0 / self.levels,
                                   clip=self.target_clip)
        with torch.no_grad():
            end = jump(x, u.detach().to(x.dtype), t, s)
            return joint_output(self.model(end, s, s), end)

    def loss(self, net, x0, step):
        (u_pred, d_pred), (u_target, d_target), n = self.targets(net, x0)
        err_u = squared_error(u_pred, u_target)
        acc = err_u.dtype
        err_d = ((d_pred.to(acc) - d_target.to(acc)) / self.divergence_scale).square()
        logs = {}
        if n:
            logs.update(vm_mse=err_u[:n].mean().detach(), div_mse=err_d[:n].mean().detach())
        if n < err_u.shape[0]:
            logs.update(u_mse=err_u[n:].mean().detach(), d_mse=err_d[n:].mean().detach())
        return err_u.mean() + err_d.mean(), logs

    def velocity(self, model: nn.Module):
        """v(x, t) = u(x, t, t) of the joint model (for `flowkern.ode_log_likelihood`)."""
        return flow_map_velocity(model)
