"""Run configuration: method flags derived from a constructor, run files (TOML), recipes, precedence."""
from __future__ import annotations

import argparse
import tomllib
from typing import Literal

import pytest
import torch
from helpers import one_thread, torch_backend

from flowkern.__main__ import main
from flowkern.methods.base import Method
from flowkern.train import method_options, run_config
from flowkern.train.config import TrainConfig


class Dummy(Method):
    """A method with one parameter of each supported type.

    Args:
        rate: the rate,
            over two lines.
        count: how many.
        mode: how, "a" or "b".
        on: switch.
        cap: a cap or none.
        levels: the levels.
        sigma_data: a run value.
    """

    name = "dummy"

    def __init__(self, model, *, sigma_data: float, rate: float = 0.5, count: int = 3,
                 mode: Literal["a", "b"] = "a", on: bool = True, cap: float | None = None,
                 levels: tuple[int, ...] = (1, 2)):
        super().__init__(model)


def _parse(argv):
    parser = argparse.ArgumentParser()
    method_options.add_method_flags(parser, "dummy", method_options.method_options(Dummy))
    return method_options.given_flags(parser.parse_args(argv), "dummy"), parser


def test_flags_are_derived_from_the_constructor():
    options = method_options.method_options(Dummy)
    assert list(options) == ["rate", "count", "mode", "on", "cap", "levels"]    # run values are no flags
    assert options["rate"].help == "the rate, over two lines."
    values, parser = _parse(["--dummy-rate", "0.25", "--dummy-count", "7", "--dummy-mode", "b", "--no-dummy-on",
                             "--dummy-cap", "none", "--dummy-levels", "4", "5", "6"])
    assert values == {"rate": 0.25, "count": 7, "mode": "b", "on": False, "cap": None, "levels": (4, 5, 6)}
    assert _parse(["--dummy-cap", "2.5"])[0] == {"cap": 2.5}
    assert _parse([])[0] == {}
    text = parser.format_help()
    assert "the rate, over two lines. (default: 0.5)" in " ".join(text.split())
    assert "--dummy-on, --no-dummy-on" in text and "(default: 1 2)" in text
    for bad in (["--dummy-mode", "c"], ["--dummy-count", "x"], ["--dummy-rate", "fast"]):
        with pytest.raises(SystemExit):
            _parse(bad)


def test_resolve_fills_defaults_and_run_values():
    kwargs = method_options.resolve(Dummy, {"count": 9}, {"sigma_data": 2.0, "total_steps": 5})
    assert kwargs == {"rate": 0.5, "count": 9, "mode": "a", "on": True, "cap": None, "levels": (1, 2),
                      "sigma_data": 2.0}          # total_steps: not a parameter of Dummy
    with pytest.raises(ValueError, match="no parameter 'speed'"):
        method_options.resolve(Dummy, {"speed": 1}, {})
    assert method_options.run_value_names(Dummy) == ["sigma_data"]


def test_unsupported_annotation_is_refused():
    class Odd(Dummy):
        def __init__(self, model, *, weights: dict = None):
            super().__init__(model, sigma_data=1.0)

    with pytest.raises(TypeError, match="weights: unsupported option type"):
        method_options.method_options(Odd)


def test_config_value_conversion():
    options = method_options.method_options(Dummy)
    assert options["levels"].convert([3, 4]) == (3, 4)
    assert options["cap"].convert("none") is None and options["cap"].convert(1) == 1.0
    with pytest.raises(ValueError, match="true or false"):
        options["on"].convert("yes")
    with pytest.raises(argparse.ArgumentTypeError):
        options["mode"].convert("z")


