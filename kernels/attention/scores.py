"""The masked, scaled score tile S = c·QKᵀ (+ mask), shared by the attention forward and both backward kernels,
so every pass sees exactly the same masking."""
import triton
import triton.language as tl

# MASK_KIND: `flowkern.attention.spec.MASK_NONE` (0), MASK_BOOL (1: True keeps a score, as a boolean `attn_mask` of
# F.scaled_dot_product_attention), MASK_ADDITIVE (2: added to c·QKᵀ, −inf removes a score); compared as literals.


@triton.jit
def masked_scores(qk, offs_m, offs_n, mask_base, stride_mask_m, stride_mask_n, seq_q, seq_k, scale, causal_offset,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores in natural units, s = c·qk (+ mask), with s − ∞ where a score is removed.

    qk:      [BLOCK_M, BLOCK_N] float32, Q·Kᵀ of the tile
    offs_m:  [BLOCK_M] query rows;  offs_n: [BLOCK_N] key columns
    Removed: keys ≥ seq_k; keys j > i + causal_offset when CAUSAL (offset 0: top-left aligned, SDPA's is_causal;
    seq_k − seq_q: bottom-right aligned, `causal_lower_right`); False entries of a boolean mask; −inf entries of an
    additive mask. A removed score becomes s − ∞, as SDPA's math backend adds −∞: −∞ for a finite s, NaN for a NaN
    one (a NaN key poisons every row that reads it, masked or not, exactly as in SDPA).
    The scores stay in natural units (exponentials take s − max): a padding mask of finfo(float32).min would
    overflow to −∞ if it were multiplied by log₂e first.
    Rows ≥ seq_q are left as they are: their results are never stored.
    """
    keep = (offs_n < seq_k)[None, :]  # [1, BLOCK_N]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)  # [BLOCK_M, BLOCK_N]
    s = qk * scale
    if MASK_KIND != 0:
        mask_ptrs = (mask_base + offs_m[:, None].to(tl.int64) * stride_mask_m
                     + offs_n[None, :].to(tl.int64) * stride_mask_n)
        in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
        if MASK_KIND == 1:
            keep = keep & (tl.load(mask_ptrs, mask=in_bounds, other=0) != 0)
        else:
            s = s + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    return tl.where(keep, s, s - float("inf"))
