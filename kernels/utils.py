"""Helpers shared by every Triton kernel family."""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x·log2 e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST multiplies in float32 (the operands are exact in float32): Triton's CPU interpreter gets bfloat16 dots
    wrong, so the host sets it there. INPUT_PRECISION ('ieee' or 'tf32') applies to float32 operands.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols, other: tl.constexpr):
    """Load base[rows[:, None], cols[None, :]] (strided, int64 offsets), `other` outside [0, n_rows) x [0, n_cols)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def store_tile(base, value, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """Store `value` to base[rows[:, None], cols[None, :]] inside [0, n_rows) x [0, n_cols)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)