def test_run_file_round_trip(tmp_path):
    train = {"method": "ct", "steps": 10, "lr": 1e-3, "ema": [0.9, 0.99], "teacher": None, "progress": False,
             "name": 'a "quoted" \\ name'}
    path = run_config.write(tmp_path / "run.toml", train, {"ect_stages": 6, "p": -1.5})
    raw = tomllib.loads(path.read_text())
    assert raw == {"train": {**train, "teacher": "none"}, "method": {"ect_stages": 6, "p": -1.5}}
    assert run_config.read(path)["method"] == {"ect_stages": 6, "p": -1.5}
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(run_config.RunFileError, match="not valid TOML"):
        run_config.read(tmp_path / "bad.toml")
    (tmp_path / "odd.toml").write_text("steps = 3\n")
    with pytest.raises(run_config.RunFileError, match="unknown key 'steps'"):
        run_config.read(tmp_path / "odd.toml")


def test_recipes_are_the_quality_table_settings():
    """The shipped recipes carry the train-level settings of docs/results.md's runs."""
    assert run_config.recipe("ct")["train"] == {"steps": 15000, "batch": 256, "lr": 2e-3, "lr_decay": "cosine"}
    pd = run_config.recipe("pd")["train"]
    assert pd["lr"] == 5e-4 and pd["lr_decay"] == "none" and pd["eval_ema"] == 0.99 and pd["steps"] == 8000
    assert {m: run_config.recipe(m)["train"]["steps"] for m in ("fm", "cd", "ctm")} == \
        {"fm": 8000, "cd": 9000, "ctm": 6000}
    assert run_config.recipe("nope") == {"train": {}, "method": {}}


TINY = ["--batch", "16", "--hidden", "8", "--depth", "1", "--samples", "100", "--no-nll", "--no-progress",
        "--warmup", "1", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _backend():
    with torch_backend(), one_thread():
        yield


def test_precedence_recipe_file_command_line(tmp_path, capsys):
    """Defaults ← recipe ← run file ← command line; the resolved run goes to config.toml."""
    run_file = tmp_path / "run.toml"
    run_file.write_text('[train]\nmethod = "ct"\ndata = "8gaussians"\nsteps = 3\nlr = 0.01\n\n'
                        '[method]\nect_stages = 3\ns0 = 12\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(run_file), "--out", str(out), "--lr", "0.02", "--ct-s0", "11", *TINY]) == 0
    written = tomllib.loads((out / "config.toml").read_text())
    t, m = written["train"], written["method"]
    assert (t["method"], t["data"], t["steps"], t["lr"], t["lr_decay"], t["batch"]) == \
        ("ct", "8gaussians", 3, 0.02, "cosine", 16)       # file, file, file, command line, recipe, command line
    assert m["ect_stages"] == 3 and m["s0"] == 11 and m["total_steps"] == 3    # total_steps: the run's steps
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["format"] == 2 and state["method_kwargs"]["s0"] == 11 and state["data"] == "8gaussians"
    assert TrainConfig.from_dict(state["config"]).lr == 0.02 and state["run"]["lr"] == 0.02
    # the written run file reproduces the run's settings
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.toml"), "--out", str(again)]) == 0
    assert tomllib.loads((again / "config.toml").read_text())["method"] == m


@pytest.mark.parametrize("text, message", [
    ('[train]\nsteps = 0\n', "[train] steps: must be >= 1"),
    ('[train]\nspeed = 1\n', "unknown setting 'speed'"),
    ('[train]\nmethod = "fm"\n', "is a run of method 'fm', not 'ct'"),
    ('[method]\nschedule = "x"\n', "schedule: expected one of ict, ect"),
    ('[method]\nnope = 1\n', "unknown setting 'nope'"),
])
def test_bad_run_files_exit_2_before_writing(tmp_path, capsys, text, message):
    (tmp_path / "run.toml").write_text(text)
    out = tmp_path / "out"
    assert main(["train", "ct", "--config", str(tmp_path / "run.toml"), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("flowkern: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_help_shows_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "ct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimiser steps in total (default: 15000)" in text and "--ct-ect-stages" in text
    assert "--ct-sigma-data" not in text and "--ct-total-steps" not in text      # run values


def test_config_without_method(tmp_path, capsys):
    (tmp_path / "run.toml").write_text("[train]\nsteps = 2\n")
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 2
    assert "names no method" in capsys.readouterr().err
