"""LayerNorm / RMSNorm with an optional per-row affine (γ, β or adaLN 1 + scale, shift), forward + tangent in one
pass, and the backward.

One program per row x ∈ R^D (float32 maths, outputs in the input dtype):
    LayerNorm: μ = mean(x), r = 1/√(mean((x − μ)²) + ε), x̂ = (x − μ)·r
    RMSNorm:   μ = 0,       r = 1/√(mean(x²) + ε),       x̂ = x·r
    y = x̂·w + b, with w = γ (ONE_PLUS=False) or w = 1 + scale (adaLN modulate, ONE_PLUS=True), b = β or shift.
Tangent (docs/layers.md), P(v) = r·(v − mean(v) − x̂·mean(x̂⊙v)) for LayerNorm, r·(v − x̂·mean(x̂⊙v)) for RMSNorm:
    x̂̇ = P(ẋ),  ẏ = x̂̇·w + x̂·ẇ + ḃ
Backward, g = dy·w:  dx = P(g)  (the same projection: P is self-adjoint); dγ / dscale = Σ dy⊙x̂ and dβ / dshift = Σ dy
over the rows sharing a parameter row, as float32 partial sums per program (the host adds the partials).
Reverse over forward (a cotangent ḡ of ẏ; the gradients of the tangents are the backward above with dy = ḡ): with
a = ḡ·w and dr/dx = −r²·x̂/D, differentiating ⟨a, P(ẋ)⟩ + ⟨ḡ·ẇ, x̂⟩ in x gives
    dx = −r·(x̂·mean(a⊙P(ẋ)) + P(a·mean(x̂⊙ẋ) + ẋ·mean(a⊙x̂))) + P(ḡ⊙ẇ),   dγ / dscale = Σ ḡ⊙P(ẋ)
(the same formula for RMSNorm with its P); β / shift do not enter ẏ's dependence on the primals.
"""
import triton
import triton.language as tl

from flowkern.kernels.rows import load_row, row_offsets, store_row


@triton.jit
def _normalize(x, mask, n_cols, eps, IS_RMS: tl.constexpr):
    """(x̂, μ, r) of one float32 row x [BLOCK_D] (0 outside the mask)."""
    if IS_RMS:
        mean = tl.sum(x, axis=0) * 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)  # [BLOCK_D]
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    return xc * rstd, mean, rstd


@triton.jit
def _project(v, xhat, rstd, mask, n_cols, IS_RMS: tl.constexpr):
    """P(v) = r·(v − mean(v) − x̂·mean(x̂⊙v)) (no mean(v) term for RMSNorm), 0 outside the mask. [BLOCK_D]"""
    c = tl.sum(xhat * v, axis=0) / n_cols
    if IS_RMS:
        out = rstd * (v - xhat * c)
    else:
        out = rstd * (v - tl.sum(v, axis=0) / n_cols - xhat * c)
    return tl.where(mask, out, 0.0)


@triton.jit
def _row_weight(W, w_row, stride_w, cols, mask, HAS_W: tl.constexpr, ONE_PLUS: tl.constexpr):
    """The effective per-column weight w [BLOCK_D] of one row: γ, 1 + scale, or 1."""
    if HAS_W:
        w = load_row(W, w_row, stride_w, cols, mask)
        if ONE_PLUS:
            w = w + 1.0
    else:
        w = tl.where(mask, 1.0, 0.0)
    return w


