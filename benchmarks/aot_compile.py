"""Compile the Triton kernels ahead of time for a GPU target without a GPU, and report registers and spills.

    python3 benchmarks/aot_compile.py [--arch 90]

Catches what Triton's CPU interpreter forgives (non-constexpr globals, dot shape/dtype rules, layouts) and shows each
config's resource use from the cubin (`cuobjdump --dump-resource-usage`, spill instructions counted in the SASS), so
register pressure is visible before a GPU session. Needs only the tools bundled with Triton.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flowkern.kernels.attention.bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel  # noqa: E402
from flowkern.kernels.attention.fwd import attention_fwd_kernel  # noqa: E402


def _signature(fn, pointer_dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper():
            sig[name] = {"ROW_STATS": "*fp32", "DELTA": "*fp32", "MASK": "*fp32"}.get(name, pointer_dtype)
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cubin_report(kernel) -> dict:
    """Registers, stack bytes, spill stores (STL in the SASS) and the matrix instructions of a compiled kernel,
    read from its cubin with the cuobjdump bundled with Triton."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else -1, "stack": int(stack.group(1)) if stack else -1,
            "spills": len(re.findall(r"\bSTL\b", sass)),
            "mma": "wgmma" if "HGMMA" in sass else ("mma" if "HMMA" in sass else "none")}


def compile_one(fn, dtype, constexprs, arch, num_warps, num_stages):
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    r = cubin_report(kernel)
    return r["regs"], r["stack"], r["spills"], r["mma"], kernel.metadata.shared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sweep", action="store_true", help="every block config of every kernel")
    args = parser.parse_args()
    flags = dict(CAUSAL=False, MASK_KIND=0, UPCAST=False, INPUT_PRECISION="ieee")
    cases = []
    for block_d in (64, 128, 256):
        for bm, bn, warps, stages in ((128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2)):
            if bm * block_d > 8192 * (2 if block_d == 64 else 1):
                continue
            cases.append(("fwd+tangent", attention_fwd_kernel, dict(flags, HAS_TANGENT=True, BLOCK_M=bm, BLOCK_N=bn,
                                                                    BLOCK_D=block_d), warps, stages))
        cases.append(("fwd", attention_fwd_kernel, dict(flags, HAS_TANGENT=False, BLOCK_M=128, BLOCK_N=64,
                                                        BLOCK_D=block_d), 8, 2))
        cases.append(("bwd dkdv", attention_bwd_dkdv_kernel,
                      dict(flags, BLOCK_M=32, BLOCK_N=64, BLOCK_D=block_d), 4, 2))
        cases.append(("bwd dq", attention_bwd_dq_kernel, dict(flags, BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d), 4, 2))
    cases.append(("fwd+tangent causal bool-mask", attention_fwd_kernel,
                  dict(flags, CAUSAL=True, MASK_KIND=1, HAS_TANGENT=True, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64), 8, 2))
    print(f"sm_{args.arch}, bf16 operands")
    print(f"{'kernel':<30}{'BLOCK_M,N,D':>14}{'warps':>6}{'stages':>7}{'regs':>6}{'stack':>6}{'STL':>5}"
          f"{'mma':>7}{'smem B':>8}")
    for name, fn, constexprs, warps, stages in cases:
        regs, stack, spills, mma, smem = compile_one(fn, "*bf16", constexprs, args.arch, warps, stages)
        blocks = f"{constexprs['BLOCK_M']},{constexprs['BLOCK_N']},{constexprs['BLOCK_D']}"
        print(f"{name:<30}{blocks:>14}{warps:>6}{stages:>7}{regs:>6}{stack:>6}{spills:>5}{mma:>7}{smem:>8}")




def sweep(arch: int = 90) -> None:
    """Every (kernel, BLOCK_D, BLOCK_M, BLOCK_N, warps) with its registers and spill stores: which configs fit."""
    flags = dict(CAUSAL=False, MASK_KIND=0, UPCAST=False, INPUT_PRECISION="ieee")
    kernels = [("fwd+tangent", attention_fwd_kernel, dict(HAS_TANGENT=True)),
               ("fwd", attention_fwd_kernel, dict(HAS_TANGENT=False)),
               ("bwd dkdv", attention_bwd_dkdv_kernel, {}), ("bwd dq", attention_bwd_dq_kernel, {})]
    for name, fn, extra in kernels:
        for block_d in (64, 128, 256):
            for bm in (32, 64, 128):
                for bn in (16, 32, 64):
                    for warps in (4, 8):
                        c = dict(flags, **extra, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
                        try:
                            regs, stack, spills, mma, smem = compile_one(fn, "*bf16", c, arch, warps, 2)
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            print(f"{name} D{block_d} {bm},{bn} w{warps}: {type(exc).__name__}", flush=True)
                            continue
                        print(f"{name:<12} D{block_d:<4}{bm:>4},{bn:<4} w{warps} regs {regs:>3} STL {spills:>5} "
                              f"smem {smem}", flush=True)


if __name__ == "__main__":
    sweep() if "--sweep" in sys.argv else main()
