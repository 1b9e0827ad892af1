"""The score tile and its softmax exponentials, shared by the attention forward and every backward kernel, so that
each pass removes the same keys and takes exp(S − m) by the same formula.

With c the scale, S = c·QKᵀ (+ mask) and m a row's max, every kernel forms `masked_scores` of a tile, then (forward)
its row max and exp(S − m) (`softmax_exp`). The scores stay in natural units and c·QKᵀ is rounded on its own
(`mul_rn`), before m is subtracted:
* a padding mask of finfo(float32).min would overflow to −∞ if it were multiplied by log₂e first, and a row whose
  every key carries it must still average its values uniformly, as SDPA does;
* S − m is then exactly 0 at a row's max, so a one-hot row (logits scaled by ±1e4) has P = 1 exactly and its
  gradients vanish exactly. Folding c·log₂e into one FMA with the subtraction (QKᵀ·c·log₂e − m·log₂e) saves an
  instruction an element but leaves the max at 2^(±|m|·2⁻²⁴): at |S| = 1e4 that moved Ȯ by 1e-2 and dQ by 2.6e-3.
"""
import triton
import triton.language as tl

from flowkern.kernels.utils import LOG2E, exp2_ftz, mul_rn

# MASK_KIND: `flowkern.attention.spec.MASK_NONE` (0), MASK_BOOL (1: True keeps a score, as a boolean `attn_mask` of
# F.scaled_dot_product_attention), MASK_ADDITIVE (2: added to c·QKᵀ, −inf removes a score); compared as literals.


@triton.jit
def masked_scores(qk, offs_m, offs_n, mask_base, stride_mask_m, stride_mask_n, seq_q, seq_k, scale, causal_offset,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr):
    """Scores in natural units, s = c·qk (+ mask), with s − ∞ where a score is removed.

    qk:      [BLOCK_M, BLOCK_N] float32, Q·Kᵀ of the tile
    offs_m:  [BLOCK_M] query rows;  offs_n: [BLOCK_N] key columns
    Removed: keys ≥ seq_k; keys j > i + causal_offset when CAUSAL (offset 0: top-left aligned, SDPA's is_causal;
    seq_k − seq_q: bottom-right aligned, `causal_lower_right`); False entries of a boolean mask; −inf entries of an
    additive mask. A removed score becomes s − ∞, as SDPA's math backend adds −∞: −∞ for a finite s, NaN for a NaN
    one (a NaN key poisons every row that reads it, masked or not, exactly as in SDPA).
    Rows ≥ seq_q are left as they are: their results are never stored.
    EDGE=False is the caller's promise that the tile lies inside [0, seq_k) and, when CAUSAL, wholly on or below
    the diagonal for every row: the bounds and causal tests are skipped (the attention mask, if any, still applies).
    """
    s = mul_rn(qk, scale)
    if EDGE:
        keep = (offs_n < seq_k)[None, :]  # [1, BLOCK_N]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)  # [BLOCK_M, BLOCK_N]
    if MASK_KIND != 0:
        mask_ptrs = (mask_base + offs_m[:, None].to(tl.int64) * stride_mask_m
                     + offs_n[None, :].to(tl.int64) * stride_mask_n)
        in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
        if MASK_KIND == 1:
            kept = tl.load(mask_ptrs, mask=in_bounds, other=0) != 0
            keep = keep & kept if EDGE else kept
        else:
            s = s + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    if EDGE or MASK_KIND == 1:
        s = tl.where(keep, s, s - float("inf"))
    return s


@triton.jit
def softmax_exp(s, row_max):
    """[BLOCK_M, BLOCK_N] exp(S − m) from `masked_scores` s and the rows' m [BLOCK_M]: 0 where removed."""
    return exp2_ftz((s - row_max[:, None]) * LOG2E)


@triton.jit
def key_tile_ranges(start_m, seq_k, causal_offset, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(interior, hi) for the query tile whose first row is start_m, walking key tiles from 0: the tiles below
    `interior` lie inside [0, seq_k) and, when CAUSAL, on or below every row's diagonal (no test needed); those in
    [interior, hi) are the edge tiles (the diagonal band, the last partial tile); keys from hi on are all removed.
    SPLIT=False: interior = 0, every tile an edge tile (one loop, see `flowkern._config.split_tiles`)."""
    hi = seq_k
    interior = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(0, tl.minimum(seq_k, start_m + BLOCK_M + causal_offset))
        kept_by_all = tl.maximum(0, start_m + causal_offset + 1)  # keys [0, kept_by_all) every row keeps
        interior = tl.minimum(interior, (kept_by_all // BLOCK_N) * BLOCK_N)
    if not SPLIT:
        interior = 0
    return interior, hi


@triton.jit
def query_tile_ranges(start_n, seq_q, seq_k, causal_offset, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, interior_lo, interior_hi) for the key tile whose first key is start_n, walking query tiles: tiles
    before lo see none of its keys (causal); those in [interior_lo, interior_hi) are inside [0, seq_q), see a key
    tile inside [0, seq_k) and, when CAUSAL, keep all its keys in every row; [lo, interior_lo) and
    [interior_hi, seq_q) are the edge tiles. SPLIT=False: interior_lo = interior_hi = seq_q rounded up to a
    whole tile, every tile from lo on an edge tile (one loop)."""
    lo = 0
    interior_hi = (seq_q // BLOCK_M) * BLOCK_M
    interior_lo = 0
    if CAUSAL:  # query rows before this key tile's first key (− offset) see none of it
        lo = (tl.maximum(0, start_n - causal_offset) // BLOCK_M) * BLOCK_M
        first_full_row = tl.maximum(0, start_n + BLOCK_N - 1 - causal_offset)  # the first row keeping every key
        interior_lo = tl.cdiv(first_full_row, BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > seq_k:  # a partial key tile: every query tile tests the key bounds
        interior_lo = interior_hi
    interior_lo = tl.minimum(tl.maximum(interior_lo, lo), interior_hi)
    if not SPLIT:
        interior_hi = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
        interior_lo = interior_hi
    return lo, interior_lo, interior_hi
