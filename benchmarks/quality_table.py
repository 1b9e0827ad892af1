"""Few-step quality table: train the flow-matching teacher, then each distilled / consistency method, on the
checkerboard and 8 Gaussians (CPU-sized), and print SW₂ / histogram KL to held-out data at 1/2/4/8 steps beside the
teacher's 1-step and 100-step Euler values; write the table and the command into one section of docs/results.md.

    python benchmarks/quality_table.py [--data checkerboard 8gaussians] [--methods pd cd ct ctm meanflow sct scd shortcut lsd esd psd f2d2] [--jobs 2]
                                       [--out runs/quality] [--samples 10000] [--scale 1.0] [--seeds 1]
                                       [--results docs/results.md] [--section main]

Every run is `flowkern train <method> --data D --seed k` with the method's shipped recipe
(flowkern/train/recipes/<method>.toml and the method's constructor defaults; --scale multiplies the recipe's steps),
one CPU thread each; the datasets run as parallel lanes (--jobs). An existing run directory
(OUT/<method>-<data>/quality.json) is reused, not retrained. Bars per method at 1 step: "far better than 1 Euler step
of its teacher" (here SW₂ at most a quarter of the teacher's 1-step SW₂) and "within 1.5× of the teacher's 100-step
SW₂"; for a method trained for several steps (`MULTISTEP`: meanflow) also "its 2-step SW₂ no worse than its
1-step". The markdown table goes to stdout, OUT/table.md and the results page; the exit status is 1 if a bar fails.

The results page has one generated block per `--section` (between `<!-- quality_table: NAME -->` markers: the
command and the table); a run replaces its section's block, or appends it, and leaves the rest of the page — the
prose on the recipes and the other sections' tables — as it is.

--seeds K trains each method K times (`flowkern train --seed 0..K-1`, directories <method>-<data> for seed 0 and
<method>-<data>-seed<k> after it; one teacher, seed 0), reports the median over seeds of each SW₂ / KL, judges the
bars on the median 1-step SW₂ and lists every seed's 1-step SW₂.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flowkern.methods import get_method

FAR_BETTER = 0.25    # SW2@1 ≤ this × teacher's 1-step Euler SW2
NLL_METHODS = ("f2d2",)   # joint flow maps: their few-step NLL beside the teacher's ODE NLL
NLL_GAP = 0.15       # |NLL at k steps − teacher's ODE NLL| ≤ this (nats)
NLL_DATA_GAP = 0.3   # |NLL at k steps − exact data NLL| ≤ this (nats), where the data has a density
WITHIN = 1.5         # SW2@1 ≤ this × teacher's 100-step Euler SW2
MULTISTEP = ("meanflow",)   # also judged: SW2@2 ≤ SW2@1
METHODS = ("pd", "cd", "ct", "ctm", "meanflow", "sct", "scd", "shortcut", "lsd", "esd", "psd", "f2d2")
STEPS = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
TITLE = "# Few-step quality"
def recipe_steps(method: str) -> int:
    """The training steps of the method's shipped recipe."""
    from flowkern.train.run_config import recipe
    from flowkern.train.run_options import TRAIN_OPTIONS

    return recipe(method)["train"].get("steps", TRAIN_OPTIONS["steps"].default)


def run(method: str, data: str, out: Path, samples: int, scale: float, seed: int = 0) -> dict:
    """`flowkern train method --seed seed` on `data` into out/<method>-<data>[-seed<k>] (reused when done); its
    quality.json."""
    name = f"{method}-{data}" + (f"-seed{seed}" if seed else "")
    run_dir = out / name
    if not (run_dir / "quality.json").is_file():
        argv = [sys.executable, "-m", "flowkern", "train", method, "--data", data, "--out", str(run_dir),
                "--steps", str(max(1, round(recipe_steps(method) * scale))), "--samples", str(samples),
                "--seed", str(seed), "--threads", "1", "--no-progress"]
        if method not in NLL_METHODS:
            argv.append("--no-nll")
        if getattr(get_method(method), "needs_teacher", False):
            argv += ["--teacher", str(out / f"fm-{data}" / "checkpoint.pt")]
        start = time.perf_counter()
        log = out / f"{name}.log"
        with open(log, "w") as f:
            code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0:
            raise SystemExit(f"{' '.join(argv)} failed with status {code}; see {log}")
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads((run_dir / "quality.json").read_text())


def median_row(rows: list[dict]) -> dict:
    """{steps: {"sw2": median, "kl": median}} over several runs' quality rows (the upper median for an even count,
    so two seeds are judged on the worse)."""
    return {k: {m: statistics.median_high(row[k][m] for row in rows) for m in ("sw2", "kl")} for k in rows[0]}


