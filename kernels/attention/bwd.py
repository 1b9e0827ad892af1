"""Flash-style attention backward of O (the tangent Ȯ is stop-gradient), recomputing P from the saved row statistics.

With P = exp(S − m)·(1/l) (m the row max, l the row sum, both saved by the forward) and dO the incoming
gradient:
    dV = Pᵀ dO,   dP = dO Vᵀ,   Δᵢ = Σⱼ Pᵢⱼ dPᵢⱼ,   dS = P ⊙ (dP − Δ),   dQ = c·dS K,   dK = c·dSᵀ Q.
Δ is the softmax backward's own row sum Σⱼ PᵢⱼdPᵢⱼ, not the shortcut Σ_d dOᵢ_d·Oᵢ_d (equal in exact arithmetic):
with a near one-hot P (logits scaled by −1e4) dP − Δ must vanish exactly, and the two dot products dO·Vⱼ and dO·O
differ by a rounding that c = −1e4 would blow up to a gradient error of 1e-2.
Three kernels, run in this order:
* `attention_bwd_delta_kernel`: the shortcut Δ̂ = Σ_d dO·O, grid (cdiv(seq_q, BLOCK_M), batch·q_heads).
* `attention_bwd_dq_kernel`: one program per query tile walks the key tiles with dS = P ⊙ (dP − Δ̂), sums
  Δ = Σⱼ P dP and B = Σⱼ P K on the way, and corrects at the end: dQ = c·(Σ dS K − (Δ − Δ̂)·B) (a small
  correction: no cancellation); it stores Δ. Grid (cdiv(seq_q, BLOCK_M), batch·q_heads).
* `attention_bwd_dkdv_kernel`: one program per key tile of one key/value head walks every query tile of every query
  head of its GQA group with that Δ, so dK and dV are summed over the group in registers (no atomics,
  deterministic); grid (cdiv(seq_k, BLOCK_N), batch·kv_heads).
Each walk reads its tiles (dQ: keys and values; dK/dV: queries and dO) through TMA descriptors when TMA,
else through pointers, as the forward; a program's own tile (dQ: Q, dO and the row statistics; dK/dV: K, V) has
its rows past the end read from the last row, as the forward's query tile.
Rows whose every key is removed have (m, 1/l) = (+inf, 0), so P = 0 and every gradient they send is exactly 0.
S − m is formed first and l is divided out after the exponential: with a huge |m| (a −1e9 padding mask, logits
scaled by −1e4) a saved log-sum-exp m + log l would round log l away and make P up to Nk× too large.
"""
import triton
import triton.language as tl

from flowkern.kernels.attention.scores import key_tile_ranges, masked_scores, query_tile_ranges, softmax_exp
from flowkern.kernels.utils import (load_own_tile, load_row_tile, load_rows, load_tile, mma, own_rows, row_tiles,
                                    store_tile)


