"""Continuous-time consistency models (sCM, Lu & Song 2024): consistency training `sct` and distillation `scd` of a
flowkern flow-matching teacher, in TrigFlow coordinates (`flowkern.methods.trigflow`: x_t = cos t·x₀ + sin t·z,
z ~ N(0, σ_d²I), f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t)).

Step. t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²); x_t = cos t·x₀ + sin t·z; dx_t/dt = cos t·z − sin t·x₀ (sct) or
the teacher's velocity converted to TrigFlow (scd). With F⁻ = sg F_θ (the same network, no EMA) and its JVP
cos t·sin t·dF⁻/dt along (x_t, t) ↦ (dx_t/dt, 1):

    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt)        (= cos t·df⁻/dt at r = 1)
    g ← g/(‖g‖ + c)                                                       (tangent normalisation, per sample)
    loss = e^{−w_φ(t)}·‖F_θ − F⁻ − g‖²/dim + w_φ(t)                       (learned adaptive weighting)

r rises linearly from 0 to 1 over `tangent_warmup` steps. g and the loss are float32 whatever the autocast; rows
whose tangent is not finite are left out of the loss and counted (`nonfinite_tangents` in the step's log).
At r = 1, E[g | x_t] is g with dx_t/dt replaced by the PF-ODE velocity, which vanishes for the exact consistency
function: that function is a stationary point of the loss. Sampling: `trigflow.trigflow_sample` (1 step from
t_max, 2 steps through the paper's t = 1.1).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_finite_scalar, check_int, check_tensor
from flowkern.methods._util import JVP_FORMS, check_choice
from flowkern.methods.base import Auxiliary, Method
from flowkern.methods.consistency_training import scaled_p_mean
from flowkern.methods.coupling import (DEFAULT_BLOCK, Coupling, NoisePairing, check_coupling, check_noise, couple,
                                      noise_pairing)
from flowkern.methods.edm import col
from flowkern.methods.trigflow import (
    MID_T,
    AdaptiveWeight,
    network_jvp,
    network_output,
    network_time,
    t_max,
    teacher_velocity,
    training_times,
    trigflow_sample,
)

P_MEAN = -1.0          # sCM's P_mean for σ_d = 0.5, moved to the data's scale unless given
WEIGHTING = "weighting"
SHARED_ARGS = """\
        sigma_data: standard deviation of the data, TrigFlow's σ_d (a run value).
        p_mean: mean P_mean of τ in t = arctan(e^τ/σ_d) (None: sCM's −1.0 moved to the data's scale,
            −1.0 + ln(σ_d/0.5)).
        p_std: standard deviation P_std of τ.
        tangent_warmup: optimiser steps over which the tangent's second term rises from r = 0 to r = 1
            (0: r = 1 from the start).
        tangent_c: constant c of the tangent normalisation g/(‖g‖ + c) (sCM's 0.1 for sCD; 2.0 for sCT, whose
            per-sample normalisation otherwise biases low-dimensional data: docs/methods.md).
        adaptive_weighting: learn the weight w_φ(t) (an auxiliary network trained with its own Adam); off: w = 0.
        weighting_lr: learning rate of the adaptive weighting network's Adam.
        mid_t: intermediate TrigFlow time of the 2-step sampler (more steps space theirs evenly below it).
        jvp: "one_pass": F_θ and its tangent from one forward-mode pass with the graph on
            (flowkern.jvp(grad=True)); "two_pass": a no-grad JVP pass, then an ordinary forward (same loss and
            gradients, one forward more).
