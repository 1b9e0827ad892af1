"""Print short markdown tables from benchmark results, whatever survived of them.

    python3 benchmarks/summarize.py [bench.json] [headline.jsonl ...]

* a pytest-benchmark JSON (`--benchmark-json`): one row per benchmark with median ms, TFLOP/s, GB/s and peak MiB
  from `extra_info`. A truncated file (a run killed while writing) gives the benchmarks that can still be read; a
  missing one gives a line saying so.
* a headline JSON-lines file (`benchmarks/headline.py`): one row per case, and each case's speed against every
  baseline measured in the same run at the same shape.

Never raises on missing or partial input: the table is what a short GPU session must bring back.
"""
from __future__ import annotations

import json
import os
import sys


def _decode_objects(text: str, start: int) -> list[dict]:
    """The complete JSON objects of a (possibly cut-off) array that starts at text[start] == '['."""
    decoder = json.JSONDecoder()
    objects, i = [], start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] != "{":
            return objects
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return objects
        objects.append(obj)


def load_benchmark_json(path: str) -> tuple[dict, list[dict], str | None]:
    """(header data, benchmarks, problem): whatever a pytest-benchmark JSON still holds."""
    if not os.path.exists(path):
        return {}, [], f"no benchmark results at {path} (the benchmark run did not finish or did not start)"
    with open(path, errors="replace") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
        return data, list(data.get("benchmarks", [])), None
    except json.JSONDecodeError:
        pass
    at = text.find('"benchmarks"')
    bracket = text.find("[", at) if at >= 0 else -1
    benchmarks = _decode_objects(text, bracket) if bracket >= 0 else []
    return {}, benchmarks, f"{path} is incomplete: {len(benchmarks)} benchmarks could be read"


def _fmt(value, spec) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def benchmark_table(path: str) -> list[str]:
    data, benchmarks, problem = load_benchmark_json(path)
    lines = []
    if problem:
        lines.append(f"_{problem}_")
    if data:
        info = data.get("machine_info", {})
        commit = str(data.get("commit_info", {}).get("id", "?"))[:10]
        lines.append(f"commit {commit} | {info.get('node', '?')} | {data.get('datetime', '?')}")
    if not benchmarks:
        return lines
    lines += ["| group | case | median ms | TFLOP/s | GB/s | peak MiB | vs baseline |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for bench in sorted(benchmarks, key=lambda b: (b.get("group") or "", b.get("name", ""))):
        extra = bench.get("extra_info", {}) or {}
        ms = extra.get("median_ms")
        if ms is None:
            ms = (bench.get("stats") or {}).get("median")
            ms = ms * 1e3 if isinstance(ms, (int, float)) else None
        lines.append(f"| {bench.get('group') or ''} | {bench.get('name', '?')} | {_fmt(ms, '.3f')} | "
                     f"{_fmt(extra.get('tflops'), '.1f')} | {_fmt(extra.get('gbps'), '.0f')} | "
                     f"{_fmt(extra.get('peak_mib'), '.1f')} | {_fmt(extra.get('speedup'), '.2f')} |")
    return lines


def load_jsonl(path: str) -> tuple[list[dict], str | None]:
    """The readable lines of a JSON-lines file (a cut-off last line is dropped)."""
    if not os.path.exists(path):
        return [], f"no headline results at {path} (the headline run did not start)"
    rows, bad = [], 0
    with open(path, errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, (f"{bad} unreadable lines in {path}" if bad else None)


def headline_table(path: str) -> list[str]:
    rows, problem = load_jsonl(path)
    lines = [f"_{problem}_"] if problem else []
    timed = [r for r in rows if r.get("case") != "compile"]
    for r in rows:
        if r.get("case") == "compile":
            lines.append(f"compile: {_fmt(r.get('seconds'), '.1f')} s" +
                         (f", errors: {r['errors']}" if r.get("errors") else ""))
    if not timed:
        return lines
    by_shape = {}
    for r in timed:
        if "median_ms" in r:
            by_shape.setdefault((r.get("case"), r.get("seq"), r.get("causal")), {})[r.get("impl")] = r["median_ms"]
    lines += ["| case | N | mask | impl | median ms | TFLOP/s | peak MiB | flowkern speed-up |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in timed:
        mask = "causal" if r.get("causal") else "full"
        if "median_ms" not in r:
            lines.append(f"| {r.get('case')} | {r.get('seq')} | {mask} | {r.get('impl')} | "
                         f"{r.get('error', 'no result')} | | | |")
            continue
        ours = by_shape[(r.get("case"), r.get("seq"), r.get("causal"))].get("flowkern")
        speedup = ours and r["median_ms"] / ours if r.get("impl") != "flowkern" else None
        lines.append(f"| {r.get('case')} | {r.get('seq')} | {mask} | {r.get('impl')} | {_fmt(r['median_ms'], '.3f')} | "
                     f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('peak_mib'), '.0f')} | "
                     f"{_fmt(speedup, '.2f') + '×' if speedup else ''} |")
    return lines


def summarize(paths: list[str]) -> str:
    out = []
    for path in paths:
        out += headline_table(path) if path.endswith(".jsonl") else benchmark_table(path)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python3 benchmarks/summarize.py [bench.json] [headline.jsonl ...]", file=sys.stderr)
        return 2
    sys.stdout.write(summarize(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
