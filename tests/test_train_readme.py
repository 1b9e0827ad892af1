"""The README's commands: the usage example runs on a CPU install, the torchrun line does not collide with the main
job's run directory, and every method it lists is one `flowkern train` trains."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _flowkern_train_args(line: str) -> list[str]:
    words = shlex.split(line)
    i = words.index("train")
    return words[i + 1:]


def test_python_example_needs_no_gpu():
    code = "\n".join(_blocks("python"))
    assert code and "cuda" not in code and ".to(\"cuda" not in code


def test_torchrun_line_has_its_own_run_directory():
    from flowkern.__main__ import main  # noqa: F401  (the CLI imports)
    from flowkern.train.run_options import TRAIN_OPTIONS

    lines = [line for block in _blocks("bash") for line in block.splitlines() if "flowkern train" in line]
    main_job = next(line for line in lines if "torchrun" not in line)
    torchrun = next(line for line in lines if line.startswith("torchrun"))

    def out_dir(line):
        args = _flowkern_train_args(line)
        if "--out" in args:
            return args[args.index("--out") + 1]
        data = args[args.index("--data") + 1] if "--data" in args else TRAIN_OPTIONS["data"].default
        return f"runs/{args[0]}-{data}"

    assert " -m flowkern train " in torchrun
    assert out_dir(torchrun) != out_dir(main_job)


def test_listed_methods_are_trainable():
    from flowkern.train import cli
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_parsers(sub)
    train = next(a for a in sub.choices["train"]._actions if isinstance(a, argparse._SubParsersAction))
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", README, flags=re.M)
    assert listed and set(listed) <= set(train.choices)
