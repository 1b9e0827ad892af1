"""Few-step quality table: train the flow-matching teacher, then each distilled / consistency method, on the
checkerboard and 8 Gaussians (CPU-sized), and print SW₂ / histogram KL to held-out data at 1/2/4/8 steps beside the
teacher's 1-step and 100-step Euler values; write the table, the command and the notes on the recipes to
docs/results.md.

    python benchmarks/quality_table.py [--data checkerboard 8gaussians] [--methods pd cd ct ctm meanflow sct scd shortcut lsd esd psd f2d2] [--jobs 2]
                                       [--out runs/quality] [--samples 10000] [--scale 1.0] [--seeds 1]
                                       [--results docs/results.md]

Every run is `flowkern train <method> --data D --seed k` with the method's shipped recipe
(flowkern/train/recipes/<method>.toml and the method's constructor defaults; --scale multiplies the recipe's steps),
one CPU thread each; the datasets run as parallel lanes (--jobs). An existing run directory
(OUT/<method>-<data>/quality.json) is reused, not retrained. Bars per method at 1 step: "far better than 1 Euler step
of its teacher" (here SW₂ at most a quarter of the teacher's 1-step SW₂) and "within 1.5× of the teacher's 100-step
SW₂"; for a method trained for several steps (`MULTISTEP`: meanflow) also "its 2-step SW₂ no worse than its
1-step". The markdown table goes to stdout, OUT/table.md and the results page; the exit status is 1 if a bar fails.

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
NOTES = """## What the table shows

The teacher (fm, seed 0) and then `pd`, `cd`, `ct`, `ctm`, `meanflow`, `sct`, `scd` (one row per method; with `--seeds 3` the
median over seeds 0, 1 and 2) on the checkerboard and 8 Gaussians: SW2 / histogram KL to 10 000 held-out points from
10 000 samples at 1, 2, 4 and 8 sampling steps (the SW2 of two independent 10 000-point draws of the data is 0.054 for the checkerboard,
0.034 for 8 Gaussians), and each seed's 1-step SW2. The bars, per model at 1 step: **far better than one Euler step
of its teacher** (at most a quarter of it) and **within 1.5× of the teacher's 100-step SW2**. With `--seeds 3` the
runs take about 2¼ hours on 2 cores (45 minutes with one seed), one CPU thread per run, the two datasets as parallel
lanes.

## The recipes

A recipe is what `flowkern train <method> --data D` does with no other flag: the train-level settings in
`flowkern/train/recipes/<method>.toml` (batch 256, lr 2e-3 with a cosine decay; fm 8000 steps, pd 8000 at lr 5e-4
without decay and an eval EMA of 0.99, cd 9000, ct 15 000, ctm 6000, meanflow 5000, sct 6000 at batch 1024, scd 8000) and the method-level settings
as the method's constructor defaults; the network is `MLPFlowMap(2, hidden=128, depth=3)`.

* **ct**: ECT's schedule in 6 stages (Δσ/σ halves each stage) with minibatch optimal-transport pairing of each batch's
  data and noise, which straightens the paths the consistency function must jump along; its multistep sampler
  re-noises with the same coupling (re-noised independently, an OT-trained model's 8-step samples are at SW2 0.50 on
  8 Gaussians: the coupled process's intermediate marginals are not data + σ·ε).
* **Why 6 stages, not ECT's 8**: with 8, one ct run of six diverged (the checkerboard with seed 1: in the 7th stage,
  Δσ/σ ≈ (1 + 8·sigmoid(−σ))/128, its loss went from 0.15 to 1.3–3.3 at step 12 000 with gradient norms 20 → 55–76,
  ending at SW2 0.353). Over seeds 0 / 1 / 2, 8 stages gave 0.105 / 0.353 / 0.106 on the checkerboard and 0.067 /
  0.073 / 0.082 on 8 Gaussians; 6 stages give 0.101 / 0.097 / 0.106 and 0.061 / 0.060 / 0.065. Gradient norms grow
  about 2× per ECT stage (clipped at 1): the shrinking Δσ is what a continuous-time stabiliser (sCM's tangent
  normalisation) would address.
* **What ct's recipe beat** (1-step SW2, bar 1.5× teacher@100): iCT's curriculum (N → 161) with OT pairing,
  8 Gaussians over five runs 0.060–0.096 (three above the bar), checkerboard 0.117–0.130; iCT with independent
  pairing 0.093 / 0.120 and 0.137; with independent pairing, 14 other recipes (curriculum end 40/160/1280, ECT,
  lr 5e-4/1e-3/2e-3, batch 1024, width 256, dropout, l2, P_mean, 25 000 steps, constant LR with a long EMA) left
  8 Gaussians between 0.089 and 0.18; with iCT + OT, lr 1e-3 or batch 512 did no better.