"""     # the Args entries of both classes (their docstrings end with them)


class _ContinuousConsistency(Method):
    """sCT and sCD: everything but dx_t/dt (module docstring)."""

    network_time_scale: ClassVar[float] = 1.0   # times enter the network unscaled: its tangent along t stays O(1)

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, sigma_data: float,
                 p_mean: float | None, p_std: float, tangent_warmup: int, tangent_c: float,
                 adaptive_weighting: bool, weighting_lr: float, mid_t: float, jvp: JVP_FORMS):
        super().__init__(model, teacher=teacher)
        self.sigma_data = check_finite_scalar("sigma_data", sigma_data, positive=True)
        self.p_mean = scaled_p_mean(self.sigma_data, P_MEAN) if p_mean is None else \
            check_finite_scalar("p_mean", p_mean)
        self.p_std = check_finite_scalar("p_std", p_std, positive=True)
        self.tangent_warmup = check_int("tangent_warmup", tangent_warmup, minimum=0)
        self.tangent_c = check_finite_scalar("tangent_c", tangent_c, positive=True)
        self.adaptive_weighting = check_bool("adaptive_weighting", adaptive_weighting)
        self.weighting_lr = check_finite_scalar("weighting_lr", weighting_lr, positive=True)
        self.mid_t = check_finite_scalar("mid_t", mid_t, positive=True)
        if self.mid_t >= t_max(self.sigma_data):
            raise ValueError(f"mid_t must lie in (0, t_max) = (0, {t_max(self.sigma_data):.4f}), got {self.mid_t}")
        self.jvp = check_choice("jvp", jvp, JVP_FORMS)
        self.weight_net = AdaptiveWeight() if self.adaptive_weighting else None

    def auxiliary_networks(self) -> dict[str, Auxiliary]:
        """{"weighting": w_φ} (Adam at `weighting_lr`) with adaptive_weighting, else none."""
        if self.weight_net is None:
            return {}
        return {WEIGHTING: Auxiliary(self.weight_net, lr=self.weighting_lr)}

    def noise(self, x0: Tensor) -> Tensor:
        """z ~ N(0, σ_d²I) paired with x0 (independently)."""
        return torch.randn_like(x0) * self.sigma_data

    def dx_dt(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """dx_t/dt, [B, ...] in x0's dtype, no graph."""
        raise NotImplementedError

    def warmup(self, step: int) -> float:
        """The tangent warm-up factor r = min(1, step/tangent_warmup) (1 without warm-up)."""
        if self.tangent_warmup == 0:
            return 1.0
        return min(1.0, max(int(step), 0) / self.tangent_warmup)

    def targets(self, net: Callable, x0: Tensor, step: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        """One draw: {"pred": F_θ (with graph), "target": sg(F⁻ + g) (rows with a non-finite tangent zeroed in both),
        "t": TrigFlow times [B], "keep": rows with a finite tangent [B] bool, "tangent_norm": ‖g‖ before the
        normalisation [B]}. Float32 (float64 for float64 x0). noise: z ~ N(0, σ_d²I) paired with x0 (None: drawn
        here, `noise(x0)`)."""
        check_tensor("x0", x0)
        check_noise(noise, x0)
        acc = accumulation_dtype(x0.dtype)
        x0 = x0.to(acc)
        t = training_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_data, x0.device).to(acc)
        z = self.noise(x0) if noise is None else noise.to(acc)
        cos, sin = col(torch.cos(t), x0), col(torch.sin(t), x0)
        x_t = cos * x0 + sin * z
        dx_dt = self.dx_dt(x0, z, x_t, t).to(acc)
        if self.jvp == "one_pass":
            pred, dF = network_jvp(net, x_t, t, dx_dt, self.sigma_data, grad=True)
            F_minus = pred.detach()
        else:
            F_minus, dF = network_jvp(self.model, x_t, t, dx_dt, self.sigma_data)
            pred = network_output(net, x_t, t, self.sigma_data)
        with torch.autocast(x0.device.type, enabled=False):
            r = self.warmup(step)
            g = -cos * cos * (self.sigma_data * F_minus - dx_dt) - r * (cos * sin * x_t + self.sigma_data * dF)
            keep = torch.isfinite(g).reshape(g.shape[0], -1).all(1)
            g = torch.where(col(keep, g), g, torch.zeros_like(g))
            norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
            target = torch.where(col(keep, g), F_minus + g / col(norm + self.tangent_c, g), torch.zeros_like(g))
            pred = torch.where(col(keep, pred), pred.to(acc), torch.zeros_like(g))
        return {"pred": pred, "target": target.detach(), "t": t, "keep": keep, "tangent_norm": norm}

    def loss(self, net: Callable, x0: Tensor, step: int,
             noise: Tensor | None = None) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """The mean over the kept rows of e^{−w}·‖F_θ − F⁻ − g‖²/dim + w; with adaptive weighting the same scalar
        is the weighting network's loss too (the engine differentiates each entry for its own network only)."""
        d = self.targets(net, x0, step, noise)
        keep = d["keep"]
        with torch.autocast(x0.device.type, enabled=False):
            diff = (d["pred"] - d["target"]).reshape(keep.shape[0], -1)
            mse = (diff * diff).mean(1)
            if self.weight_net is None:
                w = torch.zeros_like(mse)
            else:
                w = self.weight_net(network_time(d["t"].float(), self.sigma_data)).to(mse.dtype)
            rows = torch.where(keep, torch.exp(-w) * mse + w, torch.zeros_like(mse))
            kept = keep.sum()
            loss = rows.sum() / kept.clamp_min(1)
        logs = {"nonfinite_tangents": (~keep).sum().float(), "tangent_warmup_r": self.warmup(step),
                "tangent_norm": (d["tangent_norm"] * keep).sum().detach() / kept.clamp_min(1),
                "adaptive_weight": w.detach().mean()}
        if self.weight_net is None:
            return loss, logs
        return {"model": loss, WEIGHTING: loss}, logs

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        return trigflow_sample(model, noise, steps, self.sigma_data, self.mid_t)