@triton.jit
def attention_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                               stride_dob, stride_doh, stride_dom, stride_dod, q_heads, seq_q, head_dim,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Δ[b, h, i] = Σ_d dO[b, h, i, d]·O[b, h, i, d] in float32; DELTA is [batch·q_heads, seq_q] contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, seq_q, head_dim, 0.0)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, seq_q, head_dim, 0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + pid_bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _query_walk(n_tiles, band, first, second, q_tiles, do_tiles, ROW_STATS, DELTA, mask_base, row_base, kT, vT, dk,
                dv, offs_m0, offs_n, offs_d, stride_qm, stride_dom, stride_maskm, stride_maskn,
                seq_q, seq_k, head_dim, scale, causal_offset, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                EDGE: tl.constexpr, SPLIT_TILES: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK (before its factor c) and dV of one key tile, summed over n_tiles query tiles: tile i < band starts at
    row first + i·BLOCK_M, the others at second + (i − band)·BLOCK_M. EDGE tiles test the row and key bounds and
    the causal diagonal, unpipelined (as in the forward's `_key_walk`); interior ones neither."""
    for i in tl.range(0, n_tiles, num_stages=1 if EDGE and SPLIT_TILES else None):
        start_m = tl.where(i < band, first + i * BLOCK_M, second + (i - band) * BLOCK_M)
        offs_m = start_m + offs_m0  # [BLOCK_M]
        q = load_row_tile(q_tiles, start_m, start_m.to(tl.int64) * stride_qm, offs_m, offs_d, seq_q, head_dim, EDGE,
                          TMA)  # [BLOCK_M, BLOCK_D]
        do = load_row_tile(do_tiles, start_m, start_m.to(tl.int64) * stride_dom, offs_m, offs_d, seq_q, head_dim,
                           EDGE, TMA)
        stats = ROW_STATS + (row_base + offs_m) * 2
        row_max = load_rows(stats, offs_m, seq_q, float("inf"), EDGE)  # [BLOCK_M]
        inv_l = load_rows(stats + 1, offs_m, seq_q, 0.0, EDGE)
        delta = load_rows(DELTA + row_base + offs_m, offs_m, seq_q, 0.0, EDGE)
        qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
        s = masked_scores(qk, offs_m, offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale,
                          causal_offset, CAUSAL, MASK_KIND, EDGE)
        p = softmax_exp(s, row_max) * inv_l[:, None]  # [BLOCK_M, BLOCK_N]
        dv = mma(tl.trans(p).to(do.dtype), do, dv, UPCAST, INPUT_PRECISION)
        dp = mma(do, vT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        dk = mma(tl.trans(ds).to(q.dtype), q, dk, UPCAST, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dq_walk(start, end, q, do, k_tiles, v_tiles, row_max, inv_l, delta, dq, pk, delta_exact, mask_base, offs_m,
             offs_n0, offs_d, stride_kn, stride_vn, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale,
             causal_offset, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
             SPLIT_TILES: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [start, end) of the dQ walk: Σ dS K, B = Σ P K and Δ = Σ P dP updated (pointers advanced). EDGE
    tiles test the key bounds and the causal diagonal, unpipelined (as in the forward's `_key_walk`)."""
    for start_n in tl.range(start, end, BLOCK_N, num_stages=1 if EDGE and SPLIT_TILES else None):
        offs_n = start_n + offs_n0
        k = load_row_tile(k_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
        v = load_row_tile(v_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
        qk = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
        s = masked_scores(qk, offs_m, offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale,
                          causal_offset, CAUSAL, MASK_KIND, EDGE)
        p = softmax_exp(s, row_max) * inv_l[:, None]  # [BLOCK_M, BLOCK_N]
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, UPCAST, INPUT_PRECISION)
        pk = mma(p.to(k.dtype), k, pk, UPCAST, INPUT_PRECISION)
        delta_exact += tl.sum(p * dp, 1)
        if not TMA:  # pointers move on; a descriptor is indexed by row
            k_tiles += BLOCK_N * stride_kn
            v_tiles += BLOCK_N * stride_vn
    return dq, pk, delta_exact, k_tiles, v_tiles


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, ROW_STATS, DELTA, MASK, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    q_heads, kv_heads, kv_group, seq_q, seq_k, head_dim, scale, causal_offset,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT_TILES: tl.constexpr, TMA: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // kv_heads
    h_kv = pid_bh % kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m0 = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]

    k = load_own_tile(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kn, stride_kd,
                      seq_k, head_dim, 0.0)  # [BLOCK_N, BLOCK_D]
    v = load_own_tile(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_d, stride_vn, stride_vd,
                      seq_k, head_dim, 0.0)  # [BLOCK_N, BLOCK_D]
    kT = tl.trans(k)
    vT = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo, interior_lo, interior_hi = query_tile_ranges(pid_n * BLOCK_N, seq_q, seq_k, causal_offset, CAUSAL, SPLIT_TILES,
                                                     BLOCK_M, BLOCK_N)
    band = (interior_lo - lo) // BLOCK_M  # edge query tiles before the interior ones (the causal diagonal band)
    n_edge = band + tl.cdiv(seq_q - interior_hi, BLOCK_M)  # and after them (the last partial tile)
    for g in range(0, kv_group):
        h = h_kv * kv_group + g
        # this head's query and dO tiles: TMA descriptors, or the pointers of rows [0, BLOCK_M) shifted per tile
        q_tiles = row_tiles(Q + b * stride_qb + h * stride_qh, seq_q, head_dim, stride_qm, stride_qd, offs_m0,
                            offs_d, TMA, BLOCK_M, BLOCK_D)
        do_tiles = row_tiles(DO + b * stride_dob + h * stride_doh, seq_q, head_dim, stride_dom, stride_dod, offs_m0,
                             offs_d, TMA, BLOCK_M, BLOCK_D)
        row_base = (b * q_heads + h) * seq_q
        mask_base = MASK + b * stride_maskb + h * stride_maskh
        if SPLIT_TILES:  # interior tiles first, no tests (else every tile is an edge tile)
            dk, dv = _query_walk((interior_hi - interior_lo) // BLOCK_M, 0, 0, interior_lo, q_tiles, do_tiles,
                                 ROW_STATS, DELTA, mask_base, row_base, kT, vT, dk, dv, offs_m0, offs_n, offs_d,
                                 stride_qm, stride_dom, stride_maskm, stride_maskn, seq_q, seq_k, head_dim,
                                 scale, causal_offset, CAUSAL, MASK_KIND, False, SPLIT_TILES, TMA, UPCAST,
                                 INPUT_PRECISION, BLOCK_M, BLOCK_N)
        dk, dv = _query_walk(n_edge, band, lo, interior_hi, q_tiles, do_tiles, ROW_STATS,
                             DELTA, mask_base, row_base, kT, vT, dk, dv, offs_m0, offs_n, offs_d,
                             stride_qm, stride_dom, stride_maskm, stride_maskn, seq_q, seq_k, head_dim,
                             scale, causal_offset, CAUSAL, MASK_KIND, True, SPLIT_TILES, TMA, UPCAST,
                             INPUT_PRECISION, BLOCK_M, BLOCK_N)

    store_tile(DK + b * stride_dkb + h_kv * stride_dkh, dk * scale, offs_n, offs_d, stride_dkn, stride_dkd,
               seq_k, head_dim)
    store_tile(DV + b * stride_dvb + h_kv * stride_dvh, dv, offs_n, offs_d, stride_dvn, stride_dvd,
               seq_k, head_dim)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, ROW_STATS, DELTA, MASK, DQ, DELTA_EXACT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    q_heads, kv_group, seq_q, seq_k, head_dim, scale, causal_offset,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT_TILES: tl.constexpr, TMA: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    h_kv = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]

    q = load_own_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd,
                      seq_q, head_dim, 0.0)  # [BLOCK_M, BLOCK_D]
    do = load_own_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod,
                       seq_q, head_dim, 0.0)  # [BLOCK_M, BLOCK_D]
    own = pid_bh * seq_q + own_rows(offs_m, seq_q)  # rows past seq_q read the last one's (never stored)
    row_max = tl.load(ROW_STATS + own * 2)
    inv_l = tl.load(ROW_STATS + own * 2 + 1)
    delta = tl.load(DELTA + own)  # Δ̂, [BLOCK_M]
    mask_base = MASK + b * stride_maskb + h * stride_maskh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # B = Σ P K
    delta_exact = tl.zeros([BLOCK_M], tl.float32)  # Δ = Σ P dP

    k_tiles = row_tiles(K + b * stride_kb + h_kv * stride_kh, seq_k, head_dim, stride_kn, stride_kd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    v_tiles = row_tiles(V + b * stride_vb + h_kv * stride_vh, seq_k, head_dim, stride_vn, stride_vd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    interior, hi = key_tile_ranges(pid_m * BLOCK_M, seq_k, causal_offset, CAUSAL, SPLIT_TILES, BLOCK_M, BLOCK_N)
    if SPLIT_TILES:  # interior tiles first, no tests (else every tile is an edge tile)
        dq, pk, delta_exact, k_tiles, v_tiles = _dq_walk(
            0, interior, q, do, k_tiles, v_tiles, row_max, inv_l, delta, dq, pk, delta_exact, mask_base, offs_m,
            offs_n0, offs_d, stride_kn, stride_vn, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale,
            causal_offset, CAUSAL, MASK_KIND, False, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    dq, pk, delta_exact, k_tiles, v_tiles = _dq_walk(
        interior, hi, q, do, k_tiles, v_tiles, row_max, inv_l, delta, dq, pk, delta_exact, mask_base, offs_m, offs_n0,
        offs_d, stride_kn, stride_vn, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset,
        CAUSAL, MASK_KIND, True, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)

    dq = (dq - (delta_exact - delta)[:, None] * pk) * scale
    store_tile(DQ + b * stride_dqb + h * stride_dqh, dq, offs_m, offs_d, stride_dqm, stride_dqd, seq_q, head_dim)
    tl.store(DELTA_EXACT + pid_bh * seq_q + offs_m, delta_exact, mask=offs_m < seq_q)
