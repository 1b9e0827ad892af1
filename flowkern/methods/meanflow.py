"""MeanFlow (Geng et al., 2025): a one-step generator trained from data through the MeanFlow identity.

flowkern's network is the average velocity u(x, t, s) with Φ(x, t, s) = x + (s − t)·u (docs/conventions.md); the
paper's (t, r) is (t, s) with s = r ≤ t. The average velocity u(z_t, t, r) = (1/(t − r))·∫_r^t v(z_τ, τ) dτ satisfies

    u(z_t, t, r) = v(z_t, t) − (t − r)·du/dt,     du/dt = ∂_z u·v + ∂_t u     (the total derivative along the ODE)

so, with z_t = (1 − t)·x₀ + t·ε and v = ε − x₀,

    u_tgt = sg(ṽ − (t − r)·du/dt),   du/dt = JVP of u at (z_t, t, r) along (ṽ, 1, 0)
    loss  = E w·‖u(z_t, t, r) − u_tgt‖²,  w = 1/sg(‖Δ‖² + c)^p,  Δ = u − u_tgt  (‖·‖² summed over a sample's elements)

with ṽ = v without guidance. (t, r): two logit-normal draws, t = max, r = min, then r = t on a fraction of the rows
(plain flow matching there: the target is ṽ). Times enter the network as they are, in [0, 1].

Classifier-free guidance folded into the target (num_classes > 0, labels given to `loss`): for t in the guidance
interval
    ṽ = ω·v + κ·u(z_t, t, t | c) + (1 − ω − κ)·u(z_t, t, t | ∅)      (no-grad passes of the network on the diagonal)
and ṽ = v elsewhere; a `label_dropout` fraction of rows is trained on the null class ∅ (label index num_classes)
with ṽ = v, so u(· | ∅) learns the unconditional velocity.

Sampling: Φ along a uniform schedule, x ← x + (t_{i+1} − t_i)·u(x, t_i, t_{i+1}); one step is x₀ = ε − u(ε, 1, 0).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import flowkern
from flowkern._nvtx import nvtx_range
from flowkern._validate import check_finite_scalar, check_int
from flowkern.methods._util import JVP_FORMS, check_choice, check_probability
from flowkern.methods.base import Method
from flowkern.methods.coupling import (DEFAULT_BLOCK, Coupling, NoisePairing, check_coupling, check_noise,
                                      noise_pairing, paired_noise)
from flowkern.methods.flow_matching import interpolate, logit_normal


def mean_flow_times(n: int, *, mean: float, std: float, equal_fraction: float, device=None) -> tuple[Tensor, Tensor]:
    """(t, r) float32 [n]: two logit-normal draws, t = max, r = min; the first ⌊n·equal_fraction⌋ rows get r = t
    (the rows are exchangeable, so which rows does not matter)."""
    a = logit_normal(n, mean=mean, std=std, device=device)
    b = logit_normal(n, mean=mean, std=std, device=device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.arange(n, device=device) < int(n * equal_fraction)
    return t, torch.where(equal, t, r)


class LabelledFlowMap(nn.Module):
    """u(x, t, s) := model(x, t, s, y=labels): a class-conditional network seen as a plain flow map (the sampler)."""

    def __init__(self, model: nn.Module, labels: Tensor):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x, t, s):
        return self.model(x, t, s, y=self.labels)


class MeanFlow(Method):
    """MeanFlow: u(z_t, t, r) regressed on sg(ṽ − (t − r)·du/dt), adaptively weighted (module docstring).

    Args:
        t_mean: mean of the two logit-normal time draws (t = max, r = min).
        t_std: standard deviation of the logit-normal time draws (> 0).
        equal_fraction: fraction of the rows with r = t (flow-matching rows), in [0, 1].
        weight_power: p of the adaptive weight 1/sg(‖Δ‖² + c)^p (>= 0; 0: plain squared error, whose fixed point
            is the exact flow map; the paper uses 1 on images).
        weight_eps: c of the adaptive weight (> 0).
        jvp: "one_pass": u and du/dt from one forward with grad (flowkern.jvp(grad=True)); "two_pass": a no-grad
            JVP pass, then a grad pass (same loss and gradients, one forward more).
        num_classes: classes of a class-conditional network (0: unconditional); the network takes y= labels, the
            null class is index num_classes.
        cfg_scale: guidance scale ω folded into the target (1: no guidance).
        cfg_kappa: weight κ of the conditional velocity u(z_t, t, t | c) in the guided target (0: none).
        cfg_t_min: the guidance applies for t in [cfg_t_min, cfg_t_max] (in [0, 1]).
        cfg_t_max: upper end of the guidance interval (in [0, 1], >= cfg_t_min).
        label_dropout: fraction of the rows trained on the null class (unconditional velocity), in [0, 1].
        coupling: pairing of data and noise in a batch, "ot" (minibatch optimal transport,
            `flowkern.methods.coupling`, within each class when conditional: straighter paths, the flow map of the
            coupled process) or "independent" (the paper's).
        coupling_block: rows per minibatch-OT block.
    """

    name = "meanflow"
    # the time-embedding scale of the network `flowkern train` builds: times enter as they are, in [0, 1], and the
    # sinusoids are scaled by 10 instead of DiT's 1000 (which multiplies the ∂u/∂t part of the target by 1000)
    network_time_scale = 10.0

    def __init__(self, model: nn.Module, *, t_mean: float = -0.4, t_std: float = 1.0, equal_fraction: float = 0.75,
                 weight_power: float = 0.0, weight_eps: float = 1e-3, jvp: JVP_FORMS = "one_pass",
                 num_classes: int = 0, cfg_scale: float = 1.0, cfg_kappa: float = 0.0,
                 cfg_t_min: float = 0.0, cfg_t_max: float = 1.0, label_dropout: float = 0.1,
                 coupling: Coupling = "ot", coupling_block: int = DEFAULT_BLOCK):
        super().__init__(model)
        self.t_mean = check_finite_scalar("t_mean", t_mean)
        self.t_std = check_finite_scalar("t_std", t_std, positive=True)
        self.equal_fraction = check_probability("equal_fraction", equal_fraction)
        self.weight_power = check_finite_scalar("weight_power", weight_power)
        if self.weight_power < 0:
            raise ValueError(f"weight_power must be >= 0, got {self.weight_power}")
        self.weight_eps = check_finite_scalar("weight_eps", weight_eps, positive=True)
        self.jvp = check_choice("jvp", jvp, JVP_FORMS)
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        self.cfg_scale = check_finite_scalar("cfg_scale", cfg_scale)
        self.cfg_kappa = check_finite_scalar("cfg_kappa", cfg_kappa)
        self.cfg_t_min = check_probability("cfg_t_min", cfg_t_min)
        self.cfg_t_max = check_probability("cfg_t_max", cfg_t_max)
        if self.cfg_t_min > self.cfg_t_max:
            raise ValueError(f"cfg_t_max must be >= cfg_t_min, got cfg_t_min={self.cfg_t_min}, "
                             f"cfg_t_max={self.cfg_t_max}")
        self.label_dropout = check_probability("label_dropout", label_dropout)
        self.coupling = check_coupling(coupling)
        self.coupling_block = check_int("coupling_block", coupling_block, minimum=1)

    # -- the pieces of one step -----------------------------------------------------------------------------------
    def _labels(self, labels, x0: Tensor) -> Tensor | None:
        if labels is None:
            if self.num_classes:
                raise ValueError(f"labels are required: the method was built with num_classes={self.num_classes}")
            return None
        if not self.num_classes:
            raise ValueError("labels were given but the method has num_classes=0 (unconditional)")
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an integer tensor, got "
                            f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
        if labels.shape != (x0.shape[0],) or labels.device != x0.device:
            raise ValueError(f"labels must have shape [{x0.shape[0]}] on {x0.device}, got {tuple(labels.shape)} "
                             f"on {labels.device}")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return labels.long()

    def guided_velocity(self, z: Tensor, t: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        """ṽ = ω·v + κ·u(z, t, t | c) + (1 − ω − κ)·u(z, t, t | ∅) for t in the guidance interval, else v
        (no-grad passes of self.model; their dropout draws are rewound, so the grad pass sees the step's RNG)."""
        omega, kappa = self.cfg_scale, self.cfg_kappa
        if omega == 1.0 and kappa == 0.0:
            return v
        shape = (-1,) + (1,) * (v.dim() - 1)
        inside = ((t >= self.cfg_t_min) & (t <= self.cfg_t_max)).view(shape)
        null = torch.full_like(labels, self.num_classes)
        with torch.no_grad(), torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
            guided = (1 - omega - kappa) * _first(self.model(z, t, t, y=null)).to(v.dtype) + omega * v
            if kappa:
                guided = guided + kappa * _first(self.model(z, t, t, y=labels)).to(v.dtype)
        return torch.where(inside, guided, v)

    def targets(self, x0: Tensor, labels: Tensor | None = None, noise: Tensor | None = None):
        """(z_t, t, r, ṽ, y): the interpolant, float32 times [B] (r ≤ t), the (guided) velocity in x0's dtype and
        the network's labels (None unconditional; the null class on the dropped rows). All random draws of the
        step happen here, before any network pass; noise: ε paired with x0 (None: drawn here, `noise`)."""
        labels = self._labels(labels, x0)
        n = x0.shape[0]
        t, r = mean_flow_times(n, mean=self.t_mean, std=self.t_std, equal_fraction=self.equal_fraction,
                               device=x0.device)
        eps = self.noise(x0, labels) if check_noise(noise, x0) is None else noise
        z, v = interpolate(x0, eps, t), eps - x0
        if labels is None:
            return z, t, r, v, None
        dropped = torch.rand(n, device=x0.device) < self.label_dropout
        v_tilde = self.guided_velocity(z, t, v, labels)
        v_tilde = torch.where(dropped.view((-1,) + (1,) * (v.dim() - 1)), v, v_tilde)
        return z, t, r, v_tilde, torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def noise(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """ε ~ N(0, I) paired with x0 by `coupling` (within each class when conditional, `paired_noise`)."""
        return paired_noise(x0, self.coupling, self.coupling_block, labels)

    def noise_pairing(self) -> NoisePairing | None:
        return noise_pairing(self.coupling, self.coupling_block)

    def prediction_and_target(self, net, z, t, r, v, y):
        """(u, u_tgt): u differentiable, u_tgt = sg(v − (t − r)·du/dt) with du/dt along (v, 1, 0)."""
        kwargs = {} if y is None else {"y": y}
        tangents = (v, torch.ones_like(t), torch.zeros_like(r))
        if self.jvp == "one_pass":
            u, dudt = flowkern.jvp(net, (z, t, r), tangents, kwargs=kwargs, grad=True)
        else:
            _, dudt = flowkern.jvp(net, (z, t, r), tangents, kwargs=kwargs)
            u = net(z, t, r, **kwargs)
        u, dudt = _first(u), _first(dudt)
        shape = (-1,) + (1,) * (v.dim() - 1)
        target = (v.float() - (t - r).view(shape) * dudt.float()).detach()
        return u, target

    def loss(self, net, x0, step, labels: Tensor | None = None, noise: Tensor | None = None):
        """The adaptively weighted MeanFlow loss of a batch (labels: class indices for num_classes > 0; noise: ε
        paired with x0, within each class when conditional, None: drawn here)."""
        with nvtx_range("flowkern.train.targets"):
            z, t, r, v, y = self.targets(x0, labels, noise)
        u, target = self.prediction_and_target(net, z, t, r, v, y)
        sq = (u.float() - target).square().flatten(1).sum(1)
        weight = (sq.detach() + self.weight_eps).pow(-self.weight_power)
        loss = (weight * sq).mean()
        return loss, {"mse": sq.detach().mean() / x0[0].numel(), "weight_mean": weight.mean()}

    def sample(self, model, noise, steps, labels: Tensor | None = None):
        """x₀ from noise in `steps` jumps of Φ on the uniform schedule (1 step: ε − u(ε, 1, 0)); labels: class
        indices of a class-conditional model (None: the null class)."""
        from flowkern.flow_map import sample

        if labels is not None:
            model = LabelledFlowMap(model, self._labels(labels, noise))
        return sample(model, noise, steps=steps)


def _first(out):
    """u of a network returning u or (u, D)."""
    return out[0] if isinstance(out, tuple) else out
