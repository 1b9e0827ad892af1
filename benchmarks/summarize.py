"""Print a short markdown table from a pytest-benchmark JSON file: python benchmarks/summarize.py bench.json"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    info = data.get("machine_info", {})
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    print(f"commit {commit} | {info.get('node', '?')} | {data.get('datetime', '?')}")
    print("| group | case | median ms | TFLOP/s | GB/s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for bench in sorted(data["benchmarks"], key=lambda b: (b.get("group") or "", b["name"])):
        extra = bench.get("extra_info", {})
        ms = extra.get("median_ms", bench["stats"]["median"] * 1e3)

        def fmt(key, spec):
            value = extra.get(key)
            return format(value, spec) if isinstance(value, (int, float)) else "-"

        print(f"| {bench.get('group') or ''} | {bench['name']} | {ms:.3f} | {fmt('tflops', '.1f')} | "
              f"{fmt('gbps', '.0f')} | {fmt('peak_mib', '.1f')} |")


if __name__ == "__main__":
    main(sys.argv[1])