@triton.jit
def norm_fwd_kernel(
    X, XT, W, B, WT, BT, Y, YT, MEAN, RSTD,
    stride_x, stride_xt, stride_w, stride_b, stride_wt, stride_bt, stride_y, stride_yt,
    n_cols, group, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ONE_PLUS: tl.constexpr,
    HAS_TANGENT: tl.constexpr, HAS_WT: tl.constexpr, HAS_BT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y (and ẏ when HAS_TANGENT) of one row; μ and r saved (float32) for the backward. Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    w_row = row // group
    cols, mask = row_offsets(n_cols, BLOCK_D)
    x = load_row(X, row, stride_x, cols, mask)  # [BLOCK_D]
    xhat, mean, rstd = _normalize(x, mask, n_cols, eps, IS_RMS)
    w = _row_weight(W, w_row, stride_w, cols, mask, HAS_W, ONE_PLUS)  # [BLOCK_D]
    y = xhat * w
    if HAS_B:
        y += load_row(B, w_row, stride_b, cols, mask)
    store_row(Y, row, stride_y, cols, mask, y)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    if HAS_TANGENT:
        x_t = load_row(XT, row, stride_xt, cols, mask)  # [BLOCK_D]
        y_t = _project(x_t, xhat, rstd, mask, n_cols, IS_RMS) * w
        if HAS_WT:
            y_t += xhat * load_row(WT, w_row, stride_wt, cols, mask)
        if HAS_BT:
            y_t += load_row(BT, w_row, stride_bt, cols, mask)
        store_row(YT, row, stride_yt, cols, mask, y_t)


@triton.jit
def norm_bwd_kernel(
    X, W, DY, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_x, stride_w, stride_dy, stride_dx,
    n_cols, group, rows_per_prog, n_chunks,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, ONE_PLUS: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = P(dy·w) per row, and partial sums of dy⊙x̂ (dγ / dscale) and dy (dβ / dshift), from the saved μ, r.

    Grid: (n_groups, n_chunks). Program (g, c) walks rows g·group + [c·rows_per_prog, (c+1)·rows_per_prog) ∩ its
    group (they share parameter row g, loaded once) and writes its float32 partials to DW_PART / DB_PART
    [n_groups, n_chunks, D]; the host sums over the chunks.
    """
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols, mask = row_offsets(n_cols, BLOCK_D)
    if NEED_DX:
        w = _row_weight(W, g, stride_w, cols, mask, HAS_W, ONE_PLUS)  # [BLOCK_D]
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    db_acc = tl.zeros([BLOCK_D], tl.float32)
    first = c * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, group - first)):
        row = g * group + first + i
        x = load_row(X, row, stride_x, cols, mask)  # [BLOCK_D]
        dy = load_row(DY, row, stride_dy, cols, mask)  # [BLOCK_D]
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, x - mean, 0.0) * rstd  # [BLOCK_D]
        if NEED_DX:
            store_row(DX, row, stride_dx, cols, mask, _project(dy * w, xhat, rstd, mask, n_cols, IS_RMS))
        dw_acc += dy * xhat
        db_acc += dy
    part = (g * n_chunks + c) * n_cols
    if NEED_DW:
        tl.store(DW_PART + part + cols, dw_acc, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + part + cols, db_acc, mask=mask)


@triton.jit
def norm_tangent_bwd_kernel(
    X, XT, W, WT, DYT, MEAN, RSTD, DX, DW_PART,
    stride_x, stride_xt, stride_w, stride_wt, stride_dyt, stride_dx,
    n_cols, group, rows_per_prog, n_chunks,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, ONE_PLUS: tl.constexpr, HAS_WT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The mixed term of reverse over forward (module docstring): dx per row and partial sums of ḡ⊙P(ẋ).

    Grid and partials as `norm_bwd_kernel`: program (g, c) walks its chunk of the rows sharing parameter row g.
    """
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols, mask = row_offsets(n_cols, BLOCK_D)
    w = _row_weight(W, g, stride_w, cols, mask, HAS_W, ONE_PLUS)  # [BLOCK_D]
    if HAS_WT:
        w_t = load_row(WT, g, stride_wt, cols, mask)  # [BLOCK_D]
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    first = c * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, group - first)):
        row = g * group + first + i
        x = load_row(X, row, stride_x, cols, mask)  # [BLOCK_D]
        v = load_row(XT, row, stride_xt, cols, mask)  # [BLOCK_D]
        dyt = load_row(DYT, row, stride_dyt, cols, mask)  # [BLOCK_D]
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, x - mean, 0.0) * rstd  # [BLOCK_D]
        p_v = _project(v, xhat, rstd, mask, n_cols, IS_RMS)  # [BLOCK_D]
        if NEED_DX:
            a = dyt * w
            inner = a * (tl.sum(xhat * v, axis=0) / n_cols) + v * (tl.sum(a * xhat, axis=0) / n_cols)
            dx = -rstd * (xhat * (tl.sum(a * p_v, axis=0) / n_cols) + _project(inner, xhat, rstd, mask, n_cols, IS_RMS))
            if HAS_WT:
                dx += _project(dyt * w_t, xhat, rstd, mask, n_cols, IS_RMS)
            store_row(DX, row, stride_dx, cols, mask, dx)
        dw_acc += dyt * p_v
    if NEED_DW:
        tl.store(DW_PART + (g * n_chunks + c) * n_cols + cols, dw_acc, mask=mask)
