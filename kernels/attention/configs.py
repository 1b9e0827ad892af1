"""Autotuned entry points of the attention kernels, and the block configs each may take per head dim.

The candidate lists come from the compile-level report (`python3 benchmarks/kernel_report.py --sweep`, no GPU
needed): every (BLOCK_M, BLOCK_N, warps) compiled for sm_90 with the JIT's own specialisation at B=1, H=32, N=8192,
bf16, keeping the configs with no spills in both the full and the causal compile (for the TMA lists: none inside a
loop, on Triton 3.6 and 3.9), only wgmma (HGMMA) matrix instructions and shared memory within the 227 KiB a program
may take, ranked by main-loop warp instructions per thousand score elements (lower first). The first candidate is
the pinned config (FLOWKERN_AUTOTUNE=0, the GPU check's headline); where the best-ranked tile needs nearly all the
shared memory, it comes second, and so does a 4-warp tile within 10% of an 8-warp one (one warpgroup has no second
one to run its softmax while the other's GEMMs run). Pipelining depth 3 comes before 2 (two stages leave the next
tile's loads exposed) unless a tile names its depth. At head dim 256 the sweep is narrower (BLOCK_M 32/64, BLOCK_N
16/32/64) and only the plain forward has wgmma-only tiles; the other lists there take tiles with no spill inside the
loop, and the pointer path's forward + tangent has none (its list predates the report). On a GPU the autotuner picks among the candidates of the call's padded head dim and loads (TMA or
pointers), per (sequence lengths, flags); in Triton's interpreter there is one small config, with BLOCK_M ≠ BLOCK_N
so the causal tile bounds are exercised (and, from 32 rows and 16 keys on, both interior and edge tiles).
"""
import triton

from flowkern._config import autotune_enabled, triton_interpreting
from flowkern.kernels.attention.bwd import (attention_bwd_delta_kernel, attention_bwd_dkdv_kernel,
                                           attention_bwd_dq_kernel)
from flowkern.kernels.attention.fwd import attention_fwd_kernel
from flowkern.kernels.attention.tangent_bwd import (tangent_bwd_dkdv_kernel, tangent_bwd_dq_kernel,
                                                   tangent_bwd_rows_kernel)

_INTERPRETER = triton_interpreting()

# (BLOCK_M, BLOCK_N, num_warps[, num_stages]) by padded head dim (≤ 64, 128, 256), best first; a tile without a
# depth takes 3 then 2 stages. sm_90 report (regs, warp instructions per 1000 scores) in benchmarks/RESULTS.md.
_FWD_TANGENT = {64: [(128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)],
                128: [(128, 32, 8), (64, 16, 4)],   # every wider tile spills; (64,16,4) issues 1.5x per score
                256: [(32, 16, 8), (64, 16, 8)]}
_FWD = {64: [(128, 128, 8), (64, 128, 4), (128, 64, 4), (128, 64, 8)],
        128: [(128, 128, 8), (128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)],  # (128,128,8): 0.85x (128,64,8)
        256: [(64, 32, 4), (64, 64, 8), (64, 16, 4)]}
# Key/value tiles through TMA descriptors (`tma_loads`): registers no longer hold the loads in flight, and the
# 128-key tiles compile with no spill inside the loop on Triton 3.6 and 3.9, full and causal (--sweep, ranked by
# the mean over both versions and both masks). Warp instructions per score against the pointer path's pinned tile:
# forward + tangent 0.77x (D = 64) and 0.62x (D = 128), forward 0.95x and 0.75x. (128,64,8) at D = 128 needs
# 256 KiB with 3 stages: 2 only.
# D = 256 from the narrow sweep (BLOCK_M 32/64, BLOCK_N 16/32/64): only the plain forward has wgmma-only tiles there;
# the others take the tiles with no spill inside the loop (they mix in mma.sync). Against the old first tile at 256,
# (32,16,8) with pointers: forward + tangent 0.27x, forward 0.11x, dK/dV 0.30x, dQ 0.31x.
_FWD_TANGENT_TMA = {64: [(128, 128, 8), (64, 128, 4), (64, 64, 4), (128, 64, 8)],
                    128: [(128, 64, 8, 2), (64, 64, 4), (128, 32, 8), (64, 32, 4)],
                    256: [(32, 64, 8, 2), (32, 32, 8)]}
