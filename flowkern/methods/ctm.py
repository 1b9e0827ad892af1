"""Consistency trajectory model (CTM, Kim et al., 2024) distilled from a flowkern flow-matching teacher.

Convention. CTM lives in EDM's σ (y = x₀ + σ·ε; `flowkern.methods.edm` maps it to flowkern's x_t = y/(1 + σ),
t = σ/(1 + σ)). Its two-time jump, from noise level σ_t down to σ_s ≤ σ_t, is

    G_θ(y, σ_t, σ_s) = (σ_s/σ_t)·y + (1 − σ_s/σ_t)·g_θ(y, σ_t, σ_s),
    g_θ(y, σ_t, σ_s) = c_skip(σ_t)·y + c_out(σ_t)·F_θ(c_in(σ_t)·y, t, s)     (EDM denoiser scalings),

with F_θ the flowkern network net(x, t, s) receiving the flowkern times t = t(σ_t), s = t(σ_s). In flowkern
coordinates G is exactly the DDIM jump x_s = (s/t)·x_t + (1 − s/t)·g, done by `flowkern.flow_map.jump`
(`edm.ddim_jump`); G(·, σ, σ) is the identity and g(·, σ, σ) is a denoiser (the DSM loss trains it).

Losses, on the Karras grid σ_1 = σ_min < … < σ_N = σ_max:
* CTM: i_t ~ U{2..N}, i_s ~ U{1..i_t − 1} (replaced by i_s = 1, s = σ_min, with probability `s_min_prob`: the
      official code's "smallest" s strategy when 1, the jump the 1-step sampler takes),
      i_u ~ U{max(i_s, i_t − max_teacher_steps)..i_t − 1};
      y_t = x₀ + σ_t·ε,   pred = G_sg(G_θ(y_t, σ_t, σ_s), σ_s, σ_min),
      target = G_sg(G_sg(Heun_φ^k(y_t; σ_t → σ_u), σ_u, σ_s), σ_s, σ_min),   k = i_t − i_u teacher Heun steps,
  where sg = the EMA target network θ⁻ (frozen parameters; the student branch back-propagates through its input),
  loss d(pred, target) (mean squared error, or pseudo-Huber).
* DSM: σ ~ lognormal(−1.2, 1.2), loss λ(σ)·‖g_θ(x₀ + σ·ε, σ, σ) − x₀‖² with EDM's λ = (σ² + σ_d²)/(σ·σ_d)²
  (mean over features), weight `dsm_weight`.
* GAN (optional, off by default), from step `gan_start` on: a small MLP discriminator D on the samples (an
  auxiliary network, `auxiliary_networks()`, trained by the engine with its own Adam). The generator term
  −log sigmoid(D(pred)) (non-saturating; D frozen in it) is weighted by the last-layer gradient-norm ratio
  λ_GAN = ‖∇_{w_L} L_CTM‖/(‖∇_{w_L} L_GAN‖ + 1e-4) (w_L = the weight of the network's last nn.Linear), clamped
  to [0, 1e4]; the discriminator's loss is the logistic −log sigmoid(D(x₀)) − log(1 − sigmoid(D(sg pred))).
Sampling: deterministic (γ = 0) jumps G along the Karras grid from σ_max to σ_min, from flowkern noise.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkern._ema import ema_update_module_
from flowkern._precision import accumulation_dtype
from flowkern._rng import replay_rng
from flowkern._validate import check_bool, check_finite_scalar, check_int, check_tensor
from flowkern.methods._util import check_decay, check_positive_int, check_probability, frozen_copy
from flowkern.methods.base import Auxiliary, Method
from flowkern.methods.edm import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    Distance,
    check_distance,
    check_sample_args,
    check_sigmas,
    col,
    ddim_jump,
    default_huber_c,
    denoiser_scalings,
    distance,
    heun_step,
    karras_sigmas,
    precondition,
    sampling_sigmas,
    sigma_to_t,
)

DISCRIMINATOR_BETAS = (0.5, 0.9)


def ctm_g(net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor, sigma_data: float) -> Tensor:
    """g_θ(y, σ_t, σ_s) = c_skip(σ_t)·y + c_out(σ_t)·net(c_in(σ_t)·y, t(σ_t), t(σ_s)) (EDM scalings)."""
    return precondition(net, y, sigma_t, sigma_to_t(sigma_s), denoiser_scalings(sigma_t, sigma_data))


def ctm_jump(net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor, sigma_data: float) -> Tensor:
    """G_θ(y, σ_t, σ_s) = (σ_s/σ_t)·y + (1 − σ_s/σ_t)·g_θ, done in flowkern coordinates as the DDIM jump
    `edm.ddim_jump(y/(1 + σ_t), g, t, s)·(1 + σ_s)`. y: [B, ...] (EDM state), σ_t ≥ σ_s > 0: [B]."""
    acc = accumulation_dtype(y.dtype)
    sigma_t, sigma_s = sigma_t.to(acc), sigma_s.to(acc)
    g = ctm_g(net, y, sigma_t, sigma_s, sigma_data)
    x_t = y.to(acc) / col(1 + sigma_t, y)
    return ddim_jump(x_t, g, sigma_to_t(sigma_t), sigma_to_t(sigma_s)) * col(1 + sigma_s, y)


def last_linear_weight(model: nn.Module) -> nn.Parameter:
    """The weight of the last nn.Linear registered in `model` (CTM's / VQGAN's "last layer")."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("gan=True needs a network with an nn.Linear output layer (the gradient-norm balance "
                         "uses its weight)")
    return linears[-1].weight


