"""What the command line shows and writes: eval's table is train's, --no-eval, sample with several step counts
written atomically, --threads/--device for sample and eval, --help with every default, TensorBoard events, plots."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from cli_helpers import TINY, fast_cli, with_flag  # noqa: F401  (fast_cli: autouse)
from helpers import one_thread, torch_backend

from flowkern.__main__ import main
from flowkern.methods import get_method



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An fm teacher and a cd run distilled from it (train's output captured)."""
    root = tmp_path_factory.mktemp("out")
    with torch_backend(), one_thread():
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(root / "fm"), *TINY]) == 0
        assert main(["train", "cd", "--data", "8gaussians", "--out", str(root / "cd"), "--teacher",
                     str(root / "fm" / "checkpoint.pt"), *TINY]) == 0
    return root


def _table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model"))
    return [line for line in lines[start:] if line.strip()]


def test_eval_prints_the_table_of_train(runs, capsys):
    """Teacher rows and the 100-step column as train printed them (the same numbers: same noise, same data)."""
    quality = json.loads((runs / "cd" / "quality.json").read_text())
    assert set(quality["rows"]) == {"cd (EMA)", "teacher fm (Euler)"}
    assert main(["eval", str(runs / "cd" / "checkpoint.pt"), "--samples", "300", "--no-progress"]) == 0
    table = _table(capsys.readouterr().out)
    assert "SW2@100" in table[0] and table[3].startswith("teacher fm (Euler)")
    for line in table[2:]:
        label = line[:24].strip()
        numbers = [float(x) for x in line[24:].split()]
        expected = quality["rows"][label]
        keys = ["1", "2", "4", "8"] if label.startswith("cd") else ["1", "100"]
        assert numbers == pytest.approx([expected[k]["sw2"] for k in keys] + [expected[k]["kl"] for k in keys],
                                        abs=1e-4)


def test_eval_computes_the_nll_where_there_is_one(runs, capsys):
    assert main(["eval", str(runs / "fm" / "checkpoint.pt"), "--samples", "20", "--steps", "1",
                 "--no-progress"]) == 0
    assert "NLL via the PF-ODE" in capsys.readouterr().out                    # on by default, as for train
    assert main(["eval", str(runs / "cd" / "checkpoint.pt"), "--nll", "--samples", "100"]) == 2
    assert "--nll: method 'cd' has no velocity" in capsys.readouterr().err     # never silently ignored


def test_evaluation_shows_progress(runs, capsys):
    assert main(["eval", str(runs / "fm" / "checkpoint.pt"), "--samples", "100", "--steps", "1", "2",
                 "--no-nll"]) == 0
    assert "evaluation" in capsys.readouterr().err


def test_no_eval_skips_the_report(tmp_path, capsys):
    out = tmp_path / "fm"
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--no-eval", *TINY]) == 0
    assert "SW2" not in capsys.readouterr().out
    assert (out / "checkpoint.pt").is_file() and not (out / "quality.json").exists()
    assert not (out / "samples.png").exists()


def test_sample_several_step_counts_and_atomic_writes(runs, tmp_path, monkeypatch, capsys):
    ckpt = str(runs / "cd" / "checkpoint.pt")
    assert main(["sample", ckpt, "--out", str(tmp_path / "x.pt"), "--n", "40", "--steps", "1", "2", "4"]) == 0
    x = torch.load(tmp_path / "x.pt")
    assert sorted(x) == [1, 2, 4] and all(v.shape == (40, 2) for v in x.values())
    assert not torch.equal(x[1], x[4])
    import flowkern.train.plots as plots

    panels = []
    real = plots.plot_panels
    monkeypatch.setattr(plots, "plot_panels", lambda rows, data, path, **kw: (panels.extend(rows[0]),
                                                                              real(rows, data, path, **kw))[1])
    assert main(["sample", ckpt, "--out", str(tmp_path / "s.png"), "--n", "40", "--steps", "1", "2"]) == 0
    assert [t.split("\n")[0] for t, _ in panels] == ["1 step", "2 steps"] and "SW2" in panels[0][0]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(plots, "plot_panels", real)

    def failing(fig, path, plt):
        from flowkern.train.atomic import write_atomically

        def write(f):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return write_atomically(path, write, what="plot")

    monkeypatch.setattr(plots, "_save", failing)
    target = tmp_path / "fail.png"
    assert main(["sample", ckpt, "--out", str(target), "--n", "40"]) == 1
    assert "could not write the plot" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "fail.png.tmp").exists()
    monkeypatch.undo()
    assert main(["sample", ckpt, "--out", str(target), "--n", "40"]) == 0     # the retry works