_FWD_TMA = {64: [(128, 128, 8), (128, 128, 4), (64, 128, 4), (128, 64, 4)],
            128: [(128, 128, 8), (64, 128, 4), (128, 64, 8), (64, 64, 4)],
            256: [(64, 64, 4), (64, 32, 4), (32, 64, 4)]}
_BWD_DKDV = {64: [(64, 64, 4), (128, 64, 8), (64, 64, 8)],
             128: [(128, 64, 8, 2), (64, 64, 8)],   # (64,64,4) spills; (128,64,8) needs 243 KiB with 3 stages
             256: [(32, 32, 8, 2), (32, 16, 8)]}
_BWD_DQ = {64: [(128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)],
           128: [(128, 32, 8), (64, 32, 4)],
           256: [(32, 64, 8), (32, 16, 4), (32, 32, 8)]}
# The backward with descriptors (dQ: key/value tiles; dK/dV: query and dO tiles), same rule.
_BWD_DKDV_TMA = {64: [(128, 128, 8), (64, 64, 4), (128, 64, 8)],
                 128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8)],  # (64,64,4,2): 1 spill in the loop on 3.6
                 256: [(64, 16, 4)]}
_BWD_DQ_TMA = {64: [(128, 128, 8), (64, 128, 4), (64, 64, 4), (128, 64, 8)],
               128: [(128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)],
               256: [(32, 64, 8), (32, 32, 4), (32, 16, 4)]}
_STAGES = (3, 2)

# The walks that Triton < 3.9 also compiles as interior + edge loops with a spill-free main (interior) loop,
# shorter than its one loop, at the pinned tile of their TMA list: (kernel, head-dim bucket), with descriptors only
# (with pointers 3.6 spills hundreds of registers in the main loop). From `kernel_report.py` on Triton 3.6 with
# FLOWKERN_SPLIT_TILES=1 against 0 (RESULTS.md): the main loop is 1–34% shorter per score. Some keep a few spill
# instructions in their edge loop, which runs for the few masked tiles of a program. Not listed: dK/dV at 256 (a
# spill in the main loop), the tangent dQ pass (longer when split), the tangent dK/dV at 128 and 256 (their pinned
# tiles spill in the main loop either way).
SPLIT_BEFORE_3_9 = {("fwd", 64), ("fwd", 128), ("fwd", 256), ("fwd_tangent", 64), ("fwd_tangent", 128),
                    ("fwd_tangent", 256), ("bwd_dq", 64), ("bwd_dq", 128), ("bwd_dq", 256), ("bwd_dkdv", 64),
                    ("bwd_dkdv", 128), ("tangent_bwd_dkdv", 64)}


def splits_before_3_9(kernel: str, head_dim: int, tma: bool) -> bool:
    """Whether `kernel` (fwd, fwd_tangent, bwd_dq, bwd_dkdv, tangent_bwd_dq, tangent_bwd_dkdv) at `head_dim` (its
    list's bucket) walks interior + edge loops on Triton < 3.9 too: listed in SPLIT_BEFORE_3_9 and read through
    TMA descriptors."""
    return tma and (kernel, _bucket(head_dim)) in SPLIT_BEFORE_3_9


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _tiles(entries) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) of a list's entries, in order: an entry without a depth takes each of
    _STAGES, one with a depth that depth only."""
    return [(*entry[:3], stages) for entry in entries for stages in (entry[3:] or _STAGES)]


def _key(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(*tables):
    if _INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    tiles = dict.fromkeys(tile for table in tables for bucket in (64, 128, 256) for tile in _tiles(table[bucket]))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in tiles]


def _pruner(choose):
    """Keep the candidates of the call's table (`choose(flag)`, flag(name) a constexpr of the launch) and head-dim
    bucket, in the table's order (the first one only without autotuning)."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRETER:
            return configs

        def flag(name):
            return kwargs.get(name, named_args.get(name, False))

        order = {tile: i for i, tile in enumerate(_tiles(choose(flag)[_bucket(flag("BLOCK_D"))]))}
        kept = sorted((c for c in configs if _key(c) in order), key=lambda c: order[_key(c)])
        return kept if autotune_enabled() else kept[:1]

    return prune


