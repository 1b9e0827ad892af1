"""Run the test suite in parallel shards under one deadline, so that every shard still writes its summary.

    python3 benchmarks/gpu_tests.py --out $OUT [--shards 4] [--timeout-s 150] [-- extra pytest args]

The test files are dealt round-robin (largest first, by size) into --shards pytest processes that run at once, each
writing `tests-<i>.xml` (JUnit) and `tests-<i>.log` under --out. At the deadline every shard still running gets
SIGINT, which makes pytest stop at the current test, print its short summary and write its JUnit file; a shard that
ignores it is killed --grace-s seconds later. The last lines printed are the totals over the shards, read from the
JUnit files (passed, failed, errors, skipped, and which shards were interrupted).
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shard_files(files: list[str], shards: int) -> list[list[str]]:
    """Deal files into `shards` lists, largest first, each to the lightest list so far (by bytes)."""
    sized = sorted(files, key=lambda f: (-os.path.getsize(f), f))
    groups: list[list[str]] = [[] for _ in range(shards)]
    load = [0] * shards
    for f in sized:
        i = load.index(min(load))
        groups[i].append(f)
        load[i] += os.path.getsize(f)
    return [g for g in groups if g]


def junit_totals(paths: list[str]) -> dict:
    """Sum tests/failures/errors/skipped over JUnit files; unreadable or missing files are counted in `missing`."""
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "missing": 0, "failed_ids": []}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            totals["missing"] += 1
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key in ("tests", "failures", "errors", "skipped"):
                totals[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    totals["failed_ids"].append(f"{case.get('classname')}::{case.get('name')}")
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return totals


def _default_sigint() -> None:
    """In each shard: SIGINT back to its default disposition. A process started in the background by a
    non-interactive shell (`cmd &`, as remote runners do) inherits SIGINT ignored, and a Python started with it
    ignored never raises KeyboardInterrupt, so the deadline's SIGINT would be lost and no JUnit file written."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_shards(groups, out: str, timeout_s: float, grace_s: float, extra: list[str]) -> list[dict]:
    """Start every shard, wait until all end or the deadline; SIGINT then SIGKILL the late ones."""
    procs = []
    for i, files in enumerate(groups):
        log = open(os.path.join(out, f"tests-{i}.log"), "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out}/tests-{i}.xml",
               *extra, *files]
        procs.append({"shard": i, "proc": subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                           preexec_fn=_default_sigint),
                      "log": log, "interrupted": False})
    deadline = time.monotonic() + timeout_s
    while any(p["proc"].poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    late = [p for p in procs if p["proc"].poll() is None]
    for p in late:
        p["interrupted"] = True
        p["proc"].send_signal(signal.SIGINT)
    kill_at = time.monotonic() + grace_s
    for p in late:
        try:
            p["proc"].wait(timeout=max(0.1, kill_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            p["proc"].kill()
            p["proc"].wait()
    for p in procs:
        p["log"].close()
        p["returncode"] = p["proc"].returncode
    return procs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="the test suite in parallel shards under one deadline")
    parser.add_argument("--out", required=True, help="folder for tests-<i>.xml and tests-<i>.log")
    parser.add_argument("--shards", type=int, default=4, help="parallel pytest processes (default 4)")
    parser.add_argument("--timeout-s", type=float, default=150.0, help="SIGINT every shard still running then")
    parser.add_argument("--grace-s", type=float, default=15.0, help="then SIGKILL after this many seconds")
    parser.add_argument("--tests", default="tests", help="the test folder (default tests)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.timeout_s <= 0 or args.grace_s < 0:
        parser.error("--timeout-s must be positive and --grace-s non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(ROOT, args.tests, "test_*.py")))
    if not files:
        print(f"gpu_tests: error: no test files under {args.tests}", file=sys.stderr)
        return 2
    groups = shard_files(files, args.shards)
    procs = run_shards(groups, args.out, args.timeout_s, args.grace_s, args.pytest_args)
    totals = junit_totals([os.path.join(args.out, f"tests-{p['shard']}.xml") for p in procs])
    for name in totals["failed_ids"][:30]:
        print(f"FAILED {name}")
    interrupted = [p["shard"] for p in procs if p["interrupted"]]
    print(f"tests: {totals['passed']} passed, {totals['failures']} failed, {totals['errors']} errors, "
          f"{totals['skipped']} skipped in {len(procs)} shards"
          + (f"; shards {interrupted} interrupted at {args.timeout_s:.0f} s" if interrupted else "")
          + (f"; {totals['missing']} shards wrote no JUnit file" if totals["missing"] else ""))
    bad = totals["failures"] or totals["errors"] or totals["missing"] or interrupted
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
