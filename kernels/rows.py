"""Row helpers shared by the memory-bound row kernels (norms, modulation, gated residual).

The row kernels view their tensors as [rows, D] with unit stride along D. A per-row parameter tensor (γ, β, adaLN
shift/scale, gate) is [n_groups, D]: row r reads its row r // group (group = rows for a shared γ, the number of
tokens per sample for a per-sample [B, D] conditioning, 1 for a per-token one). Loads are float32, masked to 0.
"""
import triton
import triton.language as tl


@triton.jit
def row_offsets(n_cols, BLOCK_D: tl.constexpr):
    """Column offsets [BLOCK_D] of one row and the mask of those inside [0, n_cols)."""
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    return cols, cols < n_cols


@triton.jit
def load_row(base, row, stride_row, cols, mask):
    """base[row, cols] as float32 [BLOCK_D], 0 outside the mask. `row` is int64."""
    return tl.load(base + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row(base, row, stride_row, cols, mask, value):
    """base[row, cols] = value, cast to the element type of `base`."""
    tl.store(base + row * stride_row + cols, value.to(base.dtype.element_ty), mask=mask)