def _by_loads(table, tma_table):
    return lambda flag: tma_table if flag("TMA") else table


_KEY = ["seq_q", "seq_k", "BLOCK_D", "CAUSAL", "MASK_KIND"]

attention_fwd = triton.autotune(
    configs=_configs(_FWD, _FWD_TANGENT, _FWD_TMA, _FWD_TANGENT_TMA),
    key=_KEY + ["HAS_TANGENT", "TMA"],
    prune_configs_by={"early_config_prune": _pruner(
        lambda flag: {(False, False): _FWD, (True, False): _FWD_TANGENT, (False, True): _FWD_TMA,
                      (True, True): _FWD_TANGENT_TMA}[bool(flag("HAS_TANGENT")), bool(flag("TMA"))])},
)(attention_fwd_kernel)

attention_bwd_dkdv = triton.autotune(
    configs=_configs(_BWD_DKDV, _BWD_DKDV_TMA), key=_KEY + ["TMA"],
    prune_configs_by={"early_config_prune": _pruner(_by_loads(_BWD_DKDV, _BWD_DKDV_TMA))},
)(attention_bwd_dkdv_kernel)

attention_bwd_dq = triton.autotune(
    configs=_configs(_BWD_DQ, _BWD_DQ_TMA), key=_KEY + ["TMA"],
    prune_configs_by={"early_config_prune": _pruner(_by_loads(_BWD_DQ, _BWD_DQ_TMA))},
)(attention_bwd_dq_kernel)

DELTA_BLOCK_M = 32 if _INTERPRETER else 128
attention_bwd_delta = attention_bwd_delta_kernel

# The tangent backward (kernels/attention/tangent_bwd.py) holds three (dQ pass) or four (dK/dV pass) float32
# [tile, BLOCK_D] accumulators next to four input tiles: narrow tiles. Candidates from compiling for sm_90 (bf16):
# spill-free at head dims 64 and 128 with and without the cotangent of O (HAS_DO), and for the dK/dV pass at 256.
# The dQ pass at D = 64 leads with the two tiles of the kernel report's sweep (`--kernels tbwd --sweep`) that are
# spill-free and wgmma-only on both Triton 3.6 and 3.9, full and causal: (64,32,4) issues 0.61x (3.9) / 0.61x (3.6)
# the warp instructions per score of the mma.sync tile (32,64,8). No dK/dV tile of that sweep is wgmma-only and
# spill-free at D = 64; every D = 128 tile of 64 rows or more spills.
_TANGENT_BWD_DKDV = {64: [(32, 64, 8), (32, 32, 8), (16, 32, 8)],
                     128: [(32, 16, 8), (16, 32, 8), (16, 16, 8)],
                     256: [(16, 16, 8)]}
_TANGENT_BWD_DQ = {64: [(64, 32, 4), (128, 32, 8), (32, 64, 8), (32, 32, 8)],
                   128: [(16, 32, 8), (16, 16, 8)],
                   256: [(16, 16, 8)]}  # the least-spilling (6 spill stores); every wider tile spills more
_TANGENT_KEY = _KEY + ["HAS_DO", "TMA"]

tangent_bwd_dkdv = triton.autotune(
    configs=_configs(_TANGENT_BWD_DKDV), key=_TANGENT_KEY,
    prune_configs_by={"early_config_prune": _pruner(lambda flag: _TANGENT_BWD_DKDV)},
)(tangent_bwd_dkdv_kernel)

tangent_bwd_dq = triton.autotune(
    configs=_configs(_TANGENT_BWD_DQ), key=_TANGENT_KEY,
    prune_configs_by={"early_config_prune": _pruner(lambda flag: _TANGENT_BWD_DQ)},
)(tangent_bwd_dq_kernel)

tangent_bwd_rows = tangent_bwd_rows_kernel  # block: DELTA_BLOCK_M
