"""Compile, for a GPU target and without a GPU, every Triton kernel launch recorded from the CPU test suite.

    TRITON_INTERPRET=1 FLOWKERN_RECORD_LAUNCHES=/tmp/launches.json \
        PYTHONPATH=benchmarks python3 -m pytest tests -m interpreter -q -p record_launches
    python3 benchmarks/aot_check_all.py /tmp/launches.json [--arch 90]

Triton's interpreter forgives what the compiler refuses (non-constexpr globals, dot shapes and dtypes, layouts):
this runs the real compiler down to a cubin for each distinct (kernel, argument types, constexprs, divisibility),
specialised as the JIT specialises it, and reports failures, registers and spill stores. Exit status 1 if any kernel fails to compile.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jit_specialize import divisibility_attrs  # noqa: E402
from sass import cubin_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("launches")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all-blocks", action="store_true",
                        help="compile every recorded block size (default: one per kernel, dtypes and flags)")
    args = parser.parse_args()
    with open(args.launches) as fh:
        entries = json.load(fh)
    if not args.all_blocks:  # block sizes rarely decide whether a kernel compiles; dtypes and flags do
        unique = {}
        for e in entries:
            flags = {k: v for k, v in e["constexprs"].items() if not k.startswith("BLOCK")}
            key = [e["name"], e["signature"], flags, e.get("divisible", [])]
            unique.setdefault(json.dumps(key, sort_keys=True, default=str), e)
        entries = list(unique.values())
    # UPCAST=True is the interpreter's bf16-dot workaround: never compiled for a GPU
    entries = [e for e in entries if not e["constexprs"].get("UPCAST")]
    failures = 0
    print(f"{len(entries)} distinct launches, sm_{args.arch}")
    for entry in sorted(entries, key=lambda e: (e["module"], e["name"])):
        sys.stdout.flush()
        pid = os.fork()  # a compiler crash (an LLVM assertion aborts the process) must not end the run
        if pid == 0:
            os._exit(_compile_and_report(entry, args.arch))
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(f"FAIL {entry['name']} {entry['constexprs']}\n     compiler crashed (signal {os.WTERMSIG(status)})")
        failures += status != 0
    print(f"{failures} failed")
    return 1 if failures else 0


def _compile_and_report(entry, arch) -> int:
    """Compile one recorded launch for sm_<arch>; print a line; 0 if it compiled."""
    module = importlib.import_module(entry["module"])
    fn = getattr(module, entry["name"])
    while not isinstance(fn, triton.runtime.JITFunction):  # Autotuner/heuristics wrappers hold it in .fn
        fn = fn.fn
    constexprs = dict(entry["constexprs"])
    label = f"{entry['name']} " + ",".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())[:90]
    try:
        options = {"num_warps": max(4, entry["num_warps"]), "num_stages": max(2, entry["num_stages"])}
        attrs = {}
        for index in entry.get("divisible", []):
            attrs.update(divisibility_attrs(index, "D"))
        source = ASTSource(fn=fn, signature=dict(entry["signature"]), constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        report = cubin_report(kernel.asm["cubin"])
        print(f"ok   {label:<100} regs {report['regs']:>3} STL {report['stl']}", flush=True)
        return 0
    except Exception as exc:  # noqa: BLE001 - report every failure
        message = str(exc).strip().splitlines()
        print(f"FAIL {label}\n     {message[-1] if message else type(exc).__name__}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
