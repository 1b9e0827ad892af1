"""Few-step quality table (issue 6's bars): train the flow-matching teacher, then every importable method, on the
checkerboard and 8 Gaussians (CPU-sized), and print SW₂ / histogram KL to held-out data at 1/2/4/8 steps beside the
teacher's 1-step and 100-step Euler values.

    python benchmarks/quality_table.py [--data checkerboard 8gaussians] [--teacher-steps 3000] [--steps 2000]
                                       [--methods fm pd cd ct ctm] [--out runs/quality] [--batch 512] [--threads 1]

Bars, per distilled/consistency model at 1 step: "far better than 1 Euler step of its teacher" (here: SW₂ at most
half the teacher's 1-step SW₂) and "within 1.5× of the teacher's 100-step SW₂". Every run goes through
`flowkern train` (runs/quality/<method>-<data>/; an existing run directory is reused, not retrained).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowkern.__main__ import main as flowkern_main
from flowkern.methods import available_methods, get_method

FAR_BETTER = 0.5     # SW2@1 ≤ this × teacher's 1-step Euler SW2
WITHIN = 1.5         # SW2@1 ≤ this × teacher's 100-step SW2
TEACHER_METHODS = {"pd", "cd", "ctm"}   # distil a flow-matching teacher (ct trains from data)


def _run(method: str, data: str, out: Path, steps: int, common: list[str], teacher: Path | None) -> dict:
    if not (out / "quality.json").is_file():
        argv = ["train", method, "--data", data, "--out", str(out), "--steps", str(steps), *common]
        needs = method in TEACHER_METHODS or getattr(get_method(method), "needs_teacher", False)
        if needs and teacher is not None:
            argv += ["--teacher", str(teacher)]
        code = flowkern_main(argv)
        if code != 0:
            raise SystemExit(f"flowkern {' '.join(argv)} failed with status {code}")
    return json.loads((out / "quality.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["checkerboard", "8gaussians"])
    p.add_argument("--methods", nargs="+", default=None, help="default: every importable method")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=2000, help="steps for each distilled/consistency method")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    methods = args.methods or available_methods()
    common = ["--threads", str(args.threads), "--batch", str(args.batch), "--no-progress", "--no-nll"]
    failures = 0
    for data in args.data:
        teacher_dir = args.out / f"fm-{data}"
        teacher = _run("fm", data, teacher_dir, args.teacher_steps, common, None)
        t_rows = teacher["rows"]["fm (EMA)"]
        t1, t100 = t_rows["1"]["sw2"], t_rows["100"]["sw2"]
        lines = [(f"\n{data}: teacher fm, {args.teacher_steps} steps: Euler SW2@1 {t1:.4f}, SW2@100 {t100:.4f}, "
                  f"KL@1 {t_rows['1']['kl']:.4f}, KL@100 {t_rows['100']['kl']:.4f}"),
                 f"{'method':<8}" + "".join(f"{f'SW2@{k}':>9}" for k in (1, 2, 4, 8))
                 + "".join(f"{f'KL@{k}':>8}" for k in (1, 2, 4, 8)) + f"{'  1-step bars':<32}"]
        for method in methods:
            scores = teacher["rows"]["fm (EMA)"] if method == "fm" else _run(
                method, data, args.out / f"{method}-{data}", args.steps, common, teacher_dir / "checkpoint.pt"
            )["rows"][f"{method} (EMA)"]
            sw = "".join(f"{scores[str(k)]['sw2']:9.4f}" for k in (1, 2, 4, 8))
            kl = "".join(f"{scores[str(k)]['kl']:8.4f}" for k in (1, 2, 4, 8))
            if method == "fm":
                bars = "  (teacher: Euler steps)"
            else:
                s1 = scores["1"]["sw2"]
                far, near = s1 <= FAR_BETTER * t1, s1 <= WITHIN * t100
                failures += not (far and near)
                bars = (f"  {'PASS' if far else 'FAIL'} ≤{FAR_BETTER}×Euler@1 "
                        f"{'PASS' if near else 'FAIL'} ≤{WITHIN}×@100")
            lines.append(f"{method:<8}{sw}{kl}{bars}")
        print("\n".join(lines), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
