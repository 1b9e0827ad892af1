"""Compile-level report of the attention kernels for a GPU target, without a GPU.

    python3 benchmarks/kernel_report.py [--arch 90] [--head-dim 64 128] [--sweep] [--jobs 2] [--json out.json]

Each launch is captured from flowkern's host launcher at the headline shape (B=1, H=32, N=8192, bf16) and compiled
with the JIT's own specialisation (`jit_compile.py`: stride == 1 and group == 1 as constants, 16-divisible ints and
16-byte-aligned pointers marked) for every candidate config of `kernels/attention/configs.py` (`--sweep`: every
tile of a wider grid; narrower tiles at head dim 256). Per kernel and config it prints, from the cubin (the cuobjdump/nvdisasm bundled with Triton):

* regs, stack bytes and spill instructions (STL stores / LDL loads to local memory; `in loop`: those inside a
  loop with matrix instructions, paid every tile of it; `in main`: those inside the main loop alone);
* shared memory bytes per program;
* the matrix instructions: HGMMA (wgmma, sm_90's warpgroup MMA) vs HMMA (mma.sync, the Ampere path);
* the main loop: the SASS instructions between the target and the backward branch of the first loop holding the
  most matrix instructions, i.e. instructions per thread per interior key (or query) tile; `edge` the same for the
  loop over the masked edge tiles, where the kernel has one; `loops` counts backward branches;
  `warp instr/kscore` = loop instructions × warps × 1000 / (BLOCK_M·BLOCK_N), the warp instructions issued per
  thousand score elements: the figure that compares tiles of different sizes (lower is better).

Compiles run in `--jobs` forked processes (a compiler crash ends only its own line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jit_compile import capture_launches, compile_launch  # noqa: E402  (removes TRITON_INTERPRET first)
from sass import cubin_report  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402


def attention_launches(head_dim: int, causal: bool, seq: int = 8192, heads: int = 32, batch: int = 1,
                       dtype=torch.bfloat16) -> list[tuple[str, object]]:
    """(label, Launch) of the tangent forward, the plain forward, the two flash-backward kernels and the two
    tangent-backward kernels (the gradients of (O, Ȯ)) at one shape."""
    from flowkern.attention import tangent_triton_launch, triton_launch
    from flowkern.attention.spec import AttentionSpec

    spec = AttentionSpec(batch, heads, heads, seq, seq, head_dim, head_dim, causal, 0, head_dim ** -0.5, 0, "triton")
    tensors = [torch.empty(batch, heads, seq, head_dim, dtype=dtype) for _ in range(6)]
    q, k, v, q_t, k_t, v_t = tensors
    stats = torch.empty(batch, heads, seq, 2, dtype=torch.float32)
    tag = f"D{head_dim} {'causal' if causal else 'full'}"
    fwd_t = capture_launches("attention.configs",
                             lambda: triton_launch.attention_fwd(q, k, v, q_t, k_t, v_t, None, spec))
    fwd = capture_launches("attention.configs",
                           lambda: triton_launch.attention_fwd(q, k, v, None, None, None, None, spec))
    bwd = capture_launches("attention.configs",
                           lambda: triton_launch.attention_bwd(q, k, v, q_t, stats, k_t, None, spec))
    tangent_bwd = capture_launches("attention.configs", lambda: tangent_triton_launch.attention_tangent_bwd(
        q, k, v, q_t, k_t, v_t, q, q_t, stats, k, k_t, None, spec))
    by_name = {launch.name: launch for launch in bwd + tangent_bwd}
    return [(f"fwd+tangent {tag}", fwd_t[0]), (f"fwd {tag}", fwd[0]),
            (f"bwd dkdv {tag}", by_name["attention_bwd_dkdv_kernel"]),
            (f"bwd dq {tag}", by_name["attention_bwd_dq_kernel"]),
            (f"tbwd dkdv {tag}", by_name["tangent_bwd_dkdv_kernel"]),
            (f"tbwd dq {tag}", by_name["tangent_bwd_dq_kernel"])]


KERNELS = ("fwd+tangent", "fwd", "bwd dkdv", "bwd dq", "tbwd dkdv", "tbwd dq")
SWEEP_TILES = [(bm, bn, w) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)]
# head dim 256: a [128, 256] float32 accumulator alone is 128 registers a thread at 8 warps; narrower tiles
SWEEP_TILES_256 = [(bm, bn, w) for bm in (32, 64) for bn in (16, 32, 64) for w in (4, 8)]


def _configs(launch, sweep: bool, stages=(2, 3), head_dim: int = 64, narrow: bool = False):
    if not sweep:
        return [c for c in launch.candidates() if c is None or c.num_stages in stages]
    tiles = SWEEP_TILES_256 if narrow or head_dim > 128 else SWEEP_TILES
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w in tiles for s in stages]


def _config_label(config) -> str:
    return f"{config.kwargs['BLOCK_M']},{config.kwargs['BLOCK_N']},w{config.num_warps},s{config.num_stages}"


def _compile_row(launch, config, arch) -> dict:
    kernel = compile_launch(launch, config, arch=arch)
    row = cubin_report(kernel.asm["cubin"])
    row["smem"] = kernel.metadata.shared
    return row


def _run_forked(jobs: list, arch: int, workers: int):
    """Yield (index, row or error text) for each (launch, config), compiled in `workers` forked processes."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    global _JOBS
    _JOBS = jobs
    with ctx.Pool(workers, maxtasksperchild=8) as pool:
        yield from pool.imap(_compile_job, [(i, arch) for i in range(len(jobs))])


