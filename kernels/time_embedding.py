"""Sinusoidal embedding of a time pair, float32 throughout, with its tangent and its backward.

Per sample b, the two times are τ₀ = t and τ₁ = s (or τ₁ = t − s when DELTA); with frequencies f [half]
(a float32 table from the host, so every backend uses the same numbers) the row of the output [B, 2·dim] is
    [cos(f·τ₀), sin(f·τ₀), cos(f·τ₁), sin(f·τ₁)]        (dim = 2·half columns per time)
Tangent (docs/layers.md): ė = τ̇·[−f·sin(f·τ), f·cos(f·τ)] with τ̇₀ = ṫ, τ̇₁ = ṡ (or ṫ − ṡ).
Backward: dτ = Σ_k (−f·sin(f·τ)·de_cos + f·cos(f·τ)·de_sin), then dt = dτ₀ (+ dτ₁ when DELTA), ds = dτ₁ (or −dτ₁).
"""
import triton
import triton.language as tl


@triton.jit
def _pair(T, S, row, DELTA: tl.constexpr):
    """(τ₀, τ₁) of sample `row` as float32 scalars: (t, s), or (t, t − s) when DELTA. Linear: maps tangents too."""
    t = tl.load(T + row).to(tl.float32)
    s = tl.load(S + row).to(tl.float32)
    if DELTA:
        s = t - s
    return t, s


@triton.jit
def _fourier_block(tau, freqs):
    """(cos(f·τ), sin(f·τ)) and the derivative pair (−f·sin(f·τ), f·cos(f·τ)) for one time τ. Each [BLOCK_H]."""
    arg = freqs * tau
    c = tl.cos(arg)
    s = tl.sin(arg)
    return c, s, -freqs * s, freqs * c


@triton.jit
def time_embedding_fwd_kernel(T, S, TT, ST, FREQS, E, ET, stride_e, stride_et, half, dim,
                              DELTA: tl.constexpr, HAS_TANGENT: tl.constexpr, BLOCK_H: tl.constexpr):
    """E[b] (and ET[b] = ė when HAS_TANGENT) for one sample b. Grid: (B,)."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = k < half
    freqs = tl.load(FREQS + k, mask=mask, other=0.0)  # [BLOCK_H] float32
    tau0, tau1 = _pair(T, S, row, DELTA)
    if HAS_TANGENT:
        tau0_t, tau1_t = _pair(TT, ST, row, DELTA)
    for j in tl.static_range(2):
        if j == 0:
            tau = tau0
        else:
            tau = tau1
        c, s, dc, ds = _fourier_block(tau, freqs)
        base = E + row * stride_e + j * dim
        tl.store(base + k, c, mask=mask)
        tl.store(base + half + k, s, mask=mask)
        if HAS_TANGENT:
            if j == 0:
                tau_t = tau0_t
            else:
                tau_t = tau1_t
            base_t = ET + row * stride_et + j * dim
            tl.store(base_t + k, tau_t * dc, mask=mask)
            tl.store(base_t + half + k, tau_t * ds, mask=mask)


@triton.jit
def time_embedding_bwd_kernel(T, S, FREQS, DE, DT, DS, stride_de, half, dim,
                              DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    """dt[b], ds[b] (float32) from dE[b]. Grid: (B,)."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = k < half
    freqs = tl.load(FREQS + k, mask=mask, other=0.0)  # [BLOCK_H] float32
    tau0, tau1 = _pair(T, S, row, DELTA)
    _, _, dc0, ds0 = _fourier_block(tau0, freqs)
    _, _, dc1, ds1 = _fourier_block(tau1, freqs)
    base = DE + row * stride_de
    dtau0 = tl.sum(dc0 * tl.load(base + k, mask=mask, other=0.0).to(tl.float32)
                   + ds0 * tl.load(base + half + k, mask=mask, other=0.0).to(tl.float32), axis=0)
    dtau1 = tl.sum(dc1 * tl.load(base + dim + k, mask=mask, other=0.0).to(tl.float32)
                   + ds1 * tl.load(base + dim + half + k, mask=mask, other=0.0).to(tl.float32), axis=0)
    if DELTA:
        tl.store(DT + row, dtau0 + dtau1)
        tl.store(DS + row, -dtau1)
    else:
        tl.store(DT + row, dtau0)
        tl.store(DS + row, dtau1)
