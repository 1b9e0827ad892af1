"""`flowkern.testing`: exact references to test flow-map, likelihood, attention and divergence code against.

Everything here is plain PyTorch maths, independent of the kernels it is meant to check:

* Exact Gaussian flows (`GaussianFlowMap`): for data N(μ, σ²I) under x_t = (1 − t)·x₀ + t·ε, the velocity, the flow
  map Φ(x, t, s), the divergence, the joint log-density rate D and log p_t, all in closed form; the object is itself a
  flow-map model ``model(x, t, s) -> u`` (or (u, D)). `gaussian_velocity`, `gaussian_divergence`,
  `gaussian_log_prob` and `gaussian_joint_flow_map` give the same quantities as plain callables.
* Gaussian mixtures: `gaussian_mixture_velocity` and `gaussian_mixture_log_prob` (at any time t).
* `math_attention`: textbook softmax attention with an explicit score matrix (the oracle for `flowkern.attention`).
* `philox4x32` and `hutchinson_probes_reference`: the counter-based probes of the divergence estimators.

Conventions (docs/conventions.md): t = 0 is data, t = 1 is noise, Φ(x, t, s) = x + (s − t)·u(x, t, s), and a joint
flow map carries the log-density along as ℓ_s = ℓ_t + (s − t)·D. The probes are described in docs/estimators.md.
"""
from __future__ import annotations

import math
import numbers

import torch

from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_finite_scalar, check_int