_JOBS: list = []


def _compile_job(item):
    index, arch = item
    launch, config = _JOBS[index][1], _JOBS[index][2]
    try:
        return index, _compile_row(launch, config, arch)
    except Exception as exc:  # noqa: BLE001 - one failed config is one line of the report
        lines = str(exc).strip().splitlines()
        return index, (lines[-1] if lines else type(exc).__name__)[:80]


HEADER = (f"{'kernel':<24}{'BM,BN,warps,stages':>20}{'regs':>6}{'STL':>5}{'LDL':>5}{'in loop':>8}{'in main':>8}"
          f"{'smem KiB':>9}"
          f"{'wgmma':>7}{'mma.sync':>9}{'loop instr':>11}{'edge':>6}{'loops':>6}{'warp instr/kscore':>18}")


def warp_instructions_per_kscore(row: dict, config) -> float:
    return row["loop_instructions"] * config.num_warps * 1000 / (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])


def format_row(label: str, config, row) -> str:
    config_label = _config_label(config)
    if isinstance(row, str):
        return f"{label:<24}{config_label:>20}  FAILED: {row}"
    return (f"{label:<24}{config_label:>20}{row['regs']:>6}{row['stl']:>5}{row['ldl']:>5}{row['loop_spills']:>8}"
            f"{row['main_loop_spills']:>8}{row['smem'] / 1024:>9.1f}"
            f"{row['wgmma']:>7}{row['mma_sync']:>9}{row['loop_instructions']:>11}{row['edge_instructions'] or '':>6}"
            f"{row['loops']:>6}"
            f"{warp_instructions_per_kscore(row, config):>18.1f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90 (default 90)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dims (default 64 128)")
    parser.add_argument("--causal", choices=["full", "causal", "both"], default="both")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS),
                        help=f"which kernels (default all: {', '.join(KERNELS)}; tbwd = tangent backward)")
    parser.add_argument("--sweep", action="store_true", help="a wider tile grid instead of the autotune candidates")
    parser.add_argument("--narrow", action="store_true",
                        help="with --sweep: the narrow grid (BLOCK_M 32/64, BLOCK_N 16/32/64) at every head dim")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="pipelining depths (default 2 3)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel compiles (default min(4, cores))")
    parser.add_argument("--json", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if any(s < 1 for s in args.stages):
        parser.error("--stages must be at least 1")
    if any(d < 1 or d > 256 for d in args.head_dim):
        parser.error("--head-dim must be in 1..256")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowkern import _config

    if "FLOWKERN_TMA" not in os.environ:  # the CPU tensors standing in for device ones would turn 'auto' off
        _config._env["tma"] = "1" if args.arch >= 90 else "0"
    causal = {"full": [False], "causal": [True], "both": [False, True]}[args.causal]
    jobs = []
    for head_dim in args.head_dim:
        for c in causal:
            for label, launch in attention_launches(head_dim, c):
                if any(label.startswith(k + " ") for k in args.kernels):
                    jobs.extend((label, launch, config)
                                for config in _configs(launch, args.sweep, args.stages, head_dim, args.narrow))
    walks = _config.tile_walks()
    loads = "TMA descriptors" if _config._env["tma"] == "1" else "pointers"  # where the tensors allow
    print(f"sm_{args.arch}, bf16, B=1 H=32 N=8192, Triton {triton.__version__}, JIT specialisation, tile walks: "
          f"{walks}, tile loads: {loads}; {len(jobs)} compiles on {args.jobs} processes", flush=True)
    print(HEADER, flush=True)
    rows = []
    for index, row in _run_forked(jobs, args.arch, args.jobs):
        label, _, config = jobs[index]
        print(format_row(label, config, row), flush=True)
        if isinstance(row, dict):
            row = dict(row, warp_instr_per_kscore=warp_instructions_per_kscore(row, config))
        rows.append({"kernel": label, "config": _config_label(config),
                     **(row if isinstance(row, dict) else {"error": row})})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": args.arch, "triton": triton.__version__, "rows": rows}, fh, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
