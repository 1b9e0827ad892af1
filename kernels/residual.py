"""The gated residual with its tangent, one program per row [D] (gate row r // group, see kernels/rows.py):
    out = x + g⊙y,   ȯut = ẋ + ġ⊙y + g⊙ẏ;   backward: dx = dout, dy = g⊙dout, dg = Σ dout⊙y over the rows sharing
    a gate row (float32 partial sums per program, added by the host).
"""
import triton
import triton.language as tl

from flowkern.kernels.rows import load_row, row_offsets, store_row


@triton.jit
def gated_residual_fwd_kernel(
    X, G, Y, XT, GT, YT, OUT, OUTT,
    stride_x, stride_g, stride_y, stride_xt, stride_gt, stride_yt, stride_out, stride_outt,
    n_cols, group, HAS_TANGENT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = x + g⊙y and (HAS_TANGENT) ȯut = ẋ + ġ⊙y + g⊙ẏ for one row. Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    g_row = row // group
    cols, mask = row_offsets(n_cols, BLOCK_D)
    x = load_row(X, row, stride_x, cols, mask)  # [BLOCK_D]
    g = load_row(G, g_row, stride_g, cols, mask)  # [BLOCK_D]
    y = load_row(Y, row, stride_y, cols, mask)  # [BLOCK_D]
    store_row(OUT, row, stride_out, cols, mask, x + g * y)
    if HAS_TANGENT:
        out_t = load_row(XT, row, stride_xt, cols, mask) + load_row(GT, g_row, stride_gt, cols, mask) * y \
            + g * load_row(YT, row, stride_yt, cols, mask)
        store_row(OUTT, row, stride_outt, cols, mask, out_t)


@triton.jit
def gated_residual_bwd_kernel(
    G, Y, DOUT, DY, DG_PART, stride_g, stride_y, stride_dout, stride_dy,
    n_cols, group, rows_per_prog, n_chunks, NEED_DY: tl.constexpr, NEED_DG: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy = g⊙dout per row and float32 partial sums of dout⊙y (the gate gradient).

    Grid: (n_groups, n_chunks), rows as in kernels/norms.py::norm_bwd_kernel; partials [n_groups, n_chunks, D].
    """
    gi = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols, mask = row_offsets(n_cols, BLOCK_D)
    if NEED_DY:
        g = load_row(G, gi, stride_g, cols, mask)  # [BLOCK_D]
    dg_acc = tl.zeros([BLOCK_D], tl.float32)
    first = c * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, group - first)):
        row = gi * group + first + i
        dout = load_row(DOUT, row, stride_dout, cols, mask)  # [BLOCK_D]
        if NEED_DY:
            store_row(DY, row, stride_dy, cols, mask, g * dout)
        if NEED_DG:
            dg_acc += load_row(Y, row, stride_y, cols, mask) * dout
    if NEED_DG:
        tl.store(DG_PART + (gi * n_chunks + c) * n_cols + cols, dg_acc, mask=mask)
