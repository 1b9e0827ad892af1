"""Autotuned entry points of the attention kernels: the block sizes each may take.

On a GPU each kernel is tuned per (sequence lengths, padded head dim, feature flags); configs whose tiles cannot
fit (three [BLOCK_M, BLOCK_D] float32 accumulators for the tangent forward at head dim 256, say) are pruned before
compiling. With FLOWKERN_AUTOTUNE=0 (the GPU test suite) each kernel takes its first config. In Triton's
interpreter there is one small config, chosen with BLOCK_M ≠ BLOCK_N so the causal tile bounds are exercised.
"""
import triton

from flowkern._config import autotune_enabled, triton_interpreting
from flowkern.kernels.attention_bwd import (attention_bwd_delta_kernel, attention_bwd_dkdv_kernel,
                                           attention_bwd_dq_kernel)
from flowkern.kernels.attention_fwd import attention_fwd_kernel

_INTERPRETER = triton_interpreting()


def _configs(block_m, block_n, warps, stages):
    if _INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm in block_m for bn in block_n for w in warps for s in stages]
    return configs if autotune_enabled() else configs[:1]


def _prune_by_head_dim(configs, named_args, **kwargs):
    """Drop tiles that would spill at large head dims: BLOCK_M·BLOCK_D and BLOCK_N·BLOCK_D are capped."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    with_tangent = kwargs.get("HAS_TANGENT", named_args.get("HAS_TANGENT", False))
    budget = 8192 if with_tangent else 16384
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] * block_d <= budget and c.kwargs["BLOCK_N"] * block_d <= 16384]
    return kept or configs[:1]


_KEY = ["seq_q", "seq_k", "BLOCK_D", "CAUSAL", "MASK_KIND"]

attention_fwd = triton.autotune(
    configs=_configs([64, 128], [32, 64, 128], [4, 8], [2, 3]),
    key=_KEY + ["HAS_TANGENT"],
    prune_configs_by={"early_config_prune": _prune_by_head_dim},
)(attention_fwd_kernel)

attention_bwd_dkdv = triton.autotune(
    configs=_configs([32, 64], [64, 128], [4, 8], [2, 3]),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_by_head_dim},
)(attention_bwd_dkdv_kernel)

attention_bwd_dq = triton.autotune(
    configs=_configs([64, 128], [32, 64], [4, 8], [2, 3]),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_by_head_dim},
)(attention_bwd_dq_kernel)

DELTA_BLOCK_M = 32 if _INTERPRETER else 128
attention_bwd_delta = attention_bwd_delta_kernel