def lane(data: str, methods: list[str], out: Path, samples: int, scale: float,
         seeds: int = 1) -> tuple[list[str], int]:
    """The teacher, then each method (seeds 0..seeds-1), on one dataset: (markdown rows, failed bars)."""
    teacher = run("fm", data, out, samples, scale)
    t = teacher["rows"]["fm (EMA)"]
    t1, t100 = t["1"]["sw2"], t["100"]["sw2"]
    rows = [f"| {data} | fm teacher (Euler) | {teacher['steps']} | "
            + " | ".join(f"{t[str(k)]['sw2']:.3f} / {t[str(k)]['kl']:.2f}" for k in STEPS)
            + f" | 100 steps: {t100:.3f} / {t['100']['kl']:.2f} |"]
    failures = 0
    for method in methods:
        results = [run(method, data, out, samples, scale, seed) for seed in range(seeds)]
        per_seed = [result["rows"][f"{method} (EMA)"] for result in results]
        s = median_row(per_seed)
        s1 = s["1"]["sw2"]
        far, near = s1 <= FAR_BETTER * t1, s1 <= WITHIN * t100
        two = s["2"]["sw2"] <= s1 if method in MULTISTEP else True
        failures += not (far and near and two)
        bars = (f"{s1 / t1:.3f}× Euler@1 {'PASS' if far else 'FAIL'}, "
                f"{s1 / t100:.2f}× teacher@100 {'PASS' if near else 'FAIL'}")
        if method in MULTISTEP:
            bars += f", 2 steps {s['2']['sw2'] / s1:.2f}× 1 step {'PASS' if two else 'FAIL'}"
        if seeds > 1:
            bars += " (seeds: " + " / ".join(f"{row['1']['sw2']:.3f}" for row in per_seed) + ")"
        rows.append(f"| {data} | {method} | {results[0]['steps']} | "
                    + " | ".join(f"{s[str(k)]['sw2']:.3f} / {s[str(k)]['kl']:.2f}" for k in STEPS) + f" | {bars} |")
        if method in NLL_METHODS:
            row, failed = nll_row(data, method, results)
            rows.append(row)
            failures += failed
    return rows, failures


def nll_row(data: str, method: str, results: list[dict]) -> tuple[str, int]:
    """The joint flow map's median k-step NLL (nats) beside the teacher's naive k-step Euler NLL, and the bars:
    within NLL_GAP of the teacher's ODE NLL and, where the data has a density, within NLL_DATA_GAP of it."""
    nll = {k: statistics.median_high(r["nll_steps"][str(k)] for r in results) for k in STEPS}
    naive = {k: statistics.median_high(r["nll_naive_steps"][str(k)] for r in results) for k in STEPS}
    teacher = statistics.median_high(r["teacher_nll_ode"] for r in results)
    gap = max(abs(nll[k] - teacher) for k in STEPS)
    ok = gap <= NLL_GAP
    bars = f"max gap to the teacher's ODE NLL {teacher:.3f}: {gap:.3f} {'PASS' if ok else 'FAIL'}"
    if "data_nll" in results[0]:
        data_nll = results[0]["data_nll"]
        data_gap = max(abs(nll[k] - data_nll) for k in STEPS)
        ok_data = data_gap <= NLL_DATA_GAP
        bars += f"; to the data's exact NLL {data_nll:.4f}: {data_gap:.3f} {'PASS' if ok_data else 'FAIL'}"
        ok = ok and ok_data
    return (f"| {data} | {method} NLL (nats), naive teacher Euler in brackets | {results[0]['steps']} | "
            + " | ".join(f"{nll[k]:.3f} ({naive[k]:.2f})" for k in STEPS) + f" | {bars} |"), int(not ok)


def section_block(section: str, table: str, command: str) -> str:
    """The generated part of one section of the results page: its markers, the command and the table."""
    return (f"<!-- quality_table: {section} -->\nMade by `{command}` (CPU runs; each run is `flowkern train <method> "
            f"--data D --seed k` with the method's shipped recipe).\n\n{table}\n<!-- /quality_table: {section} -->")


def results_page(page: str | None, section: str, table: str, command: str) -> str:
    """The results page with `section`'s generated block replaced by this table (appended where the page has no
    such block, a new page where there is none); every other line of the page, the prose around the tables
    included, is kept as it is."""
    block = section_block(section, table, command)
    if page is None:
        return f"{TITLE}\n\n{block}\n"
    begin, end = f"<!-- quality_table: {section} -->", f"<!-- /quality_table: {section} -->"
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return page.rstrip("\n") + f"\n\n{block}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["checkerboard", "8gaussians"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--samples", type=int, default=10000, help="samples and held-out points per evaluation")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every recipe's training steps")
    p.add_argument("--jobs", type=int, default=2, help="datasets trained in parallel (one CPU thread each)")
    p.add_argument("--seeds", type=int, default=1, help="runs per method (seeds 0..N-1); the table shows medians")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results page updated (default docs/results.md)")
    p.add_argument("--section", default="main",
                   help="the page's table this run replaces (its block between the quality_table markers)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        lanes = list(pool.map(lambda d: lane(d, args.methods, args.out, args.samples, args.scale, args.seeds),
                          args.data))
    stat = "median " if args.seeds > 1 else ""
    header = ["| data | model | train steps | " + " | ".join(f"{stat}SW2 / KL @{k}" for k in STEPS) + " | 1-step bars |",
              "|---|---|---|" + "---|" * len(STEPS) + "---|"]
    table = "\n".join(header + [row for rows, _ in lanes for row in rows])
    (args.out / "table.md").write_text(table + "\n")
    command = " ".join(["python3 benchmarks/quality_table.py", *(sys.argv[1:] if argv is None else argv)])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    page = args.results.read_text() if args.results.is_file() else None
    args.results.write_text(results_page(page, args.section, table, command))
    print(table)
    return 1 if any(failed for _, failed in lanes) else 0


if __name__ == "__main__":
    sys.exit(main())
