"""Helpers shared by every Triton kernel family."""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from flowkern._config import triton_interpreting

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
def tile_pointers(base, rows, cols, stride_row, stride_col):
    """Pointers base[rows[:, None], cols[None, :]] (int64 offsets)."""
    return base + rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col


@triton.jit
def tile_mask(rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr = True):
    """[rows, cols] True inside [0, n_rows) x [0, n_cols); CHECK_ROWS=False tests the columns only ([1, cols])."""
    if CHECK_ROWS:
        return (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    else:
        return (cols < n_cols)[None, :]


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols, other: tl.constexpr,
              CHECK_ROWS: tl.constexpr = True):
    """Load base[rows[:, None], cols[None, :]] (strided, int64 offsets), `other` outside [0, n_rows) x [0, n_cols).
    CHECK_ROWS=False: the caller knows every row is inside [0, n_rows); only the columns are tested."""
    return tl.load(tile_pointers(base, rows, cols, stride_row, stride_col),
                   mask=tile_mask(rows, cols, n_rows, n_cols, CHECK_ROWS), other=other)


@triton.jit
def load_own_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols, other: tl.constexpr):
    """A program's own row tile (the one it will store results for), `load_tile` with the rows past n_rows read
    as row n_rows − 1 instead of masked: those rows are computed on real data and never stored, and no row
    predicate lives from this load to the program's masked stores at its end (ptxas spilled it across the main
    loop of the attention kernels). n_rows ≥ 1."""
    return load_tile(base, own_rows(rows, n_rows), cols, stride_row, stride_col, n_rows, n_cols, other, False)


@triton.jit
def own_rows(rows, n_rows):
    """rows with those past n_rows replaced by n_rows − 1: the rows a program reads its own per-row values from
    (`load_own_tile`); n_rows ≥ 1."""
    return tl.minimum(rows, n_rows - 1)


@triton.jit
def row_tiles(base, n_rows, n_cols, stride_row, stride_col, offs_rows, offs_cols,
              TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Where a walk over the row tiles of the matrix base[:n_rows, :n_cols] reads them from: a TMA tensor
    descriptor of [BLOCK_ROWS, BLOCK_COLS] boxes (TMA, sm_90: the copy engine does the address arithmetic and the
    bounds, and the tile lands in shared memory without passing through registers), else the pointers of the tile
    at rows `offs_rows` (the walk advances them). TMA is the host's promise that stride_col == 1, base is
    16-byte aligned and stride_row·itemsize is a multiple of 16."""
    if TMA:
        return tl.make_tensor_descriptor(base, [n_rows, n_cols], [stride_row, 1], [BLOCK_ROWS, BLOCK_COLS])
    else:
        return tile_pointers(base, offs_rows, offs_cols, stride_row, stride_col)


@triton.jit
def load_row_tile(tiles, start, shift, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, TMA: tl.constexpr):
    """The tile of `row_tiles` whose first row is `start` (rows = start + arange), 0 outside [0, n_rows) x
    [0, n_cols): a descriptor is indexed by `start` and fills out-of-range rows and columns with 0 itself; the
    pointers are offset by `shift` elements (0 for a walk that advances them) and masked, CHECK_ROWS=False being the
    caller's promise that every row is inside (columns are always tested)."""
    if TMA:
        return tiles.load([start, 0])
    else:
        return tl.load(tiles + shift, mask=tile_mask(rows, cols, n_rows, n_cols, CHECK_ROWS), other=0.0)


@triton.jit
def load_rows(ptrs, rows, n_rows, other: tl.constexpr, CHECK_ROWS: tl.constexpr = True):
    """Load ptrs (one per row), `other` where rows ≥ n_rows; CHECK_ROWS=False: every row is inside, no test."""
    if CHECK_ROWS:
        return tl.load(ptrs, mask=rows < n_rows, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def store_tile(base, value, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """Store `value` to base[rows[:, None], cols[None, :]] inside [0, n_rows) x [0, n_cols)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)



if triton_interpreting():  # no libdevice there; NumPy neither flushes subnormals nor contracts into FMAs
    @triton.jit
    def exp2_ftz(x):
        """2**x."""
        return tl.exp2(x)

    @triton.jit
    def mul_rn(x, y):
        """x·y rounded on its own."""
        return x * y
else:
    @triton.jit
    def mul_rn(x, y):
        """x·y rounded on its own (PTX `mul.rn.f32`): never contracted into an FMA with a later add, so that a
        difference of two such products is exactly 0 where they are equal."""
        return libdevice.mul_rn(x, y)

    @triton.jit
    def exp2_ftz(x):
        """2**x as one MUFU.EX2, float32 subnormal results flushed to zero.

        `tl.exp2`/`tl.exp` lower to PTX `ex2.approx.f32`, which keeps subnormal results: ptxas wraps every
        MUFU.EX2 in a range test and two conditional multiplies (four instructions an element). libdevice's exp2
        under the backend's flush-to-zero reflection is `ex2.approx.ftz.f32`: one instruction. For softmax weights
        2**x ≤ 1 a result below 2⁻¹²⁶ is 0 either way at any precision a row sum can resolve.
        """
        return libdevice.exp2(x)


@triton.jit
def exp_ftz(x):
    """e**x = 2**(x·log₂e), subnormal results flushed to zero (`exp2_ftz`)."""
    return exp2_ftz(x * LOG2E)
