"""Benchmark setup: `pytest benchmarks/` (pytest-benchmark), its smoke mode, and the regression gate.

* GPU cases skip with a reason on CPU; CPU cases run only where a CPU number means something.
* `--smoke` (or FLOWKERN_BENCH_SMOKE=1): tiny shapes on the CPU through the same code, a few repeats, seconds in
  all, so the suite never rots (tests/test_benchmark_suite_smoke.py runs it in CI). Smoke numbers mean nothing.
* `record(benchmark, fn, device, baseline=..., flops=..., bytes_moved=...)`: the median time, TFLOP/s, GB/s and
  peak memory of `fn`, and of its baseline measured in the same run, into `benchmark.extra_info` (so the saved
  JSON holds them); `speedup` = baseline time / flowkern time.
* The regression gate compares RATIOS to the in-run baseline, never raw times, so a slower or busier machine does
  not fail it:

      pytest benchmarks --benchmark-save-ratios ratios.json              # record today's speed-ups
      pytest benchmarks --benchmark-compare-ratios ratios.json [--benchmark-max-regression 0.15]

  fails (exit status 1, a list of the cases) when a case's speed-up fell by more than the tolerance (default 15%)
  below the saved one. Cases missing on either side are listed, not failed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark: the GPU cases cover this on a GPU")

_RATIOS: dict[str, float] = {}   # test id -> speed-up over its in-run baseline, for the gate


def pytest_addoption(parser):
    group = parser.getgroup("flowkern benchmarks")
    group.addoption("--smoke", action="store_true", default=False,
                    help="tiny CPU shapes, few repeats: checks the benchmarks run (numbers mean nothing)")
    group.addoption("--benchmark-save-ratios", metavar="PATH", help="save every case's speed-up over its baseline")
    group.addoption("--benchmark-compare-ratios", metavar="PATH",
                    help="fail if a case's speed-up fell below the saved one by more than the tolerance")
    group.addoption("--benchmark-max-regression", type=float, default=0.15, metavar="FRACTION",
                    help="tolerated fall of a speed-up, as a fraction of the saved one (default 0.15)")


def smoke_mode(config) -> bool:
    return bool(config.getoption("--smoke")) or os.environ.get("FLOWKERN_BENCH_SMOKE", "0") not in ("", "0")


@pytest.fixture
def smoke(request) -> bool:
    return smoke_mode(request.config)


@pytest.fixture
def device(smoke):
    return torch.device("cuda" if HAS_CUDA and not smoke else "cpu")


def _median_s(fn, device, smoke: bool) -> float:
    from flowkern._measure import median_time_s

    if smoke:
        return median_time_s(fn, device, warmup=0, repeats=1)
    return median_time_s(fn, device)


@pytest.fixture
def record(request, smoke):
    """record(benchmark, fn, device, *, baseline=None, flops=None, bytes_moved=None): measure and store."""

    def measure(benchmark, fn, device, *, baseline=None, flops=None, bytes_moved=None):
        from flowkern._measure import peak_memory_bytes

        def peak_of(f):  # smoke: one call less per case (a CPU peak means little at tiny shapes)
            return None if smoke else peak_memory_bytes(f, device)

        seconds = _median_s(fn, device, smoke)
        peak = peak_of(fn)
        info = {"median_ms": seconds * 1e3, "peak_mib": None if peak is None else peak / 2**20,
                "tflops": None if flops is None else flops / seconds / 1e12,
                "gbps": None if bytes_moved is None else bytes_moved / seconds / 1e9, "smoke": smoke}
        if baseline is not None:
            base = _median_s(baseline, device, smoke)
            base_peak = peak_of(baseline)
            info.update(baseline_ms=base * 1e3, speedup=base / seconds,
                        baseline_peak_mib=None if base_peak is None else base_peak / 2**20)
            _RATIOS[request.node.nodeid] = base / seconds
        benchmark.extra_info.update(info)
        benchmark.pedantic(fn, rounds=1 if smoke else 3, iterations=1, warmup_rounds=0 if smoke else 1)
        return info

    return measure


def compare_ratios(saved: dict, current: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(regressions, unmatched): cases whose speed-up fell below (1 − tolerance) × the saved one, and cases present
    on one side only."""
    regressions = [f"{case}: speed-up {current[case]:.3f}, saved {saved[case]:.3f} "
                   f"(floor {(1 - tolerance) * saved[case]:.3f})"
                   for case in sorted(set(saved) & set(current)) if current[case] < (1 - tolerance) * saved[case]]
    unmatched = sorted(set(saved) ^ set(current))
    return regressions, unmatched


@pytest.hookimpl(tryfirst=True)   # before the terminal reporter prints the summary that shows the gate
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    save, compare = config.getoption("--benchmark-save-ratios"), config.getoption("--benchmark-compare-ratios")
    if save:
        with open(save, "w") as fh:
            json.dump(_RATIOS, fh, indent=1, sort_keys=True)
    if not compare:
        return
    tolerance = config.getoption("--benchmark-max-regression")
    try:
        with open(compare) as fh:
            saved = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        config._flowkern_gate = [f"cannot read the saved ratios {compare}: {exc}"], []
        session.exitstatus = 1
        return
    regressions, unmatched = compare_ratios(saved, _RATIOS, tolerance)
    config._flowkern_gate = regressions, unmatched
    if regressions:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    gate = getattr(config, "_flowkern_gate", None)
    if gate is None:
        return
    regressions, unmatched = gate
    terminalreporter.section("flowkern regression gate (speed-up over the in-run baseline)")
    for line in regressions:
        terminalreporter.line(f"REGRESSION {line}")
    for case in unmatched:
        terminalreporter.line(f"not compared (on one side only): {case}")
    if not regressions:
        terminalreporter.line("no regression")
