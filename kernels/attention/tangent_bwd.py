"""Flash-style backward of the attention tangent: gradients of (O, Ȯ) with respect to Q, K, V, Q̇, K̇, V̇ (reverse over
forward), recomputing P and Ṡ per tile from the saved row statistics, never storing an Nq×Nk matrix.

Per (batch, query head), with c the scale, P = exp(S − m)/l, Ṡ = c·(Q̇Kᵀ + QK̇ᵀ), μᵢ = Σⱼ PᵢⱼṠᵢⱼ and
Ȯ = (P ⊙ (Ṡ − μ))V + PV̇; the cotangents are Ḡ of Ȯ and G of O (G absent when only Ȯ is differentiated: HAS_DO).
Differentiating L = ⟨G, O⟩ + ⟨Ḡ, Ȯ⟩ through W = P⊙(Ṡ − μ) and P = softmax(S):
    dV̇ = PᵀḠ,   dV = PᵀG + WᵀḠ,   dW = ḠVᵀ
    dṠ = P ⊙ (dW − δ̄),  δ̄ᵢ = Σⱼ PᵢⱼdWᵢⱼ = Ḡᵢ·Oᵢ                   (softmax-like rows: W is P times centred Ṡ)
    dP = (Ṡ − μ)⊙dW − δ̄·Ṡ + ḠV̇ᵀ + GVᵀ,  dS = P ⊙ (dP − Σⱼ PᵢⱼdPᵢⱼ),  Σⱼ PᵢⱼdPᵢⱼ = Ḡᵢ·Ȯᵢ − δ̄ᵢμᵢ + Gᵢ·Oᵢ
which simplifies to
    dS = (Ṡ − μ)⊙dṠ + P ⊙ (ḠV̇ᵀ + GVᵀ − κ),   κᵢ = Ḡᵢ·Ȯᵢ + Gᵢ·Oᵢ
    dQ = c·(dS K + dṠ K̇),  dK = c·(dSᵀQ + dṠᵀQ̇),  dQ̇ = c·dṠ K,  dK̇ = c·dṠᵀQ.
Row reductions (per query row, O(N)): m and 1/l (saved by the forward), δ̄ and κ (`tangent_bwd_rows_kernel`, from the saved O
and Ȯ), μ (written by the dQ pass). Saved between forward and backward: Q, K, V, their tangents, O, Ȯ, (m, 1/l): O(N·D).

Three kernels:
* `tangent_bwd_rows_kernel`: δ̄, κ; grid (cdiv(seq_q, BLOCK_M), batch·q_heads).
* `tangent_bwd_dq_kernel`: one program per query tile walks the key tiles. μ is not known before the walk, but dS is
  affine in it: with A = Ṡ⊙dṠ + P⊙(ḠV̇ᵀ + GVᵀ − κ), dS = A − μ⊙dṠ, so the program accumulates A·K, dṠ·K, dṠ·K̇ and
  μ = Σ P⊙Ṡ together, and finishes dQ = c·(A·K + dṠ·K̇) − μ·dQ̇, dQ̇ = c·dṠ·K; it writes μ for the next kernel.
  Nine tile GEMMs (QKᵀ, Q̇Kᵀ, QK̇ᵀ, ḠVᵀ, ḠV̇ᵀ, GVᵀ, A·K, dṠ·K, dṠ·K̇); grid (cdiv(seq_q, BLOCK_M), batch·q_heads).
* `tangent_bwd_dkdv_kernel`: one program per key tile of one key/value head walks every query tile of every query
  head of its GQA group (dK, dV, dK̇, dV̇ summed in registers: no atomics, no copies of K/V); twelve tile GEMMs
  (QKᵀ, Q̇Kᵀ, QK̇ᵀ, ḠVᵀ, ḠV̇ᵀ, GVᵀ, dSᵀQ, dṠᵀQ̇, dṠᵀQ, WᵀḠ, PᵀG, PᵀḠ); grid (cdiv(seq_k, BLOCK_N), batch·kv_heads).
Without G (HAS_DO=False) the GVᵀ and PᵀG products drop out. Rows whose every key is removed have m = +inf and 1/l = 0, so P = 0
and every gradient they send is exactly 0. Operands of the GEMMs are in the input dtype, accumulation in float32.
The walked tiles (dQ pass: K, V, K̇, V̇; dK/dV pass: Q, Q̇, G, Ḡ) come through TMA descriptors when TMA, else through
pointers, as in the forward; a program's own tile (dQ: Q, Q̇, Ḡ, G and the row reductions; dK/dV: K, V, K̇, V̇) has
its rows past the end read from the last row, as the forward's query tile.
"""
import triton
import triton.language as tl