* **pd**: lr 5e-4 instead of 2e-3 (a 2e-3 restart knocks each new student off its teacher: 8 Gaussians 0.088 / 0.097
  over two seeds → 0.069 / 0.066), annealed to 0 within each of its seven rounds (64 → 1 student steps); a short
  EMA, so the 1-step student is not averaged with the 2-step one of the round before. The student after the last
  round is a 1-step model: its 2/4/8-step rows only show that it was not trained for them.
* **ctm**: a DSM weight of 0.1 instead of 1.0 (0.113 → 0.077; 12 teacher Heun steps per target instead of 4 also gets
  there, 0.085, at twice the cost).
* **meanflow**: 5000 steps (the README's main job, about 5 CPU minutes), data and noise paired by minibatch optimal
  transport (the paper pairs them independently: at 6000 steps on 8 Gaussians 1-step / 2-step SW2 0.113 / 0.088
  independent, 0.074 / 0.067 with OT; docs/methods.md lists the other settings tried), the plain squared error
  (p = 0), 75 % of the rows with r = t, the network's time embedding scaled by 10 instead of 1000. At 4000 steps
  the 8 Gaussians median was 0.097 (seeds 0.078 / 0.097 / 0.099), above the 0.091 bar; at 5000 it is 0.075. Its
  2-step samples are judged too: no worse than its 1-step ones.
* **sct and scd** (TrigFlow, docs/methods.md): times enter the network unscaled, tangent warm-up over 1000 steps,
  P_mean = −1.0 + ln(σ_d/0.5), P_std = 1.4. **sct**: 6000 steps at batch 1024, tangent normalisation c = 2.0 (the
  paper's c = 0.1 is sCD's), the learned adaptive weight. **scd**: 8000 steps at batch 256, c = 0.1, no adaptive
  weight. Both meet every 1-step bar over 3 seeds (rows above). Why sct's c is 2.0: in two dimensions ‖g‖ varies
  a lot between the noise draws of one x_t, and for ‖g‖ ≫ c the normalised loss g/(‖g‖ + c) is stationary where the
  *geometric median* of g given x_t vanishes, not its mean. On 8 Gaussians (batch 1024, 3000 steps, 1-step /
  4-step SW2) c = 0.1 gives 0.121 / 0.060 with samples too concentrated on the modes, c = 1 0.097 / 0.051, c = 2
  0.093 / 0.049, c = 10 (almost linear, higher variance) 0.141 / 0.080 with samples too diffuse; c = 2 at 6000
  steps gives 0.080. Without the adaptive weight sct was unchanged (0.120 at c = 0.1); OT pairing at batch 1024
  was worse (0.148). In high dimensions ‖g‖ concentrates and c = 2 differs little from 0.1. Why scd has no
  adaptive weight: a deterministic teacher drives the residual of a well-fitted time to 0, and e^{−w} =
  1/E‖residual‖² then amplifies what is left there; with it scd stayed at 0.19–0.21 on 8 Gaussians whatever the
  steps, batch (1024), LR (5e-4 was worse, 0.37) or network time scale (×10 worse, 0.39), without it 0.064.
  scd's 4- and 8-step samples on the checkerboard are worse than its 1- and 2-step ones (0.202 / 0.327): the fm
  teacher's velocity is poor off its ODE paths (rms error 0.36–1.2 against the exact 8 Gaussians velocity, whose
  speed is about 2.8), and re-noised states lie off them.
* **cd and ctm**: 40 Karras grid points, because the teacher's own 18-step Heun solve bounds CD (SW2 0.149 vs 0.100 at
  40 steps on the checkerboard); CD's multistep samples get worse with more steps (its consistency function is least
  accurate at σ ≈ 1–5).
"""


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


def results_page(table: str, command: str) -> str:
    """docs/results.md: the title, how the table was made, the table, then the notes on the recipes."""
    return (f"# Few-step quality\n\nMade by `{command}` (CPU runs; each run is `flowkern train <method> --data D "
            f"--seed k` with the method's shipped recipe).\n\n{table}\n\n{NOTES}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["checkerboard", "8gaussians"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--samples", type=int, default=10000, help="samples and held-out points per evaluation")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every recipe's training steps")
    p.add_argument("--jobs", type=int, default=2, help="datasets trained in parallel (one CPU thread each)")
    p.add_argument("--seeds", type=int, default=1, help="runs per method (seeds 0..N-1); the table shows medians")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results page written (default docs/results.md)")
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
    args.results.write_text(results_page(table, command))
    print(table)
    return 1 if any(failed for _, failed in lanes) else 0


if __name__ == "__main__":
    sys.exit(main())
