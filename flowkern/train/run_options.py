"""The options of `flowkern train` and how a run is resolved from them (docs/training.md).

Each setting comes from, last one winning: the built-in default, the method's shipped recipe
(`flowkern/train/recipes/<method>.toml`), the ``--config`` run file, the command line. Train-level settings are the
`TRAIN_OPTIONS` below (flag ``--name-with-dashes``, run-file key ``name`` in ``[train]``); method-level settings are
the method's constructor keywords (`flowkern.train.method_options`).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from flowkern.train import method_options, run_config
from flowkern.train.method_options import Option


class CLIError(Exception):
    """Bad input: printed as ``flowkern: error: ...`` with exit status 2."""


def _number(tp, minimum=None, *, strict: bool = False, below=None):
    kind = "an integer" if tp is int else "a number"

    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if tp is float and value in (float("inf"), float("-inf")) or value != value:
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {below}), got {text}")
        return value
    return parse


def _choice(choices):
    def parse(text: str):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(choices)})")
        return text
    return parse


def device(text: str) -> str:
    """"auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"; checked against this machine."""
    import torch

    if text == "auto" or text == "cpu":
        return text
    if text == "cuda" or text.startswith("cuda:") and text[5:].isdigit():
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available on this machine")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _path_or_none(text: str):
    return None if text.lower() == "none" else text


def _eval_ema(text: str):
    return None if text.lower() == "none" else _number(float, 0, strict=True, below=1)(text)


def _train_options() -> dict[str, Option]:
    from flowkern.data import DATASET_NAMES
    from flowkern.train.config import LR_DECAYS, OPTIMIZERS
    from flowkern.train.rebuild import ARCHS

    positive_int, positive = _number(int, 1), _number(float, 0, strict=True)
    table = [
        Option("data", _choice(DATASET_NAMES), "value", "checkerboard", DATASET_NAMES, "dataset"),
        Option("steps", positive_int, "value", 1500, help="optimiser steps in total"),
        Option("batch", positive_int, "value", 256, help="rows per process per step"),
        Option("lr", positive, "value", 2e-3, help="peak learning rate"),
        Option("optimizer", _choice(OPTIMIZERS), "value", "adamw", OPTIMIZERS),
        Option("warmup", _number(int, 0), "value", 100, help="linear LR warm-up steps"),
        Option("lr_decay", _choice(LR_DECAYS), "value", "none", LR_DECAYS,
               "after the warm-up: a constant LR or a cosine to 0 at the last step"),
        Option("grad_clip", positive, "value", 1.0, help="max global gradient norm, per network"),
        Option("ema", _number(float, 0, strict=True, below=1), "tuple", (0.99, 0.999), help="EMA decays kept"),
        Option("eval_ema", _eval_ema, "value", 0.999, help="the EMA decay used to sample (none: the raw weights)"),
        Option("seed", _number(int, 0), "value", 0, help="seeds every RNG, the initial weights included"),
        Option("out", _path_or_none, "value", None, help="run directory (none: runs/<method>-<data>)"),
        Option("teacher", _path_or_none, "value", None,
               help="a checkpoint of 'flowkern train fm' (methods that distil a teacher)"),
        Option("arch", _choice(ARCHS), "value", "mlp", ARCHS,
               "the network: an MLPFlowMap, or a DiT (patch 2) on image data (digits)"),
        Option("hidden", positive_int, "value", 128, help="MLPFlowMap width"),
        Option("depth", positive_int, "value", 3, help="MLPFlowMap residual blocks"),
        Option("time_dim", positive_int, "value", 64, help="MLPFlowMap time-embedding width"),
        Option("dropout", _number(float, 0, below=1), "value", 0.0,
               help="MLPFlowMap dropout inside each block (ct, cd and ctm replay the grad pass's masks in their "
                    "target passes)"),
        Option("samples", positive_int, "value", 5000, help="samples for the quality table"),
        Option("log_every", positive_int, "value", 25, help="steps between metrics.jsonl lines"),
        Option("checkpoint_every", _number(int, 0), "value", 500,
               help="steps between checkpoints (0: none by step count; one is always written at the end and on "
                    "SIGINT/SIGTERM)"),
        Option("checkpoint_minutes", _number(float, 0), "value", 10.0,
               help="minutes between checkpoints (0: none by time)"),
        Option("max_consecutive_skips", _number(int, 0), "value", 20,
               help="stop with exit status 1 after this many consecutive steps skipped for a non-finite loss or "
                    "gradient (0: never)"),
        Option("ddp_timeout", _number(float, 0, strict=True), "value", 300.0,
               help="seconds a DDP collective waits for the other ranks before the run fails naming the silent "
                    "one"),
        Option("fsdp", bool, "bool", False,
               help="shard the model with FSDP2 across the torchrun processes instead of replicating it (DDP); "
                    "checkpoints hold full weights"),
        Option("device", device, "value", "auto", help="auto (CUDA when available), cpu, cuda or cuda:N"),
        Option("threads", positive_int, "value", 1,
               help="torch CPU threads (these small MLPs gain little from more, and spinning threads on a busy "
                    "machine cost up to 10x)"),
        Option("progress", bool, "bool", True, help="progress bars for training and evaluation"),
        Option("eval", bool, "bool", True,
               help="the quality table, samples.png, loss.png and quality.json after training"),
        Option("nll", bool, "bool", True,
               help="the ODE NLL in the quality table (methods with a velocity, 2-D data; --nll is an error "
                    "elsewhere)"),
        Option("tensorboard", bool, "bool", False,
               help="also write every logged scalar as TensorBoard events to <out>/tensorboard (needs the "
                    "tensorboard package)"),
    ]
    return {o.name: o for o in table}


TRAIN_OPTIONS = _train_options()
# the settings a resumed run may change (the rest is the run's and stays as stored)
RESUMABLE = ("steps", "out", "samples", "log_every", "checkpoint_every", "checkpoint_minutes",
             "max_consecutive_skips", "ddp_timeout", "fsdp", "device", "threads", "progress", "eval", "nll", "tensorboard")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_flags(parser, recipe: dict, *, teacher: bool = True) -> None:
    """The `TRAIN_OPTIONS` flags (absent from the namespace unless given); help shows the recipe's defaults.
    `teacher` False: --teacher is accepted (and refused with a message when used) but not listed."""
    for o in TRAIN_OPTIONS.values():
        default = recipe.get(o.name, o.default)
        shown = "none" if default is None else " ".join(map(str, default)) if isinstance(default, (list, tuple)) \
            else default
        text = f"{o.help} (default: {shown})".lstrip() if teacher or o.name != "teacher" else argparse.SUPPRESS
        kw = dict(dest=o.name, default=argparse.SUPPRESS, help=text)
        if o.kind == "bool":
            parser.add_argument(flag(o.name), action=argparse.BooleanOptionalAction, **kw)
        elif o.kind == "tuple":
            parser.add_argument(flag(o.name), type=o.parse, nargs="+", **kw)
        else:
            metavar = "{" + ",".join(o.choices) + "}" if o.choices else None
            parser.add_argument(flag(o.name), type=o.parse, metavar=metavar, **kw)


def given(args: argparse.Namespace) -> dict:
    """The train-level settings given on the command line (converted)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in TRAIN_OPTIONS}


