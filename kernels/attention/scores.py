"""The masked, scaled score tile S = c·QKᵀ (+ mask), shared by the attention forward and both backward kernels,
so every pass sees exactly the same masking."""
import triton
import triton.language as tl

from flowkern.kernels.utils import LOG2E

# MASK_KIND: `flowkern.attention.spec.MASK_NONE` (0), MASK_BOOL (1: True keeps a score, as a boolean `attn_mask` of
# F.scaled_dot_product_attention), MASK_ADDITIVE (2: added to c·QKᵀ, −inf removes a score); compared as literals.

@triton.jit
def masked_scores_log2(qk, offs_m, offs_n, mask_base, stride_mask_m, stride_mask_n, seq_q, seq_k, scale_log2,
                       CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores in base-2 units: s₂ = log₂e·(c·qk + mask), −inf where a score is removed.

    qk:      [BLOCK_M, BLOCK_N] float32, Q·Kᵀ of the tile
    offs_m:  [BLOCK_M] query rows;  offs_n: [BLOCK_N] key columns
    Removed: keys ≥ seq_k; keys j > i when CAUSAL (top-left aligned, as `F.scaled_dot_product_attention`'s
    is_causal, also when seq_q ≠ seq_k); False entries of a boolean mask; −inf entries of an additive mask.
    Rows ≥ seq_q are left as they are: their results are never stored.
    """
    keep = (offs_n < seq_k)[None, :]  # [1, BLOCK_N]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])  # [BLOCK_M, BLOCK_N]
    s = qk * scale_log2
    if MASK_KIND != 0:
        mask_ptrs = (mask_base + offs_m[:, None].to(tl.int64) * stride_mask_m
                     + offs_n[None, :].to(tl.int64) * stride_mask_n)
        in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
        if MASK_KIND == 1:
            keep = keep & (tl.load(mask_ptrs, mask=in_bounds, other=0) != 0)
        else:
            s = s + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    return tl.where(keep, s, float("-inf"))
