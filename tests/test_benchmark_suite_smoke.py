"""`pytest benchmarks/` in its CPU smoke mode: every case of the benchmark table runs at tiny shapes and saves its
figures, the whole benchmark folder still collects, and the regression gate fails on a fallen speed-up ratio."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the reference backend on the CPU
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_benchmark_table_runs_in_smoke_mode_and_gates_on_ratios(tmp_path):
    """One smoke run of the whole table that also saves its ratios and compares against a saved file holding a
    speed-up no run reaches (smoke timings are single calls: the bound is far outside any noise): every case
    passes, the gate alone fails the run (exit status 1) and names the case."""
    bench, ratios, saved = tmp_path / "bench.json", tmp_path / "ratios.json", tmp_path / "saved.json"
    case = "benchmarks/test_bench_suite.py::test_layer_op[gelu]"
    saved.write_text(json.dumps({case: 1e9, "gone::case": 1.0}))
    run = _pytest("benchmarks/test_bench_suite.py", "--smoke", f"--benchmark-json={bench}",
                  f"--benchmark-save-ratios={ratios}", f"--benchmark-compare-ratios={saved}")
    out = run.stdout
    assert run.returncode == 1 and " passed" in out and " failed" not in out, out[-3000:] + run.stderr[-2000:]
    assert f"REGRESSION {case}: speed-up" in out and "not compared (on one side only): gone::case" in out
    rows = json.loads(bench.read_text())["benchmarks"]
    names = {r["name"] for r in rows}
    assert {"test_jvp_attention", "test_flow_map_jump", "test_layer_op[linear]", "test_training_step[ctm]",
            "test_density[divergence]"} <= names
    for r in rows:
        extra = r["extra_info"]
        assert {"median_ms", "tflops", "gbps", "peak_mib", "speedup", "baseline_ms"} <= set(extra), r["name"]
        assert extra["median_ms"] > 0 and extra["speedup"] > 0 and extra["smoke"] is True
    ratio_values = json.loads(ratios.read_text())
    assert len(ratio_values) == len(rows) and all(v > 0 for v in ratio_values.values())


def test_every_benchmark_module_collects():
    run = _pytest("benchmarks", "--smoke", "--collect-only")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_compare_ratios():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_conftest", os.path.join(ROOT, "benchmarks", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compare_ratios = module.compare_ratios

    regressions, unmatched = compare_ratios({"a": 2.0, "b": 1.0, "c": 1.0}, {"a": 1.6, "b": 0.9, "d": 3.0}, 0.15)
    assert regressions == ["a: speed-up 1.600, saved 2.000 (floor 1.700)"] and unmatched == ["c", "d"]
    assert compare_ratios({"a": 2.0}, {"a": 1.8}, 0.15) == ([], [])          # within the tolerance
