"""The headline attention-JVP benchmark, written so that a short GPU session always leaves numbers.

    python3 benchmarks/headline.py --out $OUT/headline.jsonl [--budget-s 150] [--compile-jobs 4] [--smoke]

* Pinned configurations: FLOWKERN_AUTOTUNE=0, so every kernel takes the first candidate of
  `kernels/attention/configs.py` (the best by the compile-level report) and compiles once.
* The distinct kernels (forward + tangent full/causal, the primal backward) are compiled first, in parallel
  processes that fill Triton's on-disk cache; the timing process then only loads them.
* Cases run most important first (forward + tangent, B=1, H=32, D=64, bf16, N=8192 non-causal against
  jvp-flash-attention and flowkern's own pointer path (`flowkern_pointers`, FLOWKERN_TMA=0: what the TMA
  descriptors buy), then the math JVP at N ≤ 4096, then causal, then forward + tangent + primal backward); each
  result is one JSON line appended to --out and flushed as soon as it is measured, so a killed run keeps every
  line before the kill. No new case starts after --budget-s.
* --smoke: tiny CPU shapes through the same code (the reference backend), for tests.

Line fields: case, impl, seq, causal, shape, dtype, median_ms, tflops (12·B·H·N²·D counted for forward + tangent,
halved by causality; ×22/12 with the backward), peak_mib, or error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FWD_BWD_FLOP_FACTOR = 22.0 / 12.0
IMPLS = ("flowkern", "jvp_flash_attention", "math_sdpa_jvp")
POINTERS = "flowkern_pointers"  # flowkern with FLOWKERN_TMA=0: what the TMA descriptors buy, headline shape only


def plan(seqs, smoke: bool = False) -> list[dict]:
    """The cases in the order they run: the headline comparison first."""
    heads, dim = (2, 16) if smoke else (32, 64)
    big = max(seqs)
    cases = []
    for causal in (False, True):
        for seq in sorted(seqs, reverse=True):
            for impl in IMPLS:
                if impl == "math_sdpa_jvp" and seq > 4096 and not smoke:
                    continue  # several 4 GiB score tensors at H=32, N=8192
                cases.append(dict(case="fwd+tangent", impl=impl, seq=seq, causal=causal, heads=heads, dim=dim))
            if seq == big and not causal:
                cases.append(dict(case="fwd+tangent", impl=POINTERS, seq=seq, causal=causal, heads=heads, dim=dim))
    for impl in IMPLS:
        seq = min(big, 4096)
        cases.append(dict(case="fwd+tangent+bwd", impl=impl, seq=seq, causal=False, heads=heads, dim=dim))
    return cases


def _impl(name):
    import flowkern
    from flowkern import baselines

    if name in ("flowkern", POINTERS):
        def run(q, k, v, q_t, k_t, v_t, causal):
            with _loads("0" if name == POINTERS else None):
                return flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, is_causal=causal, enable_gqa=True)

        return run
    if name == "math_sdpa_jvp":
        return lambda *args, causal: baselines.math_sdpa_jvp(*args, is_causal=causal)
    if not baselines.jvp_flash_attention_available():
        return None
    return lambda *args, causal: baselines.jvp_flash_attention_jvp(*args, is_causal=causal)


@contextlib.contextmanager
def _loads(tma):
    """FLOWKERN_TMA set to `tma` ('0', '1', 'auto') for the block (None: left as it is)."""
    from flowkern import _config

    saved = _config._env["tma"]
    if tma is not None:
        _config._env["tma"] = tma
    try:
        yield
    finally:
        _config._env["tma"] = saved


def _inputs(case, device, dtype):
    import torch

    g = torch.Generator(device=device).manual_seed(case["seq"])
    shape = (1, case["heads"], case["seq"], case["dim"])
    return [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(6)]


def _step(case, fn, tensors):
    import torch

    q, k, v, q_t, k_t, v_t = tensors
    if case["case"] == "fwd+tangent":
        return lambda: fn(q, k, v, q_t, k_t, v_t, causal=case["causal"])
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        out, _ = fn(q, k, v, q_t, k_t, v_t, causal=case["causal"])
        out.backward(grad)

    return step


def measure(case: dict, device, dtype) -> dict:
    """One result line for one case (errors become an `error` field, never an exception)."""
    from flowkern._measure import attention_jvp_flops, median_time_s, peak_memory_bytes

    row = dict(case, shape=[1, case["heads"], case["seq"], case["dim"]], dtype=str(dtype).replace("torch.", ""))
    fn = _impl(case["impl"])
    if fn is None:
        return dict(row, error="not installed")
    try:
        step = _step(case, fn, _inputs(case, device, dtype))
        seconds = median_time_s(step, device)
        peak = peak_memory_bytes(step, device)
    except Exception as exc:  # noqa: BLE001 - a failed case is a line, the run goes on
        lines = str(exc).strip().splitlines()
        return dict(row, error=f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200])
    flops = attention_jvp_flops(1, case["heads"], case["seq"], case["seq"], case["dim"], case["causal"])
    if case["case"] != "fwd+tangent":
        flops *= FWD_BWD_FLOP_FACTOR
    return dict(row, median_ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                peak_mib=None if peak is None else peak / 2**20)


def warm(causal: bool, with_backward: bool, pointers: bool = False) -> None:
    """Compile one kernel variant into Triton's cache (a small shape with the headline's specialisation)."""
    import torch

    import flowkern

    case = dict(case="fwd+tangent+bwd" if with_backward else "fwd+tangent", seq=256, heads=32, dim=64,
                causal=causal)
    step = _step(case, _impl(POINTERS if pointers else "flowkern"), _inputs(case, torch.device("cuda"), torch.bfloat16))
    step()
    torch.cuda.synchronize()
    del flowkern


def compile_in_parallel(jobs: int, timeout_s: float) -> list[str]:
    """Warm every headline kernel variant in its own process (at most `jobs` at once); returns error lines."""
    variants = [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
    procs, errors = [], []
    pending = list(variants)
    deadline = time.monotonic() + timeout_s
    while pending or procs:
        while pending and len(procs) < jobs:
            causal, backward, pointers = pending.pop(0)
            cmd = [sys.executable, __file__, "--warm", f"{int(causal)}{int(backward)}{int(pointers)}"]
            procs.append((cmd[-1], subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        name, proc = procs.pop(0)
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"warm {name}: exit {proc.returncode}: {(out or '').strip().splitlines()[-1:]}")
    return errors


def write_line(fh, row: dict) -> None:
    fh.write(json.dumps(row) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="the headline attention-JVP benchmark, one JSON line per case")
    parser.add_argument("--out", help="JSON-lines file, appended to (required unless --warm)")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no case after this many seconds")
    parser.add_argument("--compile-jobs", type=int, default=3, help="parallel compile processes (0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, the reference backend")
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm is None and not args.out:
        parser.error("--out is required")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if args.compile_jobs < 0:
        parser.error("--compile-jobs must be >= 0")
    if any(s < 16 for s in args.seq):
        parser.error("--seq values must be at least 16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:  # pinned configs: read when the kernel modules are imported
        os.environ.setdefault("FLOWKERN_AUTOTUNE", "0")
    if args.warm is not None:
        warm(causal=args.warm[0] == "1", with_backward=args.warm[1] == "1", pointers=args.warm[2:3] == "1")
        return 0
    start = time.monotonic()
    import torch

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        seqs = [min(s, 64) for s in args.seq]
    else:
        if not torch.cuda.is_available():
            print("headline: error: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        seqs = args.seq

    import flowkern

    backend = flowkern.use_backend("torch") if args.smoke else contextlib.nullcontext()
    with open(args.out, "a") as fh, backend:
        if device.type == "cuda" and args.compile_jobs:
            t0 = time.monotonic()
            errors = compile_in_parallel(args.compile_jobs, timeout_s=0.5 * args.budget_s)
            write_line(fh, {"case": "compile", "seconds": time.monotonic() - t0, "errors": errors})
        for case in plan(sorted(set(seqs)), smoke=args.smoke):
            if time.monotonic() - start > args.budget_s:
                write_line(fh, dict(case, error="skipped: out of time"))
                continue
            row = measure(case, device, dtype)
            write_line(fh, row)
            shown = f"{row['median_ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s" if "median_ms" in row else row["error"]
            print(f"{row['case']:<16}{'causal' if row['causal'] else 'full':<7}N={row['seq']:<6}{row['impl']:<22}"
                  f"{shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
