"""Fused attention forward with its forward-mode tangent: O, Ȯ and the row statistics in one online-softmax pass.

Per (batch, query head), with c the scale, S = c·QKᵀ (+ mask), P = softmax_rows(S), O = PV and tangents Q̇, K̇, V̇:

    Ṡ = c·(Q̇Kᵀ + QK̇ᵀ)            (a mask is constant: it has no tangent)
    Ṗ = P ⊙ (Ṡ − μ),  μᵢ = Σⱼ Pᵢⱼ Ṡᵢⱼ
    Ȯ = ṖV + PV̇

Walking the key tiles with the running max m and p̃ = exp(S − m), the kernel keeps
    l = Σ p̃,  Õ = Σ p̃V,  and the centred tangent sum  T̃ = Σ (p̃V̇ + p̃⊙(Ṡ − μ̂)V)
where μ̂ is the running estimate of μ (Σ p̃Ṡ / l over the tiles seen so far). When a tile arrives, m, l, Õ, T̃ are
rescaled by α = exp(m_old − m_new); the new estimate μ̂' = (α·l·μ̂ + Σ_tile p̃Ṡ) / l' moves T̃ by −(μ̂' − μ̂)·Õ (exact:
Σ p̃(Ṡ − μ̂)V = Σ p̃(Ṡ − μ̂')V + (μ̂' − μ̂)·Õ), and the tile adds p̃V̇ + p̃⊙(Ṡ − μ̂')V. After the last tile μ̂ = μ, so
    O = Õ/l,  Ȯ = T̃/l
with no final cancellation (the textbook Σ(p̃⊙Ṡ)V / l − μ·O subtracts two large terms), and p̃⊙(Ṡ − μ̂) is centred
before it is rounded to the input dtype for its GEMM: in bfloat16 it keeps far more of Ṗ's significant bits.
Row statistics saved for the backward: m (natural log units) and 1/l, kept apart so that
P = exp(S − m)·(1/l) stays exact when |m| is huge (a −1e9 padding mask: a log-sum-exp m + log l would round log l
away).
The max needs no tangent: softmax is shift-invariant. Scores stay in natural units (tl.exp of S − m; on a GPU
Triton lowers it to exp2 of log₂e·(S − m), after the subtraction).
A row whose every key is removed has l = 0: it gets O = 0, Ȯ = 0 and statistics (m, 1/l) = (+∞, 0), which make
the backward's P exactly 0 there.

The key tiles run in two loops: first the interior ones (inside [0, seq_k) and, when causal, wholly on or below the
diagonal of the query tile), which need no bounds or causal test, then the few edge tiles (the diagonal band, the
last partial tile) with them. Exponentials are MUFU.EX2 with subnormal results flushed (`exp_ftz`); Ṡ's scale c
rides in the FMA that centres it, Ṡ − μ̂' = c·(Q̇Kᵀ + QK̇ᵀ) − μ̂'.

Key/value tiles come through TMA descriptors of the program's (batch, head) matrices when TMA (sm_90; the host
checks strides and alignment), else through pointers advanced by BLOCK_N rows a tile; both read 0 past seq_k and
the head dim. The program's own query tile (Q, Q̇) is read with its rows past seq_q taken from row seq_q − 1
(`load_own_tile`): they are computed and never stored, and no row predicate has to live across the key loops to
the masked stores (ptxas had spilled it).

Cost: six tile GEMMs (QKᵀ, Q̇Kᵀ, QK̇ᵀ, p̃V, p̃V̇, p̃(Ṡ − μ̂)V), 12·Nq·Nk·D FLOPs per head. HAS_TANGENT=False gives the
plain flash forward (two GEMMs) from the same code.

Grid: (cdiv(seq_q, BLOCK_M), batch·q_heads). The program of query head h reads key/value head h // kv_group
(GQA/MQA without copies).
"""
import triton
import triton.language as tl

from flowkern.kernels.attention.scores import key_tile_ranges, masked_scores, softmax_exp
from flowkern.kernels.utils import exp_ftz, load_own_tile, load_row_tile, mma, row_tiles, store_tile