@dataclasses.dataclass
class Run:
    """A resolved `flowkern train`: the method's name and class, every train-level setting, the method keywords
    set by a recipe, run file or flag (converted; the rest take the constructor defaults)."""

    method: str
    cls: type
    train: dict
    method_values: dict
    resume: bool = False
    explicit: dict = dataclasses.field(default_factory=dict)          # train settings of the run file and flags
    explicit_method: dict = dataclasses.field(default_factory=dict)   # method settings of the run file and flags

    @property
    def out(self) -> Path:
        return Path(self.train["out"] or Path("runs") / f"{self.method}-{self.train['data']}")


def _convert(options: dict[str, Option], values: dict, where: str, passthrough=()) -> dict:
    out = {}
    for k, v in values.items():
        if k in passthrough:
            out[k] = v
            continue
        if k not in options:
            raise CLIError(f"{where}: unknown setting {k!r}; known: {', '.join(options)}")
        try:
            out[k] = options[k].convert(v)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise CLIError(f"{where} {k}: {err}") from None
    return out


def method_class(name: str):
    from flowkern.methods import get_method

    try:
        return get_method(name)
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None


def read_run_file(path) -> dict:
    try:
        return run_config.read(path)
    except run_config.RunFileError as err:
        raise CLIError(str(err)) from None


def method_from_run_file(path) -> str:
    """The ``[train] method`` of a run file (for ``flowkern train --config FILE`` without a method)."""
    name = read_run_file(path)["train"].get("method")
    if not isinstance(name, str):
        raise CLIError(f"config {str(path)!r} names no method ([train] method = \"...\"); pass one: "
                       f"flowkern train <method> --config {path}")
    return name


def resolve(args: argparse.Namespace) -> Run:
    """The run that `args` (a parsed `flowkern train`) describes: defaults ← recipe ← run file ← command line."""
    name = args.method
    cls = method_class(name)
    options = method_options.method_options(cls)
    run_values = method_options.run_value_names(cls)
    recipe = run_config.recipe(name)
    layers = [("recipe " + name, recipe)]
    if getattr(args, "config", None) is not None:
        layers.append((f"config {str(args.config)!r}", read_run_file(args.config)))
    train = {k: o.default for k, o in TRAIN_OPTIONS.items()}
    method_values, explicit, explicit_method = {}, {}, {}
    for i, (where, layer) in enumerate(layers):
        table = dict(layer["train"])
        named = table.pop("method", name)
        if named != name:
            raise CLIError(f"{where} is a run of method {named!r}, not {name!r}")
        values = _convert(TRAIN_OPTIONS, table, f"{where} [train]")
        method = _convert(options, layer["method"], f"{where} [method]", passthrough=run_values)
        train.update(values)
        method_values.update(method)
        if i > 0:
            explicit.update(values)
            explicit_method.update(method)
    train.update(given(args))
    explicit.update(given(args))
    method_values.update(method_options.given_flags(args, name))
    explicit_method.update(method_options.given_flags(args, name))
    return Run(name, cls, train, method_values, resume=bool(getattr(args, "resume", False)), explicit=explicit,
               explicit_method=explicit_method)
