"""The GPU-session scripts under benchmarks/, on the CPU: argument handling, the plan and its time budget, the
summaries of missing or partial results, the sharded test runner's deadline, and the JIT-like compile tool."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import append_results  # noqa: E402
import gpu_tests  # noqa: E402
import headline  # noqa: E402
import summarize  # noqa: E402


def _gpu_check(*args, budget=None, out=None):
    env = dict(os.environ)
    if budget is not None:
        env["FLOWKERN_GPU_BUDGET_S"] = str(budget)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _limits(stdout: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"stage (\S+): limit (\d+)s", stdout)]


def test_gpu_check_plan_fits_the_budget_headline_first(tmp_path):
    run = _gpu_check("--dry-run", budget=380, out=tmp_path / "out")
    assert run.returncode == 0, run.stderr
    stages = _limits(run.stdout)
    assert [name for name, _ in stages] == ["info", "headline", "correctness", "tests"]
    # every stage's limit (plus its 10 s SIGKILL grace for the headline, which may ignore SIGINT) fits in 380 s
    assert sum(lim for _, lim in stages) + 15 <= 380
    assert "FLOWKERN_AUTOTUNE=0" in run.stdout.split("stage correctness")[1].split("\n")[0]
    assert not (tmp_path / "out").exists()                      # a dry run writes nothing


def test_gpu_check_cuts_and_skips_stages_on_a_small_budget(tmp_path):
    run = _gpu_check("--dry-run", budget=120, out=tmp_path)
    stages = _limits(run.stdout)
    assert stages[0] == ("info", 20) and stages[1] == ("headline", 120 - 15 - 20)
    assert "stage correctness: skipped, out of budget" in run.stdout
    assert "--budget-s 55" in run.stdout                        # the headline stops starting cases in time


def test_gpu_check_second_run_and_bad_arguments(tmp_path):
    rest = _gpu_check("--rest", "--dry-run", out=tmp_path)
    assert [name for name, _ in _limits(rest.stdout)] == ["benchmarks"] and "--benchmark-json" in rest.stdout
    bad = _gpu_check("--fast")
    assert bad.returncode == 2 and bad.stderr.startswith("gpu_check.sh: error: unknown argument '--fast'")
    bad = _gpu_check("--dry-run", budget="7m")
    assert bad.returncode == 2 and "FLOWKERN_GPU_BUDGET_S" in bad.stderr
    assert "--rest" in _gpu_check("--help").stdout


# ------------------------------------------------------------------------------------------------ summaries

BENCH_JSON = {
    "machine_info": {"node": "h200"}, "commit_info": {"id": "abcdef1234567"}, "datetime": "2026-12-01",
    "benchmarks": [
        {"group": "g", "name": "test_a[flowkern]", "stats": {"median": 0.002},
         "extra_info": {"median_ms": 2.0, "tflops": 410.5, "peak_mib": 12.0}},
        {"group": "g", "name": "test_a[math]", "stats": {"median": 0.006}, "extra_info": {"gbps": 1500.0}},
    ],
}


def test_summary_of_a_missing_benchmark_json_says_so(tmp_path, capsys):
    assert summarize.main([str(tmp_path / "bench.json"), str(tmp_path / "headline.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "no benchmark results at" in out and "no headline results at" in out


def test_summary_of_complete_and_cut_off_benchmark_json(tmp_path):
    path = tmp_path / "bench.json"
    text = json.dumps(BENCH_JSON, indent=1)
    path.write_text(text)
    table = summarize.summarize([str(path)])
    assert "commit abcdef1234 | h200" in table
    assert "| g | test_a[flowkern] | 2.000 | 410.5 | - | 12.0 | - |" in table
    assert "| g | test_a[math] | 6.000 | - | 1500 | - | - |" in table      # median from the stats
    cut = text[:text.index('"test_a[math]"') + 20]                          # killed while writing the second
    path.write_text(cut)
    table = summarize.summarize([str(path)])
    assert "incomplete: 1 benchmarks could be read" in table and "test_a[flowkern]" in table
    assert "test_a[math]" not in table
    path.write_text('{"machine_info": {"no')                                # nothing readable at all
    assert "incomplete: 0 benchmarks" in summarize.summarize([str(path)])


def test_headline_summary_speedups_and_cut_last_line(tmp_path):
    path = tmp_path / "headline.jsonl"
    rows = [{"case": "compile", "seconds": 12.5, "errors": []},
            {"case": "fwd+tangent", "impl": "flowkern", "seq": 8192, "causal": False, "median_ms": 2.0,
             "tflops": 500.0, "peak_mib": 100.0},
            {"case": "fwd+tangent", "impl": "math_sdpa_jvp", "seq": 8192, "causal": False, "median_ms": 9.0,
             "tflops": 111.0, "peak_mib": 4000.0},
            {"case": "fwd+tangent", "impl": "jvp_flash_attention", "seq": 8192, "causal": False,
             "error": "not installed"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"case": "fwd+tan')
    table = summarize.summarize([str(path)])
    assert "compile: 12.5 s" in table and "1 unreadable lines" in table
    assert "| fwd+tangent | 8192 | full | math_sdpa_jvp | 9.000 | 111.0 | 4000 | 4.50× |" in table
    assert "| fwd+tangent | 8192 | full | jvp_flash_attention | not installed |" in table


def test_append_results_records_what_exists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu.txt").write_text("NVIDIA H200, 580.1, 143771 MiB\ntorch 2.11 triton 3.6\n")
    (out / "headline.jsonl").write_text(json.dumps({"case": "fwd+tangent", "impl": "flowkern", "seq": 2048,
                                                    "causal": True, "median_ms": 1.0, "tflops": 300.0}) + "\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    assert append_results.main([str(out), "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results\n") and "### GPU run: NVIDIA H200, 580.1, 143771 MiB" in text
    assert "| fwd+tangent | 2048 | causal | flowkern | 1.000 | 300.0 |" in text
    assert text.count("_not run_") == 2                                     # correctness and tests missing
    assert (out / "RESULTS.section.md").read_text() in text


# --------------------------------------------------------------------------------------------- headline.py


def test_headline_plan_runs_the_headline_comparison_first():
    cases = headline.plan([2048, 4096, 8192])
    first = [(c["case"], c["seq"], c["causal"], c["impl"]) for c in cases[:2]]
    assert first == [("fwd+tangent", 8192, False, "flowkern"), ("fwd+tangent", 8192, False, "jvp_flash_attention")]
    pointers = [(c["seq"], c["causal"]) for c in cases if c["impl"] == headline.POINTERS]
    assert pointers == [(8192, False)]  # the TMA-against-pointers figure, at the headline shape only
    assert not any(c["impl"] == "math_sdpa_jvp" and c["seq"] > 4096 for c in cases)
    assert {c["heads"] for c in cases} == {32} and {c["dim"] for c in cases} == {64}
    assert cases[-1]["case"] == "fwd+tangent+bwd"


def test_headline_smoke_writes_one_line_per_case(tmp_path):
    out = tmp_path / "h.jsonl"
    assert headline.main(["--smoke", "--out", str(out), "--seq", "16", "32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(headline.plan([16, 32], smoke=True))
    timed = [r for r in rows if "median_ms" in r]
    assert {r["impl"] for r in timed} >= {"flowkern", "math_sdpa_jvp"}
    assert all(r["median_ms"] > 0 and r["tflops"] > 0 for r in timed)
    assert all("error" in r for r in rows if "median_ms" not in r)


def test_headline_out_of_budget_still_writes_every_line(tmp_path):
    out = tmp_path / "h.jsonl"
    assert headline.main(["--smoke", "--out", str(out), "--seq", "16", "--budget-s", "1e-9"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["error"] == "skipped: out of time" for r in rows)


@pytest.mark.parametrize("argv, message", [([], "--out is required"), (["--out", "x", "--budget-s", "0"], "positive"),
                                           (["--out", "x", "--seq", "8"], "at least 16")])
def test_headline_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        headline.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- gpu_tests.py


def test_shards_are_balanced_by_size(tmp_path):
    files = []
    for name, size in [("a", 900), ("b", 500), ("c", 400), ("d", 100)]:
        path = tmp_path / f"test_{name}.py"
        path.write_text("#" * size)
        files.append(str(path))
    groups = gpu_tests.shard_files(files, 2)
    assert [sorted(os.path.basename(f) for f in g) for g in groups] == [["test_a.py", "test_d.py"],
                                                                        ["test_b.py", "test_c.py"]]
    assert len(gpu_tests.shard_files(files, 8)) == 4


def test_junit_totals_count_missing_files(tmp_path):
    (tmp_path / "a.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="t" name="x"><failure/></testcase></testsuite></testsuites>')
    totals = gpu_tests.junit_totals([str(tmp_path / "a.xml"), str(tmp_path / "b.xml")])
    assert (totals["passed"], totals["failures"], totals["skipped"], totals["missing"]) == (2, 1, 2, 1)
    assert totals["failed_ids"] == ["t::x"]


def test_a_shard_past_the_deadline_still_writes_its_summary(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_quick.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    (suite / "test_slow.py").write_text(textwrap.dedent("""
        import time
        def test_first():
            pass
        def test_hangs():
            time.sleep(120)
        """) + "#" * 500)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_tests.py"), "--out", str(out), "--tests",
                          str(suite), "--shards", "2", "--timeout-s", "40", "--grace-s", "20"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    # 40 s: pytest must have started both shards (seconds; tens of seconds on a heavily loaded machine) before the
    # deadline, or the SIGINT lands during its start-up and no JUnit file is written
    assert "interrupted at 40 s" in last and "wrote no JUnit file" not in last, last
    assert last.startswith("tests: 2 passed"), last                   # test_ok and test_first, from the JUnit


def test_gpu_tests_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_tests.parse_args(["--out", "x", "--shards", "0"])
    assert exc.value.code == 2 and "--shards" in capsys.readouterr().err


# ------------------------------------------------------------------ the JIT-like compile tool and the SASS report

_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def scale_rows(X, Y, n_cols, stride_row, stride_col, group, factor, BLOCK: tl.constexpr):
    row = tl.program_id(0) // group
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_row + cols * stride_col, mask=cols < n_cols)
    tl.store(Y + row * stride_row + cols * stride_col, x * factor, mask=cols < n_cols)
'''

_COMPILE = '''
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import jit_compile  # compiled mode: removes TRITON_INTERPRET before the kernel is decorated
import torch
from jit_specialize import python_specialize, specialize_value
from sass import cubin_report
import kern

x = torch.empty(64, 32)
values = dict(X=x, Y=x.view(-1)[1:], n_cols=32, stride_row=32, stride_col=1, group=3, factor=0.5, BLOCK=32)
launch = jit_compile.Launch(kern.scale_rows, values)
sig, const, attrs = jit_compile.specialise(kern.scale_rows, values)
kernel = jit_compile.compile_launch(launch, arch=90, num_warps=4, num_stages=1)
same = all(python_specialize(v) == tuple(specialize_value(v)) for v in [1, 16, 17, 0, 2**33, 1.5, True, x, x[1:]])
print(json.dumps({"sig": sig, "const": {k: str(v) for k, v in const.items()}, "attrs": sorted(k[0] for k in attrs),
                  "report": cubin_report(kernel.asm["cubin"]), "python_rule_agrees": same}))
'''


def test_jit_specialisation_and_sm90_compile(tmp_path):
    (tmp_path / "kern.py").write_text(_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path), BENCH], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout.strip().splitlines()[-1])
    # stride_col == 1 is folded into the kernel; group == 3 and the float stay run-time values
    assert data["sig"]["stride_col"] == "constexpr" and data["const"]["stride_col"] == "1"
    assert data["sig"]["group"] == "i32" and data["sig"]["factor"] == "fp32"
    # X aligned, Y one float off (not 16-byte aligned), n_cols and stride_row divisible by 16
    names = ["X", "Y", "n_cols", "stride_row", "stride_col", "group", "factor", "BLOCK"]
    assert [names[i] for i in data["attrs"]] == ["X", "n_cols", "stride_row"]
    assert data["python_rule_agrees"]
    report = data["report"]
    assert 0 < report["regs"] <= 64 and report["stl"] == report["ldl"] == 0
    assert report["wgmma"] == report["mma_sync"] == 0 and report["loops"] == 0


def test_main_loop_is_the_backward_branch_with_the_matrix_instructions():
    from sass import main_loop

    code = [(0x00, "LDC R1, c[0x0][0x28]"), (0x10, "NOP"), (0x20, "FFMA R2, R3, R4, R5"),
            (0x30, "@!P0 BRA 0x20"),                                     # a small loop without MMA
            (0x40, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"), (0x50, "NOP"),
            (0x60, "FMUL R6, R7, R8"), (0x70, "@P1 BRA 0x40"),           # the main loop: 3 instructions + NOP
            (0x80, "EXIT"), (0x90, "BRA 0x90")]                          # the trailing self-branch
    assert main_loop(code) == {"loop_instructions": 3, "edge_instructions": 0, "loop_mma": 1, "loops": 2,
                               "loop_spills": 0, "main_loop_spills": 0}


def test_main_loop_is_the_first_of_the_loops_with_the_most_matrix_instructions():
    """The attention kernels walk their unmasked interior tiles first and the masked edge tiles in a second loop
    of the same GEMMs and more instructions: the first is the main loop, the second the edge loop."""
    from sass import main_loop

    code = [(0x00, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"), (0x10, "FMUL R6, R7, R8"),
            (0x20, "@P1 BRA 0x00"),                                      # interior: 3 instructions
            (0x30, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"), (0x40, "FSEL R6, R7, R8, P0"),
            (0x50, "LDL R9, [R1]"), (0x60, "FMUL R6, R7, R8"),
            (0x70, "@P1 BRA 0x30"),                                      # edge: 5 instructions, one a spill
            (0x80, "EXIT"), (0x90, "BRA 0x90")]
    assert main_loop(code) == {"loop_instructions": 3, "edge_instructions": 5, "loop_mma": 1, "loops": 2,
                               "loop_spills": 1, "main_loop_spills": 0}


def test_out_of_line_returns_are_not_loops_and_spills_are_placed():
    """A TMA barrier wait's slow path sits after the kernel's exit: a spin loop, then an unconditional branch back
    into the loop body. That branch is no loop (it would make the whole kernel the main loop); a spill store in
    the prologue and its reload after the loop are not paid per tile, one inside the loop is."""
    from sass import main_loop

    code = [(0x00, "STL [R1], R0"),                                      # saved before the loop
            (0x10, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"),
            (0x20, "@!P2 BRA 0x90"),                                     # barrier not ready: slow path
            (0x30, "LDL R9, [R1+0x8]"), (0x40, "FMUL R6, R7, R8"),
            (0x50, "@P1 BRA 0x10"),                                      # the main loop: 5 instructions
            (0x60, "LDL.LU R8, [R1]"), (0x70, "EXIT"),
            (0x90, "SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R3"), (0xa0, "@!P2 BRA 0x90"),  # spin
            (0xb0, "BRA 0x30")]                                          # back into the loop body
    assert main_loop(code) == {"loop_instructions": 5, "edge_instructions": 0, "loop_mma": 1, "loops": 2,
                               "loop_spills": 1, "main_loop_spills": 1}
