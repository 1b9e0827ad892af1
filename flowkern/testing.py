"""Independent references for tests and benchmarks (plain PyTorch, no flowkern code)."""
from __future__ import annotations

import math

import torch


def math_attention(q, k, v, *, causal=False, attn_mask=None, scale=None):
    """Textbook softmax attention with an explicit [B, H, Nq, Nk] score matrix (O(N²) memory).

    Same semantics as `F.scaled_dot_product_attention` with the math backend (top-left causal alignment, bool masks
    keep True, additive masks are added after scaling, GQA by repeating k/v), except that a row with every key
    removed gives 0 instead of NaN. Differentiable in both modes (`torch.func.jvp`, autograd).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if causal:
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
# Closed-form ground truth (METHODS.md §3): Gaussian data and Gaussian mixtures under x_t = (1 − t)·x₀ + t·ε.
# Time t is a [B] tensor; t = 0 is data, t = 1 is noise.
# ---------------------------------------------------------------------------------------------------------------


def _tcol(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _scale(t, sigma):
    """s_t = √((1 − t)²σ² + t²) and its time derivative."""
    s = torch.sqrt((1 - t) ** 2 * sigma ** 2 + t ** 2)
    return s, (t - (1 - t) * sigma ** 2) / s


def gaussian_velocity(mu, sigma: float):
    """v(x, t) = ṁ_t + (ṡ_t/s_t)(x − m_t) for data N(μ, σ²I), m_t = (1 − t)μ (μ broadcasts against one sample)."""
    def v(x, t):
        tc = _tcol(t, x)
        s, ds = _scale(tc, sigma)
        return -mu + ds / s * (x - (1 - tc) * mu)

    return v


def gaussian_divergence(sigma: float, dim: int):
    """div v = dim·ṡ_t/s_t, [B]."""
    def div(x, t):
        s, ds = _scale(t.to(x.dtype), sigma)
        return dim * ds / s

    return div


def gaussian_log_prob(x, mu, sigma: float, t: float = 0.0):
    """log p_t(x) = log N(x; (1 − t)μ, s_t² I) per sample."""
    s = math.sqrt((1 - t) ** 2 * sigma ** 2 + t ** 2)
    z = (x - (1 - t) * mu).flatten(1) / s
    d = z.shape[1]
    return -0.5 * (z ** 2).sum(1) - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)


def gaussian_joint_flow_map(mu, sigma: float):
    """The exact joint flow map (u, D) of Gaussian data: Φ(x, t, s) = m_s + (s_s/s_t)(x − m_t), u = (Φ − x)/(s − t),
    D = −(1/(s − t))∫_t^s div v = −dim·(log s_s − log s_t)/(s − t); at s = t, u = v and D = −div v."""
    vel = gaussian_velocity(mu, sigma)

    def model(x, t, s):
        tc, sc = _tcol(t, x), _tcol(s, x)
        st, dst = _scale(tc, sigma)
        ss, _ = _scale(sc, sigma)
        dim = x[0].numel()
        same = (sc == tc)
        gap = torch.where(same, torch.ones_like(sc), sc - tc)
        phi = (1 - sc) * mu + ss / st * (x - (1 - tc) * mu)
        u = torch.where(same, vel(x, t), (phi - x) / gap)
        d = torch.where(same, -dim * dst / st, -dim * (torch.log(ss) - torch.log(st)) / gap)
        return u, d.reshape(-1)

    return model


def gaussian_mixture_velocity(weights, means, sigmas):
    """v(x, t) = Σ_k r_k(x, t)·[ṁ_k + (ṡ_k/s_k)(x − m_k)] for the mixture Σ_k w_k N(μ_k, σ_k² I) in R^d.

    weights [K], means [K, d], sigmas [K]; x [B, d]; r_k ∝ w_k N(x; (1 − t)μ_k, s_k² I) (posterior of the component).
    """
    logw = torch.log(weights)

    def v(x, t):
        tc = t.to(x.dtype)[:, None]  # [B, 1]
        s = torch.sqrt((1 - tc) ** 2 * sigmas ** 2 + tc ** 2)  # [B, K]
        ds = (tc - (1 - tc) * sigmas ** 2) / s
        m = (1 - tc)[:, :, None] * means  # [B, K, d]
        diff = x[:, None, :] - m  # [B, K, d]
        d = x.shape[1]
        logr = logw - 0.5 * (diff ** 2).sum(-1) / s ** 2 - d * torch.log(s)
        r = torch.softmax(logr, dim=1)  # [B, K]
        comp = -means + (ds / s)[:, :, None] * diff  # [B, K, d]
        return (r[:, :, None] * comp).sum(1)

    return v


def gaussian_mixture_log_prob(x, weights, means, sigmas):
    """log Σ_k w_k N(x; μ_k, σ_k² I) per sample, x [B, d]."""
    d = x.shape[1]
    diff = x[:, None, :] - means
    comp = (-0.5 * (diff ** 2).sum(-1) / sigmas ** 2 - d * torch.log(sigmas) - 0.5 * d * math.log(2 * math.pi))
    return torch.logsumexp(torch.log(weights) + comp, dim=1)
