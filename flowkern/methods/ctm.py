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
* GAN (optional, off by default): a small MLP discriminator on the samples; the generator term −log D(pred)
  (non-saturating) is weighted by the last-layer gradient-norm ratio
  λ_GAN = ‖∇_{w_L} L_CTM‖/(‖∇_{w_L} L_GAN‖ + 1e-4) (w_L = the weight of the network's last nn.Linear), clamped
  to [0, 1e4]; the discriminator takes its own Adam step inside `loss` (logistic loss, real = x₀, fake = sg pred)
  from step `gan_start` on.
Sampling: deterministic (γ = 0) jumps G along the Karras grid from σ_max to σ_min, from flowkern noise.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkern._validate import check_bool, check_finite_scalar, check_int, check_tensor
from flowkern.methods._util import check_decay, check_positive_int, frozen_copy, replay_rng, update_ema
from flowkern.methods.base import Method
from flowkern.methods.edm import (
    NUM_SCALES_OPTION,
    RHO,
    SIGMA_DATA,
    SIGMA_DATA_OPTION,
    SIGMA_MAX,
    SIGMA_MIN,
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
    time_dtype,
)


def ctm_g(net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor, sigma_data: float) -> Tensor:
    """g_θ(y, σ_t, σ_s) = c_skip(σ_t)·y + c_out(σ_t)·net(c_in(σ_t)·y, t(σ_t), t(σ_s)) (EDM scalings)."""
    return precondition(net, y, sigma_t, sigma_to_t(sigma_s), denoiser_scalings(sigma_t, sigma_data))


def ctm_jump(net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor, sigma_data: float) -> Tensor:
    """G_θ(y, σ_t, σ_s) = (σ_s/σ_t)·y + (1 − σ_s/σ_t)·g_θ, done in flowkern coordinates as the DDIM jump
    `edm.ddim_jump(y/(1 + σ_t), g, t, s)·(1 + σ_s)`. y: [B, ...] (EDM state), σ_t ≥ σ_s > 0: [B]."""
    acc = time_dtype(y)
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


def _mean_over_ranks(grads):
    """The discriminator's gradients averaged over the DDP ranks (its step happens inside `loss`, outside the DDP
    wrapper, so the all-reduce is explicit; every rank then takes the same step and the copies stay equal)."""
    from flowkern.train.distributed import mean_over_ranks  # flowkern.train imports the methods

    flat = mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
    return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]


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
        num_scales: N, points of the Karras grid.
        max_teacher_steps: most teacher Heun steps k per target.
        s_min_prob: probability that a pair's s is σ_min (else s ~ U{1..i_t − 1} on the grid).
        target_decay: μ of the EMA target network θ⁻.
        dsm_weight: weight of the DSM loss.
        distance: 'l2' or 'pseudo_huber'.
        gan, gan_start, gan_lr, data_dim: the optional GAN term (data_dim = features per sample, for the
            discriminator; required with gan=True).
        sigma_min, sigma_max, rho, sigma_data: EDM constants.
    """

    name: ClassVar[str] = "ctm"
    needs_teacher: ClassVar[bool] = True
    OPTIONS: ClassVar[dict] = {
        "num_scales": NUM_SCALES_OPTION,
        "max_teacher_steps": (int, 4, "most teacher Heun steps per target"),
        "s_min_prob": (float, 0.0, "probability that a pair's s is σ_min (the 1-step jump) rather than uniform on "
                                   "the grid below t"),
        "target_decay": (float, 0.99, "EMA decay of the target network (CTM's ImageNet runs: 0.999, for long runs; "
                                      "a few thousand steps need a faster target)"),
        "dsm_weight": (float, 0.1, "weight of the denoising (DSM) loss (the class's default is the paper's 1.0; with "
                                   "the l2 distance on raw coordinates the EDM-weighted DSM term is ~100× the CTM "
                                   "term and crowds it out: 1-step SW2 on 8 Gaussians 0.113 at 1.0, 0.077 at 0.1)"),
        "gan": (bool, False, "add the GAN loss (a small MLP discriminator, last-layer gradient-norm balancing)"),
        "gan_start": (int, 0, "first optimizer step with the GAN loss"),
        "sigma_data": SIGMA_DATA_OPTION,
    }

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, num_scales: int = 18,
                 max_teacher_steps: int = 4, s_min_prob: float = 0.0, target_decay: float = 0.999,
                 dsm_weight: float = 1.0,
                 distance: str = "l2", gan: bool = False, gan_start: int = 0, gan_lr: float = 2e-4,
                 data_dim: int | None = None, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO, sigma_data: float = SIGMA_DATA, p_mean: float = -1.2, p_std: float = 1.2):
        if teacher is None:
            raise ValueError("CTM needs a teacher (a flow-matching velocity network)")
        super().__init__(model, teacher=teacher)
        self.num_scales = check_int("num_scales", num_scales, minimum=2)
        self.max_teacher_steps = check_positive_int("max_teacher_steps", max_teacher_steps)
        self.s_min_prob = check_finite_scalar("s_min_prob", s_min_prob)
        if not 0 <= self.s_min_prob <= 1:
            raise ValueError(f"s_min_prob must be in [0, 1], got {self.s_min_prob}")
        self.target_decay = check_decay("target_decay", target_decay)
        self.dsm_weight = check_finite_scalar("dsm_weight", dsm_weight)
        if self.dsm_weight < 0:
            raise ValueError(f"dsm_weight must be >= 0, got {self.dsm_weight}")
        self.distance = check_distance(distance)
        self.sigma_min, self.sigma_max, self.rho = check_sigmas(sigma_min, sigma_max, rho)
        self.sigma_data = check_finite_scalar("sigma_data", sigma_data, positive=True)
        self.p_mean = check_finite_scalar("p_mean", p_mean)
        self.p_std = check_finite_scalar("p_std", p_std, positive=True)
        self.gan = check_bool("gan", gan)
        self.gan_start = check_int("gan_start", gan_start, minimum=0)
        self.gan_lr = check_finite_scalar("gan_lr", gan_lr, positive=True)
        self.target = frozen_copy(model)
        self.discriminator = None
        if self.gan:
            if data_dim is None:
                raise ValueError("gan=True needs data_dim (features per sample) for the discriminator")
            last_linear_weight(model)
            self.discriminator = Discriminator(check_positive_int("data_dim", data_dim))
            self._d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.gan_lr, betas=(0.5, 0.9))

    # ------------------------------------------------------------------------------------------- jumps

    def jump(self, net: Callable, y: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
        """G(y, σ_t, σ_s) with this method's σ_data."""
        return ctm_jump(net, y, sigma_t, sigma_s, self.sigma_data)

    def teacher_solve(self, y: Tensor, grid: Tensor, i_from: Tensor, i_to: Tensor) -> Tensor:
        """Teacher Heun steps along the grid from σ_{i_from} down to σ_{i_to} (per sample; i_to ≤ i_from, at most
        max_teacher_steps apart). Step j moves only the rows with more than j steps to go (the teacher sees those
        rows alone, so a batch costs the sum of its segment lengths, not batch × the longest)."""
        with torch.no_grad():
            y = y.to(time_dtype(y))
            for j in range(int((i_from - i_to).max())):
                rows = (i_from - j > i_to).nonzero().squeeze(1)
                a = i_from[rows] - j
                y = y.index_copy(0, rows, heun_step(self.teacher, y[rows], grid[a], grid[a - 1]))
        return y

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

    def _gan_terms(self, pred: Tensor, x0: Tensor, ctm_loss: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Generator term λ_GAN·L_GAN (discriminator parameters frozen in it) and one discriminator Adam step."""
        disc = self.discriminator
        frozen = {k: v.detach().clone() for k, v in disc.named_parameters()}  # the D step below is in place
        gen = F.softplus(-torch.func.functional_call(disc, frozen, (pred,))).mean()
        w = last_linear_weight(self.model)
        g_ctm = torch.autograd.grad(ctm_loss, w, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gen, w, retain_graph=True)[0]
        lam = (g_ctm.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()
        with torch.enable_grad():
            d_loss = F.softplus(-disc(x0)).mean() + F.softplus(disc(pred.detach())).mean()
            grads = torch.autograd.grad(d_loss, list(disc.parameters()))
        for p, g in zip(disc.parameters(), _mean_over_ranks(grads)):
            p.grad = g
        self._d_opt.step()
        self._d_opt.zero_grad(set_to_none=True)
        return lam * gen, {"gan_weight": float(lam), "d_loss": float(d_loss.detach())}

    @classmethod
    def option_values(cls, args) -> dict:
        values = super().option_values(args)
        if values["gan"]:   # the discriminator's input width: `flowkern train` sets data_dim from the dataset
            values["data_dim"] = getattr(args, "data_dim", None)
        return values

    def get_extra_state(self) -> dict:
        """The discriminator's optimiser state, so that `state_dict()` (the training checkpoint) resumes it."""
        return {"d_opt": self._d_opt.state_dict()} if self.gan else {}

    def set_extra_state(self, state: dict) -> None:
        if self.gan and state.get("d_opt") is not None:
            self._d_opt.load_state_dict(state["d_opt"])

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        pred, target = self.targets(net, x0, step)
        ctm = distance(pred, target, self.distance, default_huber_c(pred)).mean()
        dsm = self.dsm_loss(net, x0) if self.dsm_weight > 0 else torch.zeros((), device=x0.device)
        total = ctm + self.dsm_weight * dsm
        stats = {"ctm": float(ctm.detach()), "dsm": float(dsm.detach())}
        if self.gan and step >= self.gan_start:
            gan, gan_stats = self._gan_terms(pred, x0.float(), ctm)
            total = total + gan
            stats.update(gan_stats)
        return total, stats

    def on_step_end(self, step: int) -> None:
        update_ema(self.target, self.model, self.target_decay)

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """γ = 0 CTM sampling: y = σ_max·noise, then y ← G(y, σ'_i, σ'_{i+1}) along `sampling_sigmas` down to
        σ_min; returns the state at σ_min (≈ data, t = 0) in the dtype of noise."""
        steps = check_sample_args(model, noise, steps)
        acc = time_dtype(noise)
        sig = sampling_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device=noise.device, dtype=acc)
        batch = noise.shape[0]
        with torch.no_grad():
            y = noise.to(acc) * self.sigma_max
            for a, b in itertools.pairwise(sig):
                y = self.jump(model, y, a.expand(batch), b.expand(batch))
        return y.to(noise.dtype)
