"""Append one GPU run's results, as a dated markdown section, to benchmarks/RESULTS.md.

    python3 benchmarks/append_results.py OUT_DIR [--results benchmarks/RESULTS.md]

Reads what `gpu_check.sh` left in OUT_DIR, whatever of it exists: gpu.txt (card, versions, commit), headline.jsonl,
correctness.log, tests.txt, bench.json. Run on the GPU machine by gpu_check.sh (the section also lands in
OUT_DIR/RESULTS.section.md) and again on a fetched OUT_DIR to record the run in the repository.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import summarize  # noqa: E402

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _read(path: str, last: int | None = None) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as fh:
        lines = [line.rstrip("\n") for line in fh]
    return lines[-last:] if last else lines


def section(out_dir: str) -> str:
    machine = _read(os.path.join(out_dir, "gpu.txt"))
    title = machine[0] if machine else "unknown machine"
    parts = [f"### GPU run: {title}", ""]
    parts += [f"    {line}" for line in machine[1:]] + ([""] if machine[1:] else [])
    parts += ["Headline (pinned configs, `benchmarks/headline.py`):", "",
              summarize([os.path.join(out_dir, "headline.jsonl")]).rstrip(), ""]
    correctness = _read(os.path.join(out_dir, "correctness.log"), last=8)
    parts += ["Correctness (`benchmarks/gpu_correctness.py`, autotuning off):", ""]
    parts += [f"    {line}" for line in correctness] if correctness else ["_not run_"]
    tests = _read(os.path.join(out_dir, "tests.txt"), last=10)
    parts += ["", "Tests on the GPU (`benchmarks/gpu_tests.py`):", ""]
    parts += [f"    {line}" for line in tests] if tests else ["_not run_"]
    bench = os.path.join(out_dir, "bench.json")
    if os.path.exists(bench):
        parts += ["", "Benchmark suite (`pytest benchmarks`):", "", summarize([bench]).rstrip()]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="append one GPU run's results to RESULTS.md")
    parser.add_argument("out_dir", help="the folder gpu_check.sh wrote ($OUT)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="the markdown file appended to")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        parser.error(f"out_dir {args.out_dir!r} is not a folder")
    text = section(args.out_dir)
    with open(os.path.join(args.out_dir, "RESULTS.section.md"), "w") as fh:
        fh.write(text)
    with open(args.results, "a") as fh:
        fh.write("\n" + text)
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