def test_sample_and_eval_use_trains_thread_default(runs, tmp_path):
    from flowkern.train.run_options import TRAIN_OPTIONS

    torch.set_num_threads(2)
    assert main(["sample", str(runs / "fm" / "checkpoint.pt"), "--out", str(tmp_path / "a.pt"), "--n", "8"]) == 0
    assert torch.get_num_threads() == TRAIN_OPTIONS["threads"].default == 1
    assert main(["eval", str(runs / "fm" / "checkpoint.pt"), "--samples", "50", "--steps", "1", "--no-nll",
                 "--threads", "2", "--device", "cpu", "--no-progress"]) == 0
    assert torch.get_num_threads() == 2


def _parsers():
    from flowkern.train import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_parsers(sub)
    commands = sub.choices
    methods = next(a for a in commands["train"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    return commands, methods


def test_help_shows_every_default_and_teacher_only_where_it_is_taken():
    commands, methods = _parsers()
    for name, parser in [*methods.items(), ("sample", commands["sample"]), ("eval", commands["eval"])]:
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction) or action.required \
                    or not action.option_strings:
                continue
            assert "default" in action.help, (name, action.option_strings)
        teacher = next(a for a in parser._actions if "--teacher" in a.option_strings) if name in methods else None
        if teacher is not None:
            takes = getattr(get_method(name), "needs_teacher", False)
            assert takes == (name in ("pd", "cd", "ctm", "scd", "f2d2")), name
            assert (teacher.help != argparse.SUPPRESS) == takes, name
    for flag in ("--batch", "--seed", "--warmup", "--grad-clip", "--log-every", "--checkpoint-every"):
        action = next(a for a in methods["fm"]._actions if flag in a.option_strings)
        assert "(default: " in action.help


def test_tensorboard_events_hold_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "fm"
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--tensorboard", "--no-eval", *TINY]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert scalars <= set(events.Tags()["scalars"]) and {"loss", "grad_norm", "lr"} <= scalars
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in records]


def test_samples_png_has_the_teacher_panels_with_their_sw2(runs, monkeypatch):
    import flowkern.train.plots as plots
    from flowkern.data import get_dataset
    from flowkern.train.cli import _restore, _teacher_network
    from flowkern.train.evaluate import quality
    from flowkern.train import checkpoint

    state = checkpoint.load(runs / "cd" / "checkpoint.pt")
    method, model = _restore(state, "cd")
    result = quality(method, model, get_dataset("8gaussians"), 200, teacher=_teacher_network(state))
    captured = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, plt: captured.setdefault("fig", fig))
    plots.plot_report(result, "unused.png")
    titles = [ax.get_title() for ax in captured["fig"].axes if ax.get_title()]
    sw2 = {label: scores for label, scores in result["rows"]}
    assert f"teacher fm (Euler) · 1 step\nSW2 {sw2['teacher fm (Euler)'][1]['sw2']:.4f}" in titles
    assert f"teacher fm (Euler) · 100 steps\nSW2 {sw2['teacher fm (Euler)'][100]['sw2']:.4f}" in titles
    assert f"cd (EMA) · 4 steps\nSW2 {sw2['cd (EMA)'][4]['sw2']:.4f}" in titles and "data (held out)" in titles


def test_loss_png_has_labels_and_every_loss_term(monkeypatch):
    import flowkern.train.plots as plots

    captured = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, plt: captured.setdefault("fig", fig))
    records = [{"step": 2, "loss": 1.0, "discriminator_loss": 0.7, "dsm_loss": 0.2},
               {"step": 4, "loss": 0.5, "discriminator_loss": 0.6, "dsm_loss": 0.1}]
    plots.plot_loss([1.2, 1.0, 0.7, 0.5], "unused.png", records=records)
    ax = captured["fig"].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "discriminator_loss" in labels and "dsm_loss" in labels and labels[0].startswith("loss")
    assert ax.get_xlabel() == "optimiser step" and ax.get_ylabel().startswith("loss")


def test_digit_grids_have_gaps_between_images():
    from flowkern.train.plots import GAP, GAP_VALUE, image_grid

    x = torch.ones(36, 64)                                   # 36 black 8×8 digits
    grid = image_grid(x)
    assert grid.shape == (6 * 8 + 7 * GAP, 6 * 8 + 7 * GAP)
    assert bool((grid[:GAP] == GAP_VALUE).all()) and bool((grid[:, GAP + 8:2 * GAP + 8] == GAP_VALUE).all())
    assert bool((grid[GAP:GAP + 8, GAP:GAP + 8] == 1).all())