class SCT(_ContinuousConsistency):
    __doc__ = """Continuous-time consistency training (sCT): dx_t/dt = cos t·z − sin t·x₀ (module docstring).

    Args:
        model: the network F_θ, a flowkern network net(x, t, s) (called at x_t/σ_d, τ(t), s = 0).
""" + SHARED_ARGS + """        coupling: pairing of data and noise in a batch, "independent" (the paper's) or "ot" (minibatch optimal
            transport of x₀ and z, `flowkern.methods.coupling`: straighter paths to jump along; the multistep
            sampler then re-noises with the same coupling).
        coupling_block: rows per minibatch-OT block, in training and sampling.
"""

    name: ClassVar[str] = "sct"
    needs_teacher: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, sigma_data: float, p_mean: float | None = None, p_std: float = 1.4,
                 tangent_warmup: int = 1000, tangent_c: float = 2.0, adaptive_weighting: bool = True,
                 weighting_lr: float = 2e-3, mid_t: float = MID_T, jvp: JVP_FORMS = "one_pass",
                 coupling: Coupling = "independent", coupling_block: int = DEFAULT_BLOCK):
        super().__init__(model, sigma_data=sigma_data, p_mean=p_mean, p_std=p_std, tangent_warmup=tangent_warmup,
                         tangent_c=tangent_c, adaptive_weighting=adaptive_weighting, weighting_lr=weighting_lr,
                         mid_t=mid_t, jvp=jvp)
        self.coupling = check_coupling(coupling)
        self.coupling_block = check_int("coupling_block", coupling_block, minimum=1)

    def noise(self, x0: Tensor) -> Tensor:
        return couple(x0, torch.randn_like(x0) * self.sigma_data, self.coupling, self.coupling_block,
                      scale=self.sigma_data)

    def noise_pairing(self) -> NoisePairing | None:
        return noise_pairing(self.coupling, self.coupling_block, self.sigma_data)

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """`trigflow_sample`, re-noising with the training coupling."""
        return trigflow_sample(model, noise, steps, self.sigma_data, self.mid_t, renoise=self.coupling,
                               coupling_block=self.coupling_block)

    def dx_dt(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return col(torch.cos(t), x0) * z - col(torch.sin(t), x0) * x0


class SCD(_ContinuousConsistency):
    __doc__ = """Continuous-time consistency distillation (sCD) of a flow-matching teacher: dx_t/dt is the teacher's velocity
    in TrigFlow coordinates (`trigflow.teacher_velocity`; module docstring).

    Args:
        model: the network F_θ, a flowkern network net(x, t, s) (called at x_t/σ_d, τ(t), s = 0).
        teacher: a flow-matching velocity network teacher(x, t, t) (required).
""" + SHARED_ARGS + """
    adaptive_weighting is off by default for sCD (docs/methods.md): with a deterministic teacher the residual of a
    well-fitted time goes to 0 and e^{−w} grows without bound there.
"""

    name: ClassVar[str] = "scd"
    needs_teacher: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, sigma_data: float,
                 p_mean: float | None = None, p_std: float = 1.4, tangent_warmup: int = 1000,
                 tangent_c: float = 0.1, adaptive_weighting: bool = False, weighting_lr: float = 2e-3,
                 mid_t: float = MID_T, jvp: JVP_FORMS = "one_pass"):
        if teacher is None:
            raise ValueError("scd distils a teacher: pass teacher= (a flow-matching velocity network)")
        super().__init__(model, teacher=teacher, sigma_data=sigma_data, p_mean=p_mean, p_std=p_std,
                         tangent_warmup=tangent_warmup, tangent_c=tangent_c, adaptive_weighting=adaptive_weighting,
                         weighting_lr=weighting_lr, mid_t=mid_t, jvp=jvp)

    def dx_dt(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return teacher_velocity(self.teacher, x_t, t, self.sigma_data)
