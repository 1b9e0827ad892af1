"""benchmarks/quality_table.py on finished run directories (no training): the bars, the per-seed medians, and
which run directories a table reads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_table.py"


@pytest.fixture(scope="module")
def quality_table():
    spec = importlib.util.spec_from_file_location("quality_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(out: Path, name: str, key: str, sw2: dict, steps: int = 100) -> None:
    (out / name).mkdir(parents=True)
    rows = {key: {str(k): {"sw2": v, "kl": 10 * v} for k, v in sw2.items()}}
    (out / name / "quality.json").write_text(json.dumps({"steps": steps, "rows": rows}))


def teacher(out: Path, data: str) -> None:
    """1-step Euler SW2 1.0, 100 steps 0.1: the bars are 0.25 (far better) and 0.15 (within 1.5x)."""
    write_run(out, f"fm-{data}", "fm (EMA)", {1: 1.0, 2: 0.5, 4: 0.3, 8: 0.2, 100: 0.1})


def student(out: Path, name: str, method: str, one_step: float) -> None:
    write_run(out, name, f"{method} (EMA)", {1: one_step, 2: one_step / 2, 4: one_step / 3, 8: one_step / 4})


def test_single_seed_bars(tmp_path, quality_table, capsys):
    teacher(tmp_path, "moons")
    student(tmp_path, "pd-moons", "pd", 0.14)
    student(tmp_path, "cd-moons", "cd", 0.16)
    code = quality_table.main(["--data", "moons", "--methods", "pd", "cd", "--out", str(tmp_path), "--results", str(tmp_path / "results.md")])
    table = capsys.readouterr().out
    assert code == 1                                      # cd misses the 1.5x bar
    pd_row, cd_row = (next(line for line in table.splitlines() if f"| {m} |" in line) for m in ("pd", "cd"))
    assert "0.140 / 1.40" in pd_row and "1.40× teacher@100 PASS" in pd_row and "0.140× Euler@1 PASS" in pd_row
    assert "1.60× teacher@100 FAIL" in cd_row
    assert "median" not in table and (tmp_path / "table.md").read_text() == table
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("# Few-step quality") and pd_row in page
    assert "`python3 benchmarks/quality_table.py --data moons --methods pd cd --out" in page


def test_a_run_replaces_its_own_section_and_keeps_the_rest_of_the_page(tmp_path, quality_table, capsys):
    """Prose and the other sections' tables survive; the section's old table does not; a new section is appended."""
    teacher(tmp_path, "moons")
    student(tmp_path, "pd-moons", "pd", 0.14)
    student(tmp_path, "cd-moons", "cd", 0.12)
    page = tmp_path / "results.md"
    page.write_text("# Few-step quality\n\nintro\n\n<!-- quality_table: main -->\nold main table\n"
                    "<!-- /quality_table: main -->\n\n## The recipes\n\nprose\n\n"
                    "<!-- quality_table: other -->\nother table\n<!-- /quality_table: other -->\n\nlast words\n")
    base = ["--data", "moons", "--out", str(tmp_path), "--results", str(page)]
    assert quality_table.main(base + ["--methods", "pd"]) == 0
    text = page.read_text()
    assert "old main table" not in text and "| pd |" in text
    assert all(kept in text for kept in ("intro", "## The recipes\n\nprose", "other table", "last words"))
    assert text.index("| pd |") < text.index("## The recipes")           # replaced in place
    assert quality_table.main(base + ["--methods", "cd", "--section", "flow maps"]) == 0
    text = page.read_text()
    assert "| pd |" in text and text.index("last words") < text.index("<!-- quality_table: flow maps -->")
    assert text.rstrip().endswith("<!-- /quality_table: flow maps -->") and text.count("| cd |") == 1
    capsys.readouterr()


def test_runs_use_the_recipe_and_no_recipe_flags(tmp_path, quality_table, monkeypatch):
    """Each run is `flowkern train <method> --data D --seed k` with the recipe's steps scaled, nothing else."""
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return type("Done", (), {"returncode": 1})()

    monkeypatch.setattr(quality_table.subprocess, "run", fake_run)
    with pytest.raises(SystemExit):
        quality_table.run("ct", "moons", tmp_path, 100, 0.5, seed=2)
    argv = calls[0][3:]
    assert argv == ["train", "ct", "--data", "moons", "--out", str(tmp_path / "ct-moons-seed2"), "--steps", "7500",
                    "--samples", "100", "--seed", "2", "--threads", "1", "--no-progress", "--no-nll"]


def test_seeds_take_the_median_and_list_every_seed(tmp_path, quality_table, capsys):
    teacher(tmp_path, "moons")
    for seed, one_step in enumerate((0.20, 0.12, 0.14)):      # one bad seed out of three: the median passes
        student(tmp_path, "ct-moons" + (f"-seed{seed}" if seed else ""), "ct", one_step)
    assert quality_table.main(["--data", "moons", "--methods", "ct", "--seeds", "3", "--out", str(tmp_path), "--results", str(tmp_path / "results.md")]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "| ct |" in line)
    assert "median SW2 / KL @1" in table
    assert "| 0.140 / 1.40 | 0.070 / 0.70 |" in row and "1.40× teacher@100 PASS" in row
    assert "(seeds: 0.200 / 0.120 / 0.140)" in row


def test_two_seeds_are_judged_on_the_worse(quality_table):
    rows = [{"1": {"sw2": 0.1, "kl": 2.0}}, {"1": {"sw2": 0.3, "kl": 1.0}}]
    assert quality_table.median_row(rows) == {"1": {"sw2": 0.3, "kl": 2.0}}


def test_bad_seed_count(tmp_path, quality_table):
    with pytest.raises(SystemExit):
        quality_table.main(["--seeds", "0", "--out", str(tmp_path), "--results", str(tmp_path / "results.md")])


def test_meanflow_is_also_judged_on_its_two_step_row(tmp_path, quality_table, capsys):
    teacher(tmp_path, "moons")
    write_run(tmp_path, "meanflow-moons", "meanflow (EMA)", {1: 0.14, 2: 0.16, 4: 0.2, 8: 0.2})
    code = quality_table.main(["--data", "moons", "--methods", "meanflow", "--out", str(tmp_path),
                               "--results", str(tmp_path / "results.md")])
    row = next(line for line in capsys.readouterr().out.splitlines() if "| meanflow |" in line)
    assert code == 1 and "1.40× teacher@100 PASS" in row and "2 steps 1.14× 1 step FAIL" in row