@triton.jit
def _key_tile(q, q_t, k_tiles, v_tiles, kt_tiles, vt_tiles, start_n, mask_base, offs_m, offs_n, offs_d,
              m_i, l_i, acc, mu_i, acc_t,
              stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset,
              HAS_TANGENT: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
              TMA: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of the online softmax: (m, l, Õ, μ̂, T̃) updated (module docstring). EDGE tiles test the key
    bounds and the causal diagonal; interior ones (EDGE=False) load and score without either."""
    k = load_row_tile(k_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
    v = load_row_tile(v_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
    kT = tl.trans(k)  # [BLOCK_D, BLOCK_N]
    qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
    s = masked_scores(qk, offs_m, offs_n, mask_base, stride_maskm, stride_maskn, seq_q, seq_k, scale,
                      causal_offset, CAUSAL, MASK_KIND, EDGE)  # [BLOCK_M, BLOCK_N]

    m_new = tl.maximum(m_i, tl.max(s, 1))  # carried as it is: −∞ while a row has nothing kept
    m_safe = m_new
    if EDGE or MASK_KIND != 0:  # a row with nothing kept so far: exponentiate against 0, avoiding −∞ − −∞
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = exp_ftz(m_i - m_safe)  # [BLOCK_M]
    p = softmax_exp(s, m_safe)  # [BLOCK_M, BLOCK_N], 0 where removed
    l_old = l_i * alpha
    l_i = l_old + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_TANGENT:
        k_t = load_row_tile(kt_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
        v_t = load_row_tile(vt_tiles, start_n, 0, offs_n, offs_d, seq_k, head_dim, EDGE, TMA)  # [BLOCK_N, BLOCK_D]
        s_t = mma(q_t, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, INPUT_PRECISION)
        s_t = mma(q, tl.trans(k_t), s_t, UPCAST, INPUT_PRECISION)  # Ṡ / c
        mu_sum = l_old * mu_i + scale * tl.sum(p * s_t, 1)
        if EDGE or MASK_KIND != 0:
            mu_new = tl.where(l_i > 0.0, mu_sum / tl.where(l_i > 0.0, l_i, 1.0), mu_i)
        else:
            mu_new = mu_sum / l_i  # l' ≥ 1: the row max's p̃ is exactly 1
        acc_t = acc_t * alpha[:, None] - (mu_new - mu_i)[:, None] * acc  # re-centre T̃ on μ̂'
        acc_t = mma(p.to(v_t.dtype), v_t, acc_t, UPCAST, INPUT_PRECISION)
        acc_t = mma((p * (s_t * scale - mu_new[:, None])).to(v.dtype), v, acc_t, UPCAST, INPUT_PRECISION)
        mu_i = mu_new
    acc = mma(p.to(v.dtype), v, acc, UPCAST, INPUT_PRECISION)
    return m_new, l_i, acc, mu_i, acc_t


@triton.jit
def _key_walk(start, end, q, q_t, k_tiles, v_tiles, kt_tiles, vt_tiles, mask_base, offs_m, offs_n0, offs_d,
              m_i, l_i, acc, mu_i, acc_t, stride_kn, stride_vn, stride_ktn, stride_vtn, stride_maskm, stride_maskn,
              seq_q, seq_k, head_dim, scale, causal_offset,
              HAS_TANGENT: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
              SPLIT_TILES: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles [start, end) (pointers advanced by BLOCK_N rows a tile). Interior tiles are software-pipelined;
    the few edge tiles (EDGE) are not: a second pipelined loop made ptxas serialise the first one's wgmma (C7515:
    accumulator registers defined between the start and end of a pipeline stage)."""
    for start_n in tl.range(start, end, BLOCK_N, num_stages=1 if EDGE and SPLIT_TILES else None):
        m_i, l_i, acc, mu_i, acc_t = _key_tile(
            q, q_t, k_tiles, v_tiles, kt_tiles, vt_tiles, start_n, mask_base, offs_m, start_n + offs_n0, offs_d,
            m_i, l_i, acc, mu_i, acc_t, stride_maskm, stride_maskn, seq_q, seq_k, head_dim, scale, causal_offset,
            HAS_TANGENT, CAUSAL, MASK_KIND, EDGE, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)
        if not TMA:  # pointers move on; a descriptor is indexed by row
            k_tiles += BLOCK_N * stride_kn
            v_tiles += BLOCK_N * stride_vn
            if HAS_TANGENT:
                kt_tiles += BLOCK_N * stride_ktn
                vt_tiles += BLOCK_N * stride_vtn
    return m_i, l_i, acc, mu_i, acc_t, k_tiles, v_tiles, kt_tiles, vt_tiles


@triton.jit
def attention_fwd_kernel(
    Q, K, V, QT, KT, VT, MASK, O, OT, ROW_STATS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qtb, stride_qth, stride_qtm, stride_qtd,
    stride_ktb, stride_kth, stride_ktn, stride_ktd,
    stride_vtb, stride_vth, stride_vtn, stride_vtd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_otb, stride_oth, stride_otm, stride_otd,
    q_heads, kv_group, seq_q, seq_k, head_dim, scale, causal_offset,
    HAS_TANGENT: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT_TILES: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    # The key/value tiles: TMA descriptors, or the first tile's pointers advanced by BLOCK_N rows per tile.
    k_tiles = row_tiles(K + b * stride_kb + h_kv * stride_kh, seq_k, head_dim, stride_kn, stride_kd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    v_tiles = row_tiles(V + b * stride_vb + h_kv * stride_vh, seq_k, head_dim, stride_vn, stride_vd, offs_n0, offs_d,
                        TMA, BLOCK_N, BLOCK_D)
    mask_base = MASK + b * stride_maskb + h * stride_maskh
    q_t = q
    kt_tiles = k_tiles
    vt_tiles = v_tiles
    if HAS_TANGENT:
        q_t = load_own_tile(QT + b * stride_qtb + h * stride_qth, offs_m, offs_d, stride_qtm, stride_qtd,
                            seq_q, head_dim, 0.0)  # [BLOCK_M, BLOCK_D]
        kt_tiles = row_tiles(KT + b * stride_ktb + h_kv * stride_kth, seq_k, head_dim, stride_ktn, stride_ktd,
                             offs_n0, offs_d, TMA, BLOCK_N, BLOCK_D)
        vt_tiles = row_tiles(VT + b * stride_vtb + h_kv * stride_vth, seq_k, head_dim, stride_vtn, stride_vtd,
                             offs_n0, offs_d, TMA, BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of s (natural units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # Σ p̃
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Õ = Σ p̃V
    mu_i = tl.zeros([BLOCK_M], tl.float32)  # μ̂, the running estimate of μ (tangent only)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # T̃ = Σ p̃V̇ + p̃⊙(Ṡ − μ̂)V (tangent only)

    interior, hi = key_tile_ranges(pid_m * BLOCK_M, seq_k, causal_offset, CAUSAL, SPLIT_TILES, BLOCK_M, BLOCK_N)
    if SPLIT_TILES:  # interior tiles first, no tests (else every tile is an edge tile)
        m_i, l_i, acc, mu_i, acc_t, k_tiles, v_tiles, kt_tiles, vt_tiles = _key_walk(
            0, interior, q, q_t, k_tiles, v_tiles, kt_tiles, vt_tiles, mask_base, offs_m, offs_n0, offs_d,
            m_i, l_i, acc, mu_i, acc_t, stride_kn, stride_vn, stride_ktn, stride_vtn, stride_maskm, stride_maskn,
            seq_q, seq_k, head_dim, scale, causal_offset,
            HAS_TANGENT, CAUSAL, MASK_KIND, False, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    m_i, l_i, acc, mu_i, acc_t, k_tiles, v_tiles, kt_tiles, vt_tiles = _key_walk(
        interior, hi, q, q_t, k_tiles, v_tiles, kt_tiles, vt_tiles, mask_base, offs_m, offs_n0, offs_d,
        m_i, l_i, acc, mu_i, acc_t, stride_kn, stride_vn, stride_ktn, stride_vtn, stride_maskm, stride_maskn,
        seq_q, seq_k, head_dim, scale, causal_offset,
        HAS_TANGENT, CAUSAL, MASK_KIND, True, SPLIT_TILES, TMA, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)

    empty = l_i == 0.0  # every key removed
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))  # [BLOCK_M]
    store_tile(O + b * stride_ob + h * stride_oh, acc * inv_l[:, None], offs_m, offs_d, stride_om, stride_od,
               seq_q, head_dim)
    stats = ROW_STATS + (pid_bh * seq_q + offs_m) * 2  # [.., 0]: m, [.., 1]: 1/l
    tl.store(stats, tl.where(empty, float("inf"), m_i), mask=offs_m < seq_q)
    tl.store(stats + 1, inv_l, mask=offs_m < seq_q)
    if HAS_TANGENT:
        store_tile(OT + b * stride_otb + h * stride_oth, acc_t * inv_l[:, None], offs_m, offs_d, stride_otm,
                   stride_otd, seq_q, head_dim)
