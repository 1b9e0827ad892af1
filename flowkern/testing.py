"""Independent references for tests and benchmarks (plain PyTorch, no flowkern code)."""
from __future__ import annotations

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
# Counter-based probes (the map `kernels/hutchinson.py` and `csrc/hutchinson.cu` implement), in plain PyTorch.
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
    """The [probes, batch, dim] probes of `kernels/hutchinson.py`, in float64 (Box–Muller in float64)."""
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
