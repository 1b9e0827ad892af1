"""Read a compiled kernel's cubin: registers, stack, local-memory spills, matrix instructions and the main loop.

Uses the cuobjdump bundled with Triton (or the one on PATH). No side effects on import.

* regs, stack: `cuobjdump --dump-resource-usage`;
* stl / ldl: SASS stores to and loads from local memory (register spills, or arrays indexed at run time);
  loop_spills: those inside a loop holding matrix instructions (a value saved before the loop and reloaded after it
  costs two instructions a program; one spilled inside the loop costs them every tile); main_loop_spills: those
  inside the main loop (the edge loop runs for a few tiles of a program, the main loop for all the others);
* wgmma / mma_sync: HGMMA (sm_90's warpgroup MMA) and HMMA (mma.sync, the pre-Hopper tensor-core path) counts;
* loop_instructions: SASS instructions (NOPs excluded) between the target and the backward branch of the main loop:
  what one thread issues per iteration of it. The main loop is the first (in code order) of the loops holding the
  most matrix instructions: the attention kernels walk their unmasked interior tiles in a first loop and the
  masked edge tiles (causal diagonal band, last partial tile) in a second one, whose count is edge_instructions
  (0 without one); loop_mma the main loop's matrix instructions; loops the number of conditional backward
  branches. An unconditional backward branch is not a loop: it returns from an out-of-line block (the slow path
  of a TMA barrier wait jumps back into the loop body) or is the kernel's closing self-branch.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _tool(name: str) -> str:
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    except ImportError:
        bundled = ""
    return bundled if os.path.exists(bundled) else name


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) of every SASS instruction in the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate guard
    return text.split()[0] if text else ""


def main_loop(instructions) -> dict:
    """The main loop (the first of the loops holding the most matrix instructions) and the edge loop (the next one
    holding as many): their instruction counts (NOPs excluded), the main loop's matrix instructions, and how many
    loops (backward branches) the kernel has."""
    loops = []
    for addr, text in instructions:
        match = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if match and _opcode(text).startswith("BRA") and text.startswith("@"):
            target = int(match.group(1), 16)
            if target < addr:
                loops.append((target, addr))
    counted = []
    for start, end in sorted(loops):
        body = [_opcode(t) for a, t in instructions if start <= a <= end]
        counted.append((sum(op.startswith(("HGMMA", "HMMA")) for op in body), sum(op != "NOP" for op in body)))
    most = max((mma for mma, _ in counted), default=0)
    hot = [count for mma, count in counted if mma == most]
    mma_loops = [(start, end) for (start, end), (mma, _) in zip(sorted(loops), counted) if mma]
    main = next(((s, e) for (s, e), (mma, _) in zip(sorted(loops), counted) if mma == most and mma), None)

    def spills_in(ranges):
        return sum(_opcode(t).startswith(("STL", "LDL")) and any(s <= a <= e for s, e in ranges)
                   for a, t in instructions)

    return {"loop_instructions": hot[0] if hot else 0, "edge_instructions": max(hot[1:], default=0),
            "loop_mma": most, "loops": len(loops), "loop_spills": spills_in(mma_loops),
            "main_loop_spills": spills_in([main] if main else [])}


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (cuobjdump --dump-resource-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else -1, "stack": int(stack.group(1)) if stack else -1}


def cubin_report(cubin: bytes) -> dict:
    """Everything the report prints for one compiled kernel."""
    instructions = sass_instructions(cubin)
    ops = [_opcode(t) for _, t in instructions]
    report = resource_usage(cubin)
    report.update(stl=sum(op.startswith("STL") for op in ops), ldl=sum(op.startswith("LDL") for op in ops),
                  wgmma=sum(op.startswith("HGMMA") for op in ops), mma_sync=sum(op.startswith("HMMA") for op in ops))
    report.update(main_loop(instructions))
    return report