from flowkern.kernels.attention.scores import key_tile_ranges, masked_scores, query_tile_ranges, softmax_exp
from flowkern.kernels.utils import (load_own_tile, load_row_tile, load_rows, load_tile, mma, own_rows, row_tiles,
                                    store_tile)


@triton.jit
def tangent_bwd_rows_kernel(O, OT, DO, DOT, DELTA_T, KAPPA,
                            stride_ob, stride_oh, stride_om, stride_od,
                            stride_otb, stride_oth, stride_otm, stride_otd,
                            stride_dob, stride_doh, stride_dom, stride_dod,
                            stride_dotb, stride_doth, stride_dotm, stride_dotd,
                            q_heads, seq_q, head_dim,
                            HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """δ̄ = Ḡ·O and κ = Ḡ·Ȯ + G·O per row, float32 [batch·q_heads, seq_q] contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    o = load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, seq_q, head_dim,
                  0.0).to(tl.float32)
    o_t = load_tile(OT + b * stride_otb + h * stride_oth, offs_m, offs_d, stride_otm, stride_otd, seq_q, head_dim,
                    0.0).to(tl.float32)
    do_t = load_tile(DOT + b * stride_dotb + h * stride_doth, offs_m, offs_d, stride_dotm, stride_dotd, seq_q,
                     head_dim, 0.0).to(tl.float32)
    kappa = tl.sum(do_t * o_t, 1)  # [BLOCK_M]
    if HAS_DO:
        do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, seq_q, head_dim,
                       0.0).to(tl.float32)
        kappa += tl.sum(do * o, 1)
    keep = offs_m < seq_q
    tl.store(DELTA_T + pid_bh * seq_q + offs_m, tl.sum(do_t * o, 1), mask=keep)
    tl.store(KAPPA + pid_bh * seq_q + offs_m, kappa, mask=keep)


@triton.jit
def _tile_terms(q, q_t, do, do_t, k, k_t, v, v_t, row_max, inv_l, delta_t, kappa, offs_m, offs_n, mask_base,
                stride_maskm, stride_maskn, seq_q, seq_k, scale, causal_offset,
                HAS_DO: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(P, Ṡ, dṠ, A) of one [BLOCK_M, BLOCK_N] tile, float32 (module docstring; A = dS + μ⊙dṠ). EDGE tiles test
    the key bounds and the causal diagonal (`masked_scores`), interior ones neither."""
    zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kT = tl.trans(k)
    qk = mma(q, kT, zeros, UPCAST, INPUT_PRECISION)
    s = masked_scores(qk, offs_m, offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale, causal_offset,
                      CAUSAL, MASK_KIND, EDGE)
    p = softmax_exp(s, row_max) * inv_l[:, None]  # [BLOCK_M, BLOCK_N], 0 where removed (the forward's P)
    s_t = mma(q, tl.trans(k_t), mma(q_t, kT, zeros, UPCAST, INPUT_PRECISION), UPCAST, INPUT_PRECISION) * scale
    dw = mma(do_t, tl.trans(v), zeros, UPCAST, INPUT_PRECISION)  # ḠVᵀ
    ds_t = p * (dw - delta_t[:, None])  # dṠ
    inner = mma(do_t, tl.trans(v_t), zeros, UPCAST, INPUT_PRECISION)  # ḠV̇ᵀ
    if HAS_DO:
        inner = mma(do, tl.trans(v), inner, UPCAST, INPUT_PRECISION)  # + GVᵀ
    a = s_t * ds_t + p * (inner - kappa[:, None])
    return p, s_t, ds_t, a


@triton.jit
def _key_walk(start, end, q, q_t, do, do_t, k_tiles, v_tiles, kt_tiles, vt_tiles, row_max, inv_l, delta_t, kappa,
              mu, ak, dstk, dstkt, offs_m, offs_n0, offs_d, mask_base, stride_kn, stride_vn, stride_ktn, stride_vtn,
              stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset, HAS_DO: tl.constexpr,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, SPLIT_TILES: tl.constexpr,
              TMA: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Key tiles [start, end) of the dQ walk: μ, Σ A·K, Σ dṠ·K and Σ dṠ·K̇ updated. EDGE as in `_tile_terms`;
    edge tiles run unpipelined (as in the forward's `_key_walk`)."""
    for start_n in tl.range(start, end, BLOCK_N, num_stages=1 if EDGE and SPLIT_TILES else None):
        offs_n = start_n + offs_n0
        row = tl.cast(start_n, tl.int64)
        k = load_row_tile(k_tiles, start_n, row * stride_kn, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BN, BD]
        v = load_row_tile(v_tiles, start_n, row * stride_vn, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)
        k_t = load_row_tile(kt_tiles, start_n, row * stride_ktn, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)
        v_t = load_row_tile(vt_tiles, start_n, row * stride_vtn, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)
        p, s_t, ds_t, a = _tile_terms(q, q_t, do, do_t, k, k_t, v, v_t, row_max, inv_l, delta_t, kappa, offs_m,
                                      offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale,
                                      causal_offset, HAS_DO, CAUSAL, MASK_KIND, EDGE, UPCAST, INPUT_PRECISION,
                                      BLOCK_M, BLOCK_N)
        mu += tl.sum(p * s_t, 1)
        ak = mma(a.to(k.dtype), k, ak, UPCAST, INPUT_PRECISION)
        dstk = mma(ds_t.to(k.dtype), k, dstk, UPCAST, INPUT_PRECISION)
        dstkt = mma(ds_t.to(k_t.dtype), k_t, dstkt, UPCAST, INPUT_PRECISION)
    return mu, ak, dstk, dstkt


@triton.jit
def _query_walk(n_tiles, band, first, second, q_tiles, qt_tiles, do_tiles, dot_tiles, ROW_STATS, DELTA_T, KAPPA, MU,
                row_base, k, k_t, v, v_t, dk, dv, dkt, dvt, offs_m0, offs_n, offs_d, mask_base, stride_qm,
                stride_qtm, stride_dom, stride_dotm, stride_maskm, stride_maskn,
                seq_q, seq_k, head_dim, scale, causal_offset, HAS_DO: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, EDGE: tl.constexpr, SPLIT_TILES: tl.constexpr, TMA: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV, dK̇, dV̇ of the program's key tile summed over n_tiles query tiles: tile i < band starts at row
    first + i·BLOCK_M, the others at second + (i − band)·BLOCK_M. EDGE tiles also test the rows, unpipelined (as in
    the forward's `_key_walk`)."""
    for i in tl.range(0, n_tiles, num_stages=1 if EDGE and SPLIT_TILES else None):
        start_m = tl.where(i < band, first + i * BLOCK_M, second + (i - band) * BLOCK_M)
        offs_m = start_m + offs_m0  # [BLOCK_M]
        row = start_m.to(tl.int64)
        q = load_row_tile(q_tiles, start_m, row * stride_qm, offs_m, offs_d, seq_q, head_dim, EDGE, TMA)  # [BM, BD]
        q_t = load_row_tile(qt_tiles, start_m, row * stride_qtm, offs_m, offs_d, seq_q, head_dim, EDGE, TMA)
        do_t = load_row_tile(dot_tiles, start_m, row * stride_dotm, offs_m, offs_d, seq_q, head_dim, EDGE, TMA)
        do = do_t
        if HAS_DO:
            do = load_row_tile(do_tiles, start_m, row * stride_dom, offs_m, offs_d, seq_q, head_dim, EDGE, TMA)
        rows = row_base + offs_m
        row_max = load_rows(ROW_STATS + rows * 2, offs_m, seq_q, float("inf"), EDGE)  # [BLOCK_M]
        inv_l = load_rows(ROW_STATS + rows * 2 + 1, offs_m, seq_q, 0.0, EDGE)
        delta_t = load_rows(DELTA_T + rows, offs_m, seq_q, 0.0, EDGE)
        kappa = load_rows(KAPPA + rows, offs_m, seq_q, 0.0, EDGE)
        mu = load_rows(MU + rows, offs_m, seq_q, 0.0, EDGE)
        p, s_t, ds_t, a = _tile_terms(q, q_t, do, do_t, k, k_t, v, v_t, row_max, inv_l, delta_t, kappa, offs_m,
                                      offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale,
                                      causal_offset, HAS_DO, CAUSAL, MASK_KIND, EDGE, UPCAST, INPUT_PRECISION,
                                      BLOCK_M, BLOCK_N)
        ds = a - mu[:, None] * ds_t  # dS
        ds_tT = tl.trans(ds_t)
        dk = mma(tl.trans(ds).to(q.dtype), q, dk, UPCAST, INPUT_PRECISION)
        dk = mma(ds_tT.to(q_t.dtype), q_t, dk, UPCAST, INPUT_PRECISION)
        dkt = mma(ds_tT.to(q.dtype), q, dkt, UPCAST, INPUT_PRECISION)
        pT = tl.trans(p)
        dv = mma(tl.trans(p * (s_t - mu[:, None])).to(do_t.dtype), do_t, dv, UPCAST, INPUT_PRECISION)
        if HAS_DO:
            dv = mma(pT.to(do.dtype), do, dv, UPCAST, INPUT_PRECISION)
        dvt = mma(pT.to(do_t.dtype), do_t, dvt, UPCAST, INPUT_PRECISION)
    return dk, dv, dkt, dvt


@triton.jit
def tangent_bwd_dq_kernel(
    Q, K, V, QT, KT, VT, DO, DOT, ROW_STATS, DELTA_T, KAPPA, MU, MASK, DQ, DQT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_vtb, stride_vth, stride_vtn, stride_vtd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dotb, stride_doth, stride_dotm, stride_dotd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dqtb, stride_dqth, stride_dqtm, stride_dqtd,
    q_heads, kv_group, seq_q, seq_k, head_dim, scale, causal_offset,
    HAS_DO: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT_TILES: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    h_kv = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]

    q = load_own_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, seq_q, head_dim,
                      0.0)
    q_t = load_own_tile(QT + b * stride_qtb + h * stride_qth, offs_m, offs_d, stride_qtm, stride_qtd, seq_q,
                        head_dim, 0.0)
    do_t = load_own_tile(DOT + b * stride_dotb + h * stride_doth, offs_m, offs_d, stride_dotm, stride_dotd, seq_q,
                         head_dim, 0.0)
    do = do_t
    if HAS_DO:
        do = load_own_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, seq_q,
                           head_dim, 0.0)
    own = pid_bh * seq_q + own_rows(offs_m, seq_q)  # rows past seq_q read the last one's (never stored)
    row_max = tl.load(ROW_STATS + own * 2)  # [BLOCK_M]
    inv_l = tl.load(ROW_STATS + own * 2 + 1)
    delta_t = tl.load(DELTA_T + own)
    kappa = tl.load(KAPPA + own)
    # key/value tiles: TMA descriptors, or the pointers of keys [0, BLOCK_N) shifted per tile
    k_tiles = row_tiles(K + b * stride_kb + h_kv * stride_kh, seq_k, head_dim, stride_kn, stride_kd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    v_tiles = row_tiles(V + b * stride_vb + h_kv * stride_vh, seq_k, head_dim, stride_vn, stride_vd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    kt_tiles = row_tiles(KT + b * stride_ktb + h_kv * stride_kth, seq_k, head_dim, stride_ktn, stride_ktd, offs_n0,
                         offs_d, TMA, BLOCK_N, BLOCK_D)
    vt_tiles = row_tiles(VT + b * stride_vtb + h_kv * stride_vth, seq_k, head_dim, stride_vtn, stride_vtd, offs_n0,
                         offs_d, TMA, BLOCK_N, BLOCK_D)
    mask_base = MASK + b * stride_maskb + h * stride_maskh

    mu = tl.zeros([BLOCK_M], tl.float32)  # μ = Σ P⊙Ṡ
    ak = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ A·K
    dstk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ dṠ·K
    dstkt = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ dṠ·K̇
    interior, hi = key_tile_ranges(pid_m * BLOCK_M, seq_k, causal_offset, CAUSAL, SPLIT_TILES, BLOCK_M, BLOCK_N)
    if SPLIT_TILES:  # interior tiles first, no tests (else every tile is an edge tile)
        mu, ak, dstk, dstkt = _key_walk(
            0, interior, q, q_t, do, do_t, k_tiles, v_tiles, kt_tiles, vt_tiles, row_max, inv_l, delta_t, kappa, mu,
            ak, dstk, dstkt, offs_m, offs_n0, offs_d, mask_base, stride_kn, stride_vn, stride_ktn, stride_vtn,
            stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset, HAS_DO,
            CAUSAL, MASK_KIND, False, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    mu, ak, dstk, dstkt = _key_walk(
        interior, hi, q, q_t, do, do_t, k_tiles, v_tiles, kt_tiles, vt_tiles, row_max, inv_l, delta_t, kappa, mu,
        ak, dstk, dstkt, offs_m, offs_n0, offs_d, mask_base, stride_kn, stride_vn, stride_ktn, stride_vtn,
        stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset, HAS_DO,
        CAUSAL, MASK_KIND, True, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)

    dq = (ak - mu[:, None] * dstk + dstkt) * scale
    store_tile(DQ + b * stride_dqb + h * stride_dqh, dq, offs_m, offs_d, stride_dqm, stride_dqd, seq_q, head_dim)
    store_tile(DQT + b * stride_dqtb + h * stride_dqth, dstk * scale, offs_m, offs_d, stride_dqtm, stride_dqtd,
               seq_q, head_dim)
    tl.store(MU + pid_bh * seq_q + offs_m, mu, mask=offs_m < seq_q)


@triton.jit
def tangent_bwd_dkdv_kernel(
    Q, K, V, QT, KT, VT, DO, DOT, ROW_STATS, DELTA_T, KAPPA, MU, MASK, DK, DV, DKT, DVT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_vtb, stride_vth, stride_vtn, stride_vtd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dotb, stride_doth, stride_dotm, stride_dotd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dktb, stride_dkth, stride_dktn, stride_dktd,
    stride_dvtb, stride_dvth, stride_dvtn, stride_dvtd,
    q_heads, kv_heads, kv_group, seq_q, seq_k, head_dim, scale, causal_offset,
    HAS_DO: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT_TILES: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // kv_heads
    h_kv = pid_bh % kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m0 = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]

    k = load_own_tile(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kn, stride_kd, seq_k, head_dim,
                      0.0)
    v = load_own_tile(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_d, stride_vn, stride_vd, seq_k, head_dim,
                      0.0)
    k_t = load_own_tile(KT + b * stride_ktb + h_kv * stride_kth, offs_n, offs_d, stride_ktn, stride_ktd, seq_k,
                        head_dim, 0.0)
    v_t = load_own_tile(VT + b * stride_vtb + h_kv * stride_vth, offs_n, offs_d, stride_vtn, stride_vtd, seq_k,
                        head_dim, 0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkt = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvt = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo, interior_lo, interior_hi = query_tile_ranges(pid_n * BLOCK_N, seq_q, seq_k, causal_offset, CAUSAL, SPLIT_TILES,
                                                     BLOCK_M, BLOCK_N)
    band = (interior_lo - lo) // BLOCK_M  # edge query tiles before the interior ones (the causal diagonal band)
    n_edge = band + tl.cdiv(seq_q - interior_hi, BLOCK_M)  # and after them (the last partial tile)
    for g in range(0, kv_group):
        h = h_kv * kv_group + g
        # this head's query-side tiles: TMA descriptors, or the pointers of rows [0, BLOCK_M) shifted per tile
        q_tiles = row_tiles(Q + b * stride_qb + h * stride_qh, seq_q, head_dim, stride_qm, stride_qd, offs_m0, offs_d,
                            TMA, BLOCK_M, BLOCK_D)
        qt_tiles = row_tiles(QT + b * stride_qtb + h * stride_qth, seq_q, head_dim, stride_qtm, stride_qtd, offs_m0,
                             offs_d, TMA, BLOCK_M, BLOCK_D)
        do_tiles = row_tiles(DO + b * stride_dob + h * stride_doh, seq_q, head_dim, stride_dom, stride_dod, offs_m0,
                             offs_d, TMA, BLOCK_M, BLOCK_D)
        dot_tiles = row_tiles(DOT + b * stride_dotb + h * stride_doth, seq_q, head_dim, stride_dotm, stride_dotd,
                              offs_m0, offs_d, TMA, BLOCK_M, BLOCK_D)
        row_base = (b * q_heads + h) * seq_q
        mask_base = MASK + b * stride_maskb + h * stride_maskh
        n_interior = (interior_hi - interior_lo) // BLOCK_M
        if SPLIT_TILES:  # interior tiles first, no tests (else every tile is an edge tile)
            dk, dv, dkt, dvt = _query_walk(
                n_interior, 0, 0, interior_lo, q_tiles, qt_tiles, do_tiles, dot_tiles, ROW_STATS, DELTA_T, KAPPA, MU,
                row_base, k, k_t, v, v_t, dk, dv, dkt, dvt, offs_m0, offs_n, offs_d, mask_base, stride_qm,
                stride_qtm, stride_dom, stride_dotm, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale,
                causal_offset, HAS_DO, CAUSAL, MASK_KIND, False, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION,
                BLOCK_M, BLOCK_N)
        dk, dv, dkt, dvt = _query_walk(
            n_edge, band, lo, interior_hi, q_tiles, qt_tiles, do_tiles, dot_tiles, ROW_STATS, DELTA_T, KAPPA, MU,
            row_base, k, k_t, v, v_t, dk, dv, dkt, dvt, offs_m0, offs_n, offs_d, mask_base, stride_qm,
            stride_qtm, stride_dom, stride_dotm, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale,
            causal_offset, HAS_DO, CAUSAL, MASK_KIND, True, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION,
            BLOCK_M, BLOCK_N)

    store_tile(DK + b * stride_dkb + h_kv * stride_dkh, dk * scale, offs_n, offs_d, stride_dkn, stride_dkd, seq_k, head_dim)
    store_tile(DV + b * stride_dvb + h_kv * stride_dvh, dv, offs_n, offs_d, stride_dvn, stride_dvd, seq_k, head_dim)
    store_tile(DKT + b * stride_dktb + h_kv * stride_dkth, dkt * scale, offs_n, offs_d, stride_dktn, stride_dktd,
               seq_k, head_dim)
    store_tile(DVT + b * stride_dvtb + h_kv * stride_dvth, dvt, offs_n, offs_d, stride_dvtn, stride_dvtd, seq_k,
               head_dim)