class Discriminator(nn.Module):
    """A small MLP discriminator on flattened samples [B, ...] -> logits [B] (for 2-D toys and 8×8 digits)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        dim = check_positive_int("dim", dim)
        layers, width = [], dim
        for _ in range(check_positive_int("depth", depth) - 1):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1).float()).squeeze(1)


class CTM(Method):
    """Consistency trajectory model (module docstring).

    Args:
        model: the network F_θ, a flowkern two-time network net(x, t, s).
        teacher: a flow-matching velocity network teacher(x, t, t) (required).
        sigma_data: standard deviation of the data, σ_data of the EDM preconditioning (a run value).
        data_dim: features per sample, the discriminator's input width (a run value; required with gan).
        num_scales: points N of the Karras grid (>= 2).
        max_teacher_steps: most teacher Heun steps per target.
        s_min_prob: probability that a pair's s is σ_min (the 1-step jump) rather than uniform on the grid below t.
        target_decay: EMA decay μ of the target network θ⁻, in [0, 1).
        dsm_weight: weight of the denoising (DSM) loss (>= 0; 0 turns it off).
        distance: "l2" (mean squared error) or "pseudo_huber" (c = 0.00054·√dim).
        gan: add the GAN loss (a small MLP discriminator on the samples, last-layer gradient-norm balancing).
        gan_start: first optimizer step with the GAN loss.
        gan_lr: learning rate of the discriminator's Adam.
        sigma_min: smallest noise level σ_min of the grid.
        sigma_max: largest noise level σ_max of the grid.
        rho: exponent ρ of the Karras grid.
        p_mean: mean of the DSM loss's lognormal σ distribution.
        p_std: standard deviation of the DSM loss's lognormal σ distribution.
    """

    name: ClassVar[str] = "ctm"
    model_copies: ClassVar[tuple[str, ...]] = ("target",)
    needs_teacher: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, sigma_data: float,
                 data_dim: int | None = None, num_scales: int = 40, max_teacher_steps: int = 4,
                 s_min_prob: float = 0.0, target_decay: float = 0.99, dsm_weight: float = 0.1,
                 distance: Distance = "l2", gan: bool = False, gan_start: int = 0, gan_lr: float = 2e-4,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                 p_mean: float = -1.2, p_std: float = 1.2):
        if teacher is None:
            raise ValueError("CTM needs a teacher (a flow-matching velocity network)")
        super().__init__(model, teacher=teacher)
        self.sigma_data = check_finite_scalar("sigma_data", sigma_data, positive=True)
        self.num_scales = check_int("num_scales", num_scales, minimum=2)
        self.max_teacher_steps = check_positive_int("max_teacher_steps", max_teacher_steps)
        self.s_min_prob = check_probability("s_min_prob", s_min_prob)
        self.target_decay = check_decay("target_decay", target_decay)
        self.dsm_weight = check_finite_scalar("dsm_weight", dsm_weight)
        if self.dsm_weight < 0:
            raise ValueError(f"dsm_weight must be >= 0, got {self.dsm_weight}")
        self.distance = check_distance(distance)
        self.sigma_min, self.sigma_max, self.rho = check_sigmas(sigma_min, sigma_max, rho)
        self.p_mean = check_finite_scalar("p_mean", p_mean)
        self.p_std = check_finite_scalar("p_std", p_std, positive=True)
        self.gan = check_bool("gan", gan)
        self.gan_start = check_int("gan_start", gan_start, minimum=0)
        self.gan_lr = check_finite_scalar("gan_lr", gan_lr, positive=True)
        self.data_dim = None if data_dim is None else check_positive_int("data_dim", data_dim)
        self.target = frozen_copy(model)
        self.discriminator = None
        if self.gan:
            if self.data_dim is None:
                raise ValueError("gan=True needs data_dim (features per sample) for the discriminator")
            last_linear_weight(model)
            self.discriminator = Discriminator(self.data_dim)

    def auxiliary_networks(self) -> dict[str, Auxiliary]:
        """{"discriminator": ...} with gan=True (Adam, lr = gan_lr, betas (0.5, 0.9)), else none."""
        if not self.gan:
            return {}
        return {"discriminator": Auxiliary(self.discriminator, lr=self.gan_lr, betas=DISCRIMINATOR_BETAS)}

    # ------------------------------------------------------------------------------------------- jumps

    def jump(self, net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
        """G(y, σ_t, σ_s) with this method's σ_data."""
        return ctm_jump(net, y, sigma_t, sigma_s, self.sigma_data)

    def teacher_solve(self, y: Tensor, grid: Tensor, i_from: Tensor, i_to: Tensor) -> Tensor:
        """Teacher Heun steps along the grid from σ_{i_from} down to σ_{i_to} (per sample; i_to ≤ i_from, at most
        max_teacher_steps apart). Step j moves only the rows with more than j steps to go (the teacher sees those
        rows alone, so a batch costs the sum of its segment lengths, not batch × the longest).

        The rows are sorted by segment length once, longest first, so the rows still moving at step j are a prefix
        whose length comes from one histogram of the lengths: one host transfer per call (not a `.nonzero()` per
        step)."""
        with torch.no_grad():
            y = y.to(accumulation_dtype(y.dtype))
            lengths = i_from - i_to
            order = torch.argsort(lengths, descending=True)
            # moving[j] = rows with more than j steps to go = #(length ≥ j + 1)
            moving = torch.bincount(lengths, minlength=1).flip(0).cumsum(0).flip(0)[1:].tolist()
            ys, starts = y[order], i_from[order]
            for j, rows in enumerate(moving):
                a = starts[:rows] - j
                ys[:rows] = heun_step(self.teacher, ys[:rows], grid[a], grid[a - 1])
            return torch.empty_like(ys).index_copy_(0, order, ys)

    def sample_indices(self, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(i_t, i_s, i_u), 0-based ascending-grid indices: i_t ~ U{1..N−1}, i_s ~ U{0..i_t−1} (s < t: at s = t
        G is the identity and the pair carries no signal; i_s = 0 with probability s_min_prob),
        i_u ~ U{max(i_s, i_t − max_teacher_steps)..i_t−1}."""
        n = self.num_scales
        i_t = torch.randint(1, n, (batch,), device=device)
        i_s = (torch.rand(batch, device=device) * i_t.float()).long().clamp(max=i_t - 1)
        if self.s_min_prob > 0:
            i_s = torch.where(torch.rand(batch, device=device) < self.s_min_prob, torch.zeros_like(i_s), i_s)
        lo = torch.maximum(i_s, i_t - self.max_teacher_steps)
        i_u = lo + (torch.rand(batch, device=device) * (i_t - lo).float()).long()
        return i_t, i_s, torch.minimum(i_u, i_t - 1)

    def targets(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(pred, target) of the CTM loss, float32 [B, ...]; pred carries the grad, target none."""
        check_tensor("x0", x0)
        x0 = x0.float()
        batch = x0.shape[0]
        grid = karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho, device=x0.device,
                             dtype=torch.float32)
        i_t, i_s, i_u = self.sample_indices(batch, x0.device)
        s_t, s_s, s_u = grid[i_t], grid[i_s], grid[i_u]
        s_min = torch.full_like(s_t, self.sigma_min)
        y_t = x0 + col(s_t, x0) * torch.randn_like(x0)
        with torch.no_grad():
            y_u = self.teacher_solve(y_t, grid, i_t, i_u)
            with replay_rng(x0.device):      # the grad pass below draws the same dropout masks, call for call
                target = self.jump(self.target, self.jump(self.target, y_u, s_u, s_s), s_s, s_min)
        pred = self.jump(self.target, self.jump(net, y_t, s_t, s_s), s_s, s_min)
        return pred, target

    def dsm_loss(self, net: Callable, x0: Tensor) -> Tensor:
        """λ(σ)·mean‖g_θ(x₀ + σε, σ, σ) − x₀‖², σ ~ lognormal(p_mean, p_std) clamped to [σ_min, σ_max]."""
        x0 = x0.float()
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(x0.shape[0], device=x0.device))
        sigma = sigma.clamp(self.sigma_min, self.sigma_max)
        denoised = ctm_g(net, x0 + col(sigma, x0) * torch.randn_like(x0), sigma, sigma, self.sigma_data)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return (weight * ((denoised - x0) ** 2).reshape(x0.shape[0], -1).mean(1)).mean()

    def gan_terms(self, pred: Tensor, x0: Tensor, ctm_loss: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(λ_GAN·L_GAN, the discriminator's loss, logs). The generator term goes through D (its gradient with
        respect to D's parameters is not taken: the engine back-propagates each loss into its own network); D's
        loss sees the samples detached."""
        disc = self.discriminator
        gen = F.softplus(-disc(pred)).mean()
        w = last_linear_weight(self.model)
        g_ctm = torch.autograd.grad(ctm_loss, w, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gen, w, retain_graph=True)[0]
        lam = (g_ctm.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()
        d_loss = F.softplus(-disc(x0)).mean() + F.softplus(disc(pred.detach())).mean()
        return lam * gen, d_loss, {"gan_weight": lam, "d_loss": d_loss.detach()}

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """The model's loss L_CTM + dsm_weight·L_DSM (+ λ_GAN·L_GAN); with the GAN term active, a dict
        {"model": ..., "discriminator": ...}."""
        pred, target = self.targets(net, x0, step)
        ctm = distance(pred, target, self.distance, default_huber_c(pred)).mean()
        dsm = self.dsm_loss(net, x0) if self.dsm_weight > 0 else torch.zeros((), device=x0.device)
        total = ctm + self.dsm_weight * dsm
        logs = {"ctm": ctm.detach(), "dsm": dsm.detach()}
        if not (self.gan and step >= self.gan_start):
            return total, logs
        gen, d_loss, gan_logs = self.gan_terms(pred, x0.float(), ctm)
        logs.update(gan_logs)
        return {"model": total + gen, "discriminator": d_loss}, logs

    def on_step_end(self, step: int) -> None:
        ema_update_module_(self.target, self.model, self.target_decay)

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """γ = 0 CTM sampling: y = σ_max·noise, then y ← G(y, σ'_i, σ'_{i+1}) along `sampling_sigmas` down to
        σ_min; returns the state at σ_min (≈ data, t = 0) in the dtype of noise."""
        steps = check_sample_args(model, noise, steps)
        acc = accumulation_dtype(noise.dtype)
        sig = sampling_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device=noise.device, dtype=acc)
        batch = noise.shape[0]
        with torch.no_grad():
            y = noise.to(acc) * self.sigma_max
            for a, b in itertools.pairwise(sig):
                y = self.jump(model, y, a.expand(batch), b.expand(batch))
        return y.to(noise.dtype)
