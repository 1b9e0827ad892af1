"""Flow-map jump, and its joint log-density update, in one elementwise pass.

With the average-velocity parameterisation of a flow map (docs/conventions.md), one jump from time t to time s is

    Φ(x, t, s) = x + (s − t)·u(x, t, s)

and the joint state y = (x, ℓ = log p) jumps with the same step h = s − t:

    ℓ_s = ℓ_t + (s − t)·D(x, t, s),   D(x, t, s) = −(1/(s − t))·∫_t^s div v(x_τ, τ) dτ.

Per sample b (t, s and ℓ are per sample, x and u are [B, F] with F the flattened feature size):

    h_b      = s_b − t_b                         (float32)
    y[b, f]  = x[b, f] + h_b·u[b, f]              (float32 maths, stored in the dtype of x)
    ℓ'[b]    = ℓ[b] + h_b·D[b]                    (HAS_LOGP only; written by the programs of feature block 0)

Grid: (cdiv(B, BLOCK_B), cdiv(F, BLOCK_F)); a program owns a [BLOCK_B, BLOCK_F] tile (BLOCK_B = 1, one sample
per program, when F is large; several samples per program when F is small, 2-D toys say). Y may be X (in place):
every element is read and written by the same program. Feature stride is 1 (the host flattens to contiguous rows).
"""
import triton
import triton.language as tl

from flowkern.kernels.utils import load_tile, store_tile


@triton.jit
def flow_map_jump_kernel(
    X, U, T, S, Y, LOGP, DIV, LOGP_OUT,
    batch, features,
    stride_xb, stride_ub, stride_yb, stride_t, stride_s, stride_lp, stride_div, stride_lpo,
    HAS_LOGP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    row_mask = rows < batch  # [BLOCK_B]

    t = tl.load(T + rows * stride_t, mask=row_mask, other=0.0).to(tl.float32)  # [BLOCK_B]
    s = tl.load(S + rows * stride_s, mask=row_mask, other=0.0).to(tl.float32)  # [BLOCK_B]
    h = s - t  # [BLOCK_B]

    x = load_tile(X, rows, cols, stride_xb, 1, batch, features, 0.0).to(tl.float32)  # [BLOCK_B, BLOCK_F]
    u = load_tile(U, rows, cols, stride_ub, 1, batch, features, 0.0).to(tl.float32)  # [BLOCK_B, BLOCK_F]
    y = x + h[:, None] * u  # [BLOCK_B, BLOCK_F]
    store_tile(Y, y, rows, cols, stride_yb, 1, batch, features)

    if HAS_LOGP:
        if pid_f == 0:
            lp = tl.load(LOGP + rows * stride_lp, mask=row_mask, other=0.0).to(tl.float32)  # [BLOCK_B]
            d = tl.load(DIV + rows * stride_div, mask=row_mask, other=0.0).to(tl.float32)  # [BLOCK_B]
            lp_new = lp + h * d  # [BLOCK_B]
            tl.store(LOGP_OUT + rows * stride_lpo, lp_new.to(LOGP_OUT.dtype.element_ty), mask=row_mask)
