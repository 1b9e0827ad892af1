"""`flowkern train ... --profile N`: a torch.profiler trace of N training steps.

The profiler skips the first step (warm-up: kernel compiles, allocator growth, autotuning), then records N steps of
CPU and CUDA activity with shapes, and writes `<out>/trace.json` (a Chrome trace: open it in Perfetto or
chrome://tracing; with FLOWKERN_NVTX=1 the NVTX ranges are not in it, use Nsight Systems for those) and
`<out>/profile.txt` (the top operators by self device time, or by self CPU time without a GPU).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WARMUP_STEPS = 1


def add_flag(parser) -> None:
    """The `--profile STEPS` option of `flowkern train <method>`."""
    def steps(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    parser.add_argument("--profile", type=steps, default=0, metavar="STEPS",
                        help=f"trace STEPS training steps (after {WARMUP_STEPS} warm-up step) with torch.profiler "
                             "into <out>/trace.json and <out>/profile.txt (default: 0, off)")


@contextlib.contextmanager
def profile_steps(trainer, steps: int, out_dir):
    """Inside the block, `trainer.fit()` is traced for `steps` steps after the warm-up; yields the result paths
    (written when the block ends, if the run reached the traced steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    out_dir = Path(out_dir)
    paths = {"trace": out_dir / "trace.json", "table": out_dir / "profile.txt"}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"

    def ready(prof):
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(paths["trace"]))
        paths["table"].write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")

    prof = torch.profiler.profile(activities=activities, record_shapes=True, on_trace_ready=ready,
                                  schedule=torch.profiler.schedule(wait=0, warmup=WARMUP_STEPS, active=steps,
                                                                   repeat=1))

    def step(record):
        prof.step()

    trainer.step_hooks.append(step)
    try:
        with prof:
            yield paths
    finally:
        trainer.step_hooks.remove(step)
