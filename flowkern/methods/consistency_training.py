"""Consistency training without a teacher: improved CT (iCT, Song & Dhariwal 2023) and the ECT schedule option
(Geng et al., 2024). Loss and targets only.

Convention. EDM σ inside (y = x₀ + σ·ε, mapped to flowkern by `flowkern.methods.edm`), the consistency function
f_θ(y, σ) = c_skip·y + c_out·F_θ(c_in·y, t(σ)) with f_θ(y, σ_min) = y exactly; samplers speak flowkern time.

iCT (schedule='ict'), at optimizer step k of K = total_steps:
    N(k) = min(s₀·2^⌊k/K'⌋, s₁) + 1,   K' = ⌊K/(⌊log₂⌊s₁/s₀⌋⌋ + 1)⌋           (doubling curriculum)
    σ_1 < … < σ_N the Karras grid (ρ = 7);  i drawn with p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std))
        − erf((ln σ_i − P_mean)/(√2·P_std)), i = 1..N − 1                          (lognormal σ)
    loss = λ(σ_i)·d(f_θ(x₀ + σ_{i+1}·z), sg f_θ(x₀ + σ_i·z)),   λ = 1/(σ_{i+1} − σ_i),
    d = pseudo-Huber on the whole vector, c = 0.00054·√dim.
The target is the SAME network under stop-gradient (no EMA teacher), evaluated with the same dropout mask as the
grad pass (the RNG state is replayed). coupling='ot' pairs each x₀ of the batch with a noise draw z by minibatch
optimal transport (`flowkern.methods.coupling`) instead of independently: the same data and noise, straighter
paths; the multistep sampler then re-noises with the same coupling (the coupled process's intermediate marginals
differ from the independent one's).

ECT (schedule='ect'): continuous σ_t ~ lognormal(P_mean, P_std) (clamped to [2σ_min, σ_max]) and
    σ_r = σ_t·(1 − q^{−k}·(1 + 8·sigmoid(−σ_t))),   k = 1 + ⌊step/stage_steps⌋,
clamped to σ_r ≥ σ_min (where f is the identity), weight 1/(σ_t − σ_r); t, r here are ECT's EDM times (σ).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from flowkern._rng import replay_rng
from flowkern._validate import check_finite_scalar, check_tensor
from flowkern.methods._util import check_choice, check_positive_int
from flowkern.methods.base import Method
from flowkern.methods.coupling import (DEFAULT_BLOCK, Coupling, NoisePairing, check_coupling, check_noise, couple,
                                      noise_pairing)
from flowkern.methods.edm import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    Distance,
    check_distance,
    check_sigmas,
    col,
    consistency_function,
    consistency_sample,
    default_huber_c,
    distance,
    karras_sigmas,
)

Schedule = Literal["ict", "ect"]


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum N(k) = min(s₀·2^⌊k/K'⌋, s₁) + 1 with K' = ⌊K/(⌊log₂⌊s₁/s₀⌋⌋ + 1)⌋."""
    k_prime = max(total_steps // (int(math.log2(s1 // s0)) + 1), 1)
    return min(s0 * 2 ** (max(int(step), 0) // k_prime), s1) + 1


def lognormal_index_probs(grid: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(i) over the N − 1 grid intervals [σ_i, σ_{i+1}]: the lognormal(P_mean, P_std) mass of each interval,
    normalised. grid: ascending [N]; returns [N − 1] float64."""
    z = (torch.log(grid.to(torch.float64)) - p_mean) / (math.sqrt(2) * p_std)
    mass = torch.erf(z[1:]) - torch.erf(z[:-1])
    return mass / mass.sum()


def scaled_p_mean(sigma_data: float, p_mean: float = -1.1, reference_sigma_data: float = SIGMA_DATA) -> float:
    """iCT's lognormal mean moved to data of another scale: P_mean + ln(σ_data/0.5). iCT chose −1.1 for images with
    σ_data = 0.5; EDM's noise levels act relative to the data's scale, so data 4× wider wants σ 4× larger."""
    return p_mean + math.log(check_finite_scalar("sigma_data", sigma_data, positive=True) / reference_sigma_data)


def ect_ratio(sigma: Tensor, stage: int, q: float) -> Tensor:
    """ECT's r/t = 1 − q^{−k}·(1 + 8·sigmoid(−σ)), k = stage (≥ 1)."""
    return 1 - q ** (-stage) * (1 + 8 * torch.sigmoid(-sigma))


class ConsistencyTraining(Method):
    """Consistency training, iCT or ECT schedule (module docstring).

    Args:
        model: the consistency network F_θ, a flowkern network net(x, t, s) (called with s = 0).
        sigma_data: standard deviation of the data, σ_data of the EDM preconditioning (a run value).
        total_steps: optimizer steps of the whole run K (the length of the iCT curriculum and of ECT's stages).
        schedule: discretisation curriculum, "ict" (iCT's doubling of discrete steps) or "ect" (ECT's continuous
            r(t) in stages).
        s0: iCT's initial number of discretisation steps.
        s1: iCT's final number of discretisation steps (>= s0).
        p_mean: mean of the lognormal σ distribution (None: iCT's −1.1 moved to the data's scale,
            −1.1 + ln(σ_data/0.5)).
        p_std: standard deviation of the lognormal σ distribution.
        ect_q: ECT's q (> 1): each stage divides Δσ/σ by q.
        ect_stages: number of ECT stages over the run (k = 1 + ⌊step/(total_steps // ect_stages)⌋).
        distance: "pseudo_huber" (iCT, c = 0.00054·√dim) or "l2" (mean squared error).
        coupling: pairing of data and noise in a batch, "independent" or "ot" (minibatch optimal transport; the
            multistep sampler re-noises with the same coupling).
        coupling_block: rows per minibatch-OT block, in training and sampling.
        sigma_min: smallest noise level σ_min (f is the identity there).
        sigma_max: largest noise level σ_max.
        rho: exponent ρ of the Karras grid.
    """

    name: ClassVar[str] = "ct"
    needs_teacher: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, sigma_data: float, total_steps: int, schedule: Schedule = "ect",
                 s0: int = 10, s1: int = 1280, p_mean: float | None = None, p_std: float = 2.0,
                 ect_q: float = 2.0, ect_stages: int = 6, distance: Distance = "pseudo_huber",
                 coupling: Coupling = "ot", coupling_block: int = DEFAULT_BLOCK,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
        super().__init__(model)
        self.sigma_data = check_finite_scalar("sigma_data", sigma_data, positive=True)
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.schedule = check_choice("schedule", schedule, Schedule)
        self.s0 = check_positive_int("s0", s0)
        self.s1 = check_positive_int("s1", s1)
        if self.s1 < self.s0:
            raise ValueError(f"s1 must be >= s0, got s0={self.s0}, s1={self.s1}")
        self.p_mean = scaled_p_mean(self.sigma_data) if p_mean is None else check_finite_scalar("p_mean", p_mean)
        self.p_std = check_finite_scalar("p_std", p_std, positive=True)
        self.ect_q = check_finite_scalar("ect_q", ect_q)
        if self.ect_q <= 1:
            raise ValueError(f"ect_q must be > 1, got {self.ect_q}")
        self.ect_stages = check_positive_int("ect_stages", ect_stages)
        self.ect_stage_steps = max(self.total_steps // self.ect_stages, 1)
        self.distance = check_distance(distance)
        self.coupling = check_coupling(coupling)
        self.coupling_block = check_positive_int("coupling_block", coupling_block)
        self.sigma_min, self.sigma_max, self.rho = check_sigmas(sigma_min, sigma_max, rho)

    # ------------------------------------------------------------------------------------------- schedules

    def num_scales(self, step: int) -> int:
        """iCT's N at optimizer step `step`."""
        return ict_num_scales(step, self.total_steps, self.s0, self.s1)

    def ect_stage(self, step: int) -> int:
        """ECT's k = 1 + ⌊step/stage_steps⌋."""
        return 1 + max(int(step), 0) // self.ect_stage_steps

    def sigma_pairs(self, batch: int, step: int, device) -> tuple[Tensor, Tensor]:
        """(σ_hi, σ_lo) per sample, float32 [B]: (σ_{i+1}, σ_i) for iCT, (σ_t, σ_r) for ECT."""
        if self.schedule == "ict":
            grid = karras_sigmas(self.num_scales(step), self.sigma_min, self.sigma_max, self.rho, device=device)
            probs = lognormal_index_probs(grid, self.p_mean, self.p_std)
            i = torch.multinomial(probs, batch, replacement=True)
            return grid[i + 1].float(), grid[i].float()
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(batch, device=device, dtype=torch.float64))
        sigma = sigma.clamp(2 * self.sigma_min, self.sigma_max)
        r = (sigma * ect_ratio(sigma, self.ect_stage(step), self.ect_q)).clamp_min(self.sigma_min)
        return sigma.float(), r.float()

    # ------------------------------------------------------------------------------------------- loss

    def f(self, net: Callable, y: Tensor, sigma: Tensor) -> Tensor:
        return consistency_function(net, y, sigma, sigma_min=self.sigma_min, sigma_data=self.sigma_data)

    def noise_pairing(self) -> NoisePairing | None:
        return noise_pairing(self.coupling, self.coupling_block)

    def targets(self, net: Callable, x0: Tensor, step: int,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(f_θ(x₀ + σ_hi·z, σ_hi), sg f_θ(x₀ + σ_lo·z, σ_lo), weight 1/(σ_hi − σ_lo)) — float32. noise: z ~ N(0, I)
        paired with x0 (None: drawn here)."""
        check_tensor("x0", x0)
        check_noise(noise, x0)
        x0 = x0.float()
        hi, lo = self.sigma_pairs(x0.shape[0], step, x0.device)
        z = couple(x0, torch.randn_like(x0), self.coupling, self.coupling_block) if noise is None else noise.float()
        with replay_rng(x0.device), torch.no_grad():  # the grad pass below sees the same dropout mask
            target = self.f(self.model, x0 + col(lo, x0) * z, lo)
        pred = self.f(net, x0 + col(hi, x0) * z, hi)
        return pred, target, 1 / (hi - lo)

    def loss(self, net: Callable, x0: Tensor, step: int, noise: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        pred, target, weight = self.targets(net, x0, step, noise)
        loss = (weight * distance(pred, target, self.distance, default_huber_c(pred))).mean()
        stats = {"num_scales": float(self.num_scales(step))} if self.schedule == "ict" else \
            {"ect_stage": float(self.ect_stage(step))}
        return loss, stats

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        return consistency_sample(model, noise, steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                  rho=self.rho, sigma_data=self.sigma_data, renoise=self.coupling,
                                  coupling_block=self.coupling_block)
