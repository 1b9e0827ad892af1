"""`python -m flowkern` / `flowkern`: the command line.

    flowkern demo [--device cuda|cpu] [--seq N] [--heads H] [--head-dim D] [--dtype bf16|fp16|fp32]
    flowkern train <method> [--config RUN.toml] [--data checkerboard] [--steps N] [--out DIR] ...
                                                             (see flowkern.train.cli, docs/training.md)
    flowkern sample CHECKPOINT --out FILE.pt|FILE.png [--steps K]
    flowkern eval CHECKPOINT [--steps 1 2 4 8]
    flowkern info [--json]                                   versions, devices, backends, settings
    flowkern --version

The demo checks `flowkern.jvp_attention` against torch.func.jvp of a float64 math attention on the current device,
then times it and measures its peak memory against `torch.func.jvp` over math SDPA (the stock way).
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _demo(args) -> int:
    import flowkern
    from flowkern._measure import attention_jvp_flops, median_time_s, peak_memory_bytes
    from flowkern.baselines import math_sdpa_jvp
    from flowkern.testing import math_attention

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    seq = args.seq or (4096 if device.type == "cuda" else 1024)
    print(f"flowkern {flowkern.__version__} | torch {torch.__version__} | device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU: PyTorch reference backend'})")

    # 1. correctness on a small odd shape: GQA, cross-attention, causal
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 37, 64), (2, 2, 45, 64), (2, 2, 45, 64)] * 2
    q, k, v, q_t, k_t, v_t = (torch.randn(s, generator=g).to(device, dtype) for s in shapes)
    out, out_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, is_causal=True, enable_gqa=True)
    ref, ref_t = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, is_causal=True),
                                tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in (q_t, k_t, v_t)))
    rel = [((a.double() - r).norm() / r.norm()).item() for a, r in ((out, ref), (out_t, ref_t))]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ok = all(e < tol for e in rel)
    print(f"check vs float64 torch.func.jvp(math attention), {dtype}: relative error out {rel[0]:.2e}, "
          f"tangent {rel[1]:.2e} -> {'OK' if ok else 'FAIL'}")

    # 2. time and peak memory against the stock way
    b, h, d = 1, args.heads, args.head_dim
    q, k, v, q_t, k_t, v_t = (torch.randn(b, h, seq, d, generator=g).to(device, dtype) for _ in range(6))
    flops = attention_jvp_flops(b, h, seq, seq, d)
    rows = []
    for name, fn in (("flowkern.jvp_attention", lambda: flowkern.jvp_attention(q, k, v, q_t, k_t, v_t)),
                     ("torch.func.jvp(math SDPA)", lambda: math_sdpa_jvp(q, k, v, q_t, k_t, v_t))):
        try:
            seconds = median_time_s(fn, device, repeats=3)
            peak = peak_memory_bytes(fn, device)
        except torch.OutOfMemoryError:
            rows.append((name, None, None, None))
            continue
        rows.append((name, seconds * 1e3, None if peak is None else peak / 2**20, flops / seconds / 1e12))
    print(f"\nforward + tangent, B={b} H={h} N={seq} D={d} {dtype}, non-causal:")
    print(f"{'method':<28}{'time ms':>10}{'peak MiB':>11}{'TFLOP/s':>10}")
    for name, ms, mib, tflops in rows:
        if ms is None:
            print(f"{name:<28}{'out of memory':>31}")
            continue
        mib_s = f"{mib:11.1f}" if mib is not None else f"{'n/a':>11}"
        print(f"{name:<28}{ms:10.2f}{mib_s}{tflops:10.3f}")
    if all(r[1] is not None for r in rows):
        ours, theirs = rows[0], rows[1]
        memory = f", math JVP uses {theirs[2] / ours[2]:.1f}x the peak memory" if ours[2] and theirs[2] else ""
        print(f"speed-up {theirs[1] / ours[1]:.2f}x{memory}")
    return 0 if ok else 1


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one ``flowkern: error: ...`` line and exit status 2 (sub-command parsers inherit it)."""

    def error(self, message):
        self.exit(2, f"flowkern: error: {message}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="flowkern", description=__doc__.splitlines()[0])
    from flowkern import info

    parser.add_argument("--version", action="version", version=info.version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    info.add_parser(sub)
    demo = sub.add_parser("demo", help="check jvp_attention and compare it with torch.func.jvp over math SDPA")
    demo.add_argument("--device", choices=["cuda", "cpu"], default=None,
                      help="(default: cuda when available, else cpu)")
    demo.add_argument("--seq", type=int, default=None, help="sequence length (default: 4096 on CUDA, 1024 on CPU)")
    demo.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    demo.add_argument("--head-dim", type=int, default=64, help="head dimension (default: 64)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="(default: bf16 on CUDA, fp32 on CPU)")
    from flowkern.train import cli

    cli.add_parsers(sub)
    try:
        args = parser.parse_args(cli.insert_method(list(sys.argv[1:] if argv is None else argv)))
        if args.command in cli.COMMANDS:
            return cli.COMMANDS[args.command](args)
    except cli.CLIError as err:
        print(f"flowkern: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:     # a second Ctrl-C during training, or one outside it
        print("flowkern: interrupted", file=sys.stderr)
        return 130
    if args.command == "info":
        return info.run(args)
    if args.command == "demo":
        for name in ("seq", "heads", "head_dim"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