def math_attention(q, k, v, *, is_causal=False, attn_mask=None, scale=None, enable_gqa=False):
    """Textbook softmax attention with an explicit [B, H, Nq, Nk] score matrix (O(N²) memory).

    Same semantics as `F.scaled_dot_product_attention` with the math backend (top-left causal alignment, bool masks
    keep True, additive masks are added after scaling, GQA by repeating k/v), except that a row with every key
    removed gives 0 (as SDPA's math backend). Differentiable in both modes (`torch.func.jvp`, autograd).
    `enable_gqa` is accepted so one keyword set serves SDPA, `flowkern.attention` and this reference; k/v with fewer
    heads are repeated either way.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if is_causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s), dim=-1)
    return torch.where(empty, 0.0, p) @ v


# ---------------------------------------------------------------------------------------------------------------
# Counter-based probes (the map `kernels/divergence.py` and `csrc/hutchinson.cu` implement), in plain PyTorch.
# ---------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of the 64-bit product a·b, a a 32-bit constant, b an int64 tensor in [0, 2³²).

    Split b into 16-bit halves so no int64 product overflows."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2⁴⁸
    mid = p_hi + (p_lo >> 16)  # < 2⁴⁹
    high = mid >> 16
    low = (((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)) & _MASK32
    return high, low


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32-`rounds` (Salmon et al. 2011, Random123) on int64 tensors holding uint32 values.

    Returns the four output words as int64 tensors in [0, 2³²). Matches `tl.philox` and Random123's known answers.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def hutchinson_probes_reference(seed: int, stream: int, probes: int, batch: int, dim: int,
                                distribution: str = "rademacher") -> torch.Tensor:
    """The [probes, batch, dim] probes of `kernels/divergence.py`, in float64 (Box–Muller in float64)."""
    i = torch.arange(dim, dtype=torch.int64)
    b = torch.arange(batch, dtype=torch.int64)[:, None]
    k = torch.arange(probes, dtype=torch.int64)[:, None, None]
    words = philox4x32(i >> 2, b, k, torch.tensor(stream), seed & _MASK32, (seed >> 32) & _MASK32)
    lane = (i & 3).expand(probes, batch, dim)
    if distribution == "rademacher":
        w = torch.stack(words, -1).gather(-1, lane[..., None])[..., 0]
        return torch.where((w >> 31) == 0, 1.0, -1.0).to(torch.float64)
    u = [((w >> 8).to(torch.float64) + 0.5) * 2.0 ** -24 for w in words]
    ra, rb = torch.sqrt(-2 * torch.log(u[0])), torch.sqrt(-2 * torch.log(u[2]))
    ta, tb = 2 * torch.pi * u[1], 2 * torch.pi * u[3]
    normals = torch.stack([ra * torch.cos(ta), ra * torch.sin(ta), rb * torch.cos(tb), rb * torch.sin(tb)], -1)
    return normals.gather(-1, lane[..., None])[..., 0]


# ---------------------------------------------------------------------------------------------------------------
# Closed-form ground truth (docs/conventions.md): Gaussian data and Gaussian mixtures under x_t = (1 − t)·x₀ + t·ε.
# ---------------------------------------------------------------------------------------------------------------


def _scale(t: torch.Tensor, sigma):
    """(s_t, ṡ_t) with s_t = √((1 − t)²σ² + t²), the standard deviation of x_t for data of standard deviation σ."""
    s = torch.sqrt((1 - t) ** 2 * sigma ** 2 + t ** 2)
    return s, (t - (1 - t) * sigma ** 2) / s


def _normal_log_density(sq_dist: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """log N(x; m, scale²·I) in `dim` dimensions from sq_dist = ‖x − m‖²."""
    return -0.5 * sq_dist / scale ** 2 - dim * torch.log(scale) - 0.5 * dim * math.log(2 * math.pi)


class GaussianFlowMap:
    """The exact flow map of data N(μ, σ²I) under x_t = (1 − t)·x₀ + t·ε, and a flow-map model with that answer.

    p_t = N(m_t, s_t²·I) with m_t = (1 − t)·μ and s_t = √((1 − t)²σ² + t²), ṡ_t = (t − (1 − t)σ²)/s_t; then

        Φ(x, t, s) = m_s + (s_s/s_t)·(x − m_t),      v(x, t) = −μ + (ṡ_t/s_t)·(x − m_t),
        div v = dim·ṡ_t/s_t,                        D(x, t, s) = −(1/(s − t))·∫_t^s div v dτ = −dim·log(s_s/s_t)/(s − t),
        log p_t(x) = log N(x; m_t, s_t²·I).

    The average velocity u = (Φ − x)/(s − t) is evaluated without cancellation: with
    a = ((s + t) − σ²(2 − s − t))/s_t², s_s² = s_t²·(1 + (s − t)·a), so (s_s/s_t − 1)/(s − t) = a/(1 + s_s/s_t) and

        u = −μ + (x − m_t)·a/(1 + s_s/s_t),      D = −(dim/2)·log1p((s − t)·a)/(s − t),

    both continuous at s = t, where u = v and D = −div v. Every method computes in float64 and returns float64.

    Args:
        mu: the data mean, a number or a tensor shaped like one sample (it broadcasts against x[0]).
        sigma: the data standard deviation σ > 0.
        joint: calling the object returns (u, D) instead of u.
    Calling ``flow(x, t, s)`` (x: [B, ...], t, s: [B]) returns u in the dtype of x; with ``joint=True`` the pair
    (u, D) with D [B] in float32 (float64 for float64 x): a model for `flowkern.flow_map` and `flowkern.likelihood`.
    """

    def __init__(self, mu=0.0, sigma=1.0, *, joint: bool = False):
        if not isinstance(mu, torch.Tensor):
            check_finite_scalar("mu", mu)
        elif not mu.is_floating_point():
            raise TypeError(f"mu must be a floating-point tensor or a number, got {mu.dtype}")
        if isinstance(sigma, torch.Tensor) and sigma.dim() == 0:
            sigma = sigma.item()
        self.mu = mu
        self.sigma = check_finite_scalar("sigma", sigma, positive=True)
        self.joint = check_bool("joint", joint)

    def _mu(self, x: torch.Tensor) -> torch.Tensor:
        mu = torch.as_tensor(self.mu, dtype=torch.float64, device=x.device)
        return mu.expand(x.shape[1:]) if mu.dim() else mu

    @staticmethod
    def _times(t, x: torch.Tensor) -> torch.Tensor:
        """A number, 0-d or [B] tensor of times -> [B] float64."""
        if isinstance(t, numbers.Real):
            return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
        return t.to(device=x.device, dtype=torch.float64).expand(x.shape[0])

    @staticmethod
    def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape((-1,) + (1,) * (x.dim() - 1))

    def _centred(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x − m_t in float64."""
        return x.to(torch.float64) - (1 - self._col(t, x)) * self._mu(x)

    def scale(self, t) -> torch.Tensor:
        """s_t = √((1 − t)²σ² + t²), elementwise over t (float64)."""
        return _scale(torch.as_tensor(t, dtype=torch.float64), self.sigma)[0]

    def _a(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return ((s + t) - self.sigma ** 2 * (2 - s - t)) / self.scale(t) ** 2

    def phi(self, x, t, s) -> torch.Tensor:
        """Φ(x, t, s) = m_s + (s_s/s_t)·(x − m_t)."""
        t, s = self._times(t, x), self._times(s, x)
        ratio = self._col(self.scale(s) / self.scale(t), x)
        return (1 - self._col(s, x)) * self._mu(x) + ratio * self._centred(x, t)

    def velocity(self, x, t, s) -> torch.Tensor:
        """The average velocity u(x, t, s) = (Φ(x, t, s) − x)/(s − t); v(x, t) at s = t."""
        t, s = self._times(t, x), self._times(s, x)
        coef = self._a(t, s) / (1 + self.scale(s) / self.scale(t))
        return -self._mu(x) + self._col(coef, x) * self._centred(x, t)

    def divergence(self, x, t) -> torch.Tensor:
        """div v(x, t) = dim·ṡ_t/s_t, [B]."""
        t = self._times(t, x)
        s_t, ds_t = _scale(t, self.sigma)
        return x[0].numel() * ds_t / s_t

    def log_rate(self, x, t, s) -> torch.Tensor:
        """D(x, t, s) = −dim·log(s_s/s_t)/(s − t), [B]; −div v(x, t) at s = t."""
        t, s = self._times(t, x), self._times(s, x)
        h = s - t
        a = self._a(t, s)
        safe = torch.where(h == 0, torch.ones_like(h), h)
        rate = torch.where(h == 0, a, torch.log1p(h * a) / safe)
        return -0.5 * x[0].numel() * rate

    def log_prob(self, x, t) -> torch.Tensor:
        """log p_t(x) = log N(x; m_t, s_t²·I), [B]."""
        t = self._times(t, x)
        sq = self._centred(x, t).reshape(x.shape[0], -1).square().sum(1)
        return _normal_log_density(sq, self.scale(t), x[0].numel())

    def __call__(self, x, t, s):
        u = self.velocity(x, t, s).to(x.dtype)
        if not self.joint:
            return u
        return u, self.log_rate(x, t, s).to(accumulation_dtype(x.dtype))


def gaussian_velocity(mu, sigma: float):
    """v(x, t) of data N(μ, σ²I) (`GaussianFlowMap.velocity` at s = t), in the dtype of x."""
    flow = GaussianFlowMap(mu, sigma)
    return lambda x, t: flow.velocity(x, t, t).to(x.dtype)


def gaussian_divergence(sigma: float, dim: int):
    """div v(x, t) = dim·ṡ_t/s_t, [B] in the dtype of x, for `dim`-dimensional samples x [B, dim]."""
    flow = GaussianFlowMap(0.0, sigma)
    dim = check_int("dim", dim, minimum=1)

    def div(x, t):
        if x[0].numel() != dim:
            raise ValueError(f"x must hold samples of {dim} elements, got shape {tuple(x.shape)}")
        return flow.divergence(x, t).to(x.dtype)

    return div


def gaussian_log_prob(x, mu, sigma: float, t: float = 0.0):
    """log p_t(x) = log N(x; (1 − t)μ, s_t²·I) per sample, in the dtype of x."""
    return GaussianFlowMap(mu, sigma).log_prob(x, t).to(x.dtype)


def gaussian_joint_flow_map(mu, sigma: float) -> GaussianFlowMap:
    """The exact joint flow map (u, D) of data N(μ, σ²I): ``GaussianFlowMap(mu, sigma, joint=True)``."""
    return GaussianFlowMap(mu, sigma, joint=True)


def _mixture_components(x, t, means, sigmas):
    """Per-component x − m_k(t) [B, K, d] and (s_k, ṡ_k) [B, K] of Σ_k w_k N(μ_k, σ_k² I) at time t."""
    tc = t.to(x.dtype)[:, None] if isinstance(t, torch.Tensor) else torch.full((x.shape[0], 1), float(t),
                                                                                 dtype=x.dtype, device=x.device)
    s, ds = _scale(tc, sigmas)
    return x[:, None, :] - (1 - tc)[:, :, None] * means, s, ds


def _mixture_log_joint(weights, diff, s):
    """log(w_k·N(x; m_k, s_k² I)) [B, K]."""
    return torch.log(weights) + _normal_log_density(diff.square().sum(-1), s, diff.shape[-1])


def gaussian_mixture_velocity(weights, means, sigmas):
    """v(x, t) = Σ_k r_k(x, t)·[−μ_k + (ṡ_k/s_k)(x − m_k)] for the mixture Σ_k w_k N(μ_k, σ_k² I) in R^d.

    weights [K], means [K, d], sigmas [K]; x [B, d], t [B]; m_k = (1 − t)μ_k, s_k = √((1 − t)²σ_k² + t²), and
    r_k ∝ w_k N(x; m_k, s_k² I) is the posterior of the component.
    """
    def v(x, t):
        diff, s, ds = _mixture_components(x, t, means, sigmas)
        r = torch.softmax(_mixture_log_joint(weights, diff, s), dim=1)  # [B, K]
        comp = -means + (ds / s)[:, :, None] * diff  # [B, K, d]
        return (r[:, :, None] * comp).sum(1)

    return v


def gaussian_mixture_log_prob(x, weights, means, sigmas, t=0.0):
    """log p_t(x) = log Σ_k w_k N(x; (1 − t)μ_k, s_k² I) per sample, x [B, d], t a number or [B] (default 0: data)."""
    diff, s, _ = _mixture_components(x, t, means, sigmas)
    return torch.logsumexp(_mixture_log_joint(weights, diff, s), dim=1)
