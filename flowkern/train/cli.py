"""`flowkern train | sample | eval`: the main job on the embedded data (docs/training.md).

    flowkern train <method> [--config RUN.toml] [--data checkerboard] [--steps N] [--batch B] [--lr LR] [--out DIR]
                            [--teacher PATH] [--seed S] [--resume] [--{method}-{parameter} VALUE ...]
    flowkern train --config RUN.toml [options]        (the method named in the run file)
    flowkern sample CHECKPOINT --out FILE.pt|FILE.png [--steps K [K ...]] [--n N] [--seed S]
    flowkern eval CHECKPOINT [--steps 1 2 4 8] [--samples N] [--no-nll]

Every setting has a default from the method's recipe (flowkern/train/recipes/<method>.toml: `flowkern train ct
--data 8gaussians` is the ct of docs/results.md), a run file may override it and the command line overrides both.
The method's flags come from its constructor. `train` writes DIR/config.toml (the resolved run), DIR/checkpoint.pt
(every --checkpoint-every steps / --checkpoint-minutes minutes, at the end, and on SIGINT/SIGTERM),
DIR/metrics.jsonl, then (unless --no-eval) DIR/samples.png, DIR/loss.png, DIR/quality.json and prints a table of
few-step quality (SW₂ and histogram KL to held-out data at 1/2/4/8 steps; for fm also 100 Euler steps; for a
distilled method also its teacher at 1 and 100 Euler steps); `eval` prints the same table for a checkpoint. Bad
input exits with status 2 and one ``flowkern: error: ...`` line, before anything is written; a run that stops
early (a signal, divergence, a silent DDP rank, a failed write) exits non-zero saying why. Under
`torchrun --nproc-per-node W`, --batch is per process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from flowkern.train import checkpoint, method_options, profile, run_config
from flowkern.train.atomic import WriteError, write_atomically, write_text_atomically
from flowkern.train.evaluate import STEPS, format_report, nll_unavailable, quality, report_json
from flowkern.train.rebuild import RUN_KEYS, architecture, build_method, network, restore
from flowkern.train.run_dir import RunDirError, RunLock, check_out_dir
from flowkern.train.run_options import TRAIN_OPTIONS, CLIError, Run, add_train_flags, device, method_class
from flowkern.train.run_options import method_from_run_file, resolve
from flowkern.train.stops import TrainingInterrupted, TrainingStopped

__all__ = ["COMMANDS", "CLIError", "add_parsers", "insert_method", "restore"]

_positive_int = TRAIN_OPTIONS["steps"].parse
_THREADS = TRAIN_OPTIONS["threads"]


def warn(message: str) -> None:
    print(f"flowkern: warning: {message}", file=sys.stderr)


# -- parsers ----------------------------------------------------------------------------------------------------------
def _add_run_flags(p, what: str) -> None:
    """--threads, --device and --progress of `sample` and `eval`, with train's defaults."""
    p.add_argument("--threads", type=_THREADS.parse, default=_THREADS.default,
                   help=f"{_THREADS.help} (default: {_THREADS.default}, as for train)")
    p.add_argument("--device", type=device, default="auto",
                   help=f"{TRAIN_OPTIONS['device'].help} (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=what == "eval",
                   help=f"a progress bar (default: {'on' if what == 'eval' else 'off'})")


def add_parsers(sub) -> None:
    """Add `train`, `sample` and `eval` to the `flowkern` sub-command parsers."""
    from flowkern.methods import METHODS

    train = sub.add_parser("train", help="train a method on embedded data", description=__doc__.splitlines()[0])
    methods = train.add_subparsers(dest="method", required=True, metavar="method",
                                   help=f"one of: {', '.join(METHODS)}")
    for name in METHODS:
        try:
            cls = method_class(name)
        except CLIError:
            continue   # reported when the method is run
        p = methods.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        p.add_argument("--config", type=Path, default=None,
                       help="a run file (TOML: [train] and [method] tables) (default: none)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint and stored settings, up to --steps "
                            "(default: off)")
        add_train_flags(p, run_config.recipe(name)["train"], teacher=getattr(cls, "needs_teacher", False))
        profile.add_flag(p)
        method_options.add_method_flags(p.add_argument_group(f"{name} options"), name,
                                        method_options.method_options(cls))

    sample = sub.add_parser("sample", help="draw samples from a trained checkpoint")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--out", type=Path, required=True,
                        help="FILE.pt (a tensor; {steps: tensor} for several --steps) or FILE.png (one figure)")
    sample.add_argument("--steps", type=_positive_int, nargs="+", default=[1],
                        help="sampling steps; several give one panel each (default: 1)")
    sample.add_argument("--n", type=_positive_int, default=2000, help="samples per step count (default: 2000)")
    sample.add_argument("--seed", type=int, default=0, help="seeds the noise (default: 0)")
    _add_run_flags(sample, "sample")

    ev = sub.add_parser("eval", help="few-step quality of a trained checkpoint (the table of train)")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--steps", type=_positive_int, nargs="+", default=None,
                    help="step counts (default: 1 2 4 8, and 100 for fm or a run with a teacher)")
    ev.add_argument("--samples", type=_positive_int, default=TRAIN_OPTIONS["samples"].default,
                    help=f"samples per step count (default: {TRAIN_OPTIONS['samples'].default})")
    ev.add_argument("--nll", action=argparse.BooleanOptionalAction, default=None,
                    help="the NLL: the ODE NLL of a method with a velocity on 2-D data; for a joint flow map (f2d2) the "
                         "likelihood report, also written to quality.json beside the checkpoint (default: on where "
                         "available; --nll elsewhere is an error)")
    _add_run_flags(ev, "eval")


def insert_method(argv: list[str]) -> list[str]:
    """``train --config FILE ...`` without a method: the argv with the run file's method inserted after `train`."""
    if len(argv) < 2 or argv[0] != "train" or not argv[1].startswith("-") or argv[1] in ("-h", "--help"):
        return argv
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return argv
    return [argv[0], method_from_run_file(path), *argv[1:]]


# -- checkpoints, data, devices ---------------------------------------------------------------------------------------
def _load(path: Path, method: str | None = None, keys=checkpoint.ENGINE_KEYS) -> dict:
    try:
        return checkpoint.load(path, method=method, keys=keys)
    except checkpoint.CheckpointError as err:
        raise CLIError(str(err)) from None


def _restore(state: dict, where: str):
    try:
        return restore(state)
    except checkpoint.CheckpointError as err:
        raise CLIError(str(err)) from None
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CLIError(f"{where} does not fit the architecture it records: {str(err).strip().splitlines()[0]}") \
            from None


def _dataset(name: str):
    from flowkern.data import get_dataset

    try:
        return get_dataset(name)
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None


def _device(name: str) -> torch.device | None:
    """The torch device of --device (None for auto: the engine's choice, LOCAL_RANK's GPU under CUDA)."""
    if name == "auto":
        return None
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _eval_device(name: str) -> torch.device:
    return _device(name) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _teacher_network(state: dict):
    """The frozen fm teacher stored in a checkpoint (``teacher_weights``), or None."""
    if not state.get("teacher_arch") or "teacher_weights" not in state:
        return None
    net = network(state["teacher_arch"])
    net.load_state_dict(state["teacher_weights"])
    return net.eval().requires_grad_(False)


# -- the steps of `flowkern train` -------------------------------------------------------------------------------
def _resume(run: Run) -> tuple[Run, dict | None, list[str]]:
    """(the run, the checkpoint to continue or None, what --resume changed); refuses to overwrite a run."""
    from flowkern.train.resume import resumed_run

    ckpt = run.out / "checkpoint.pt"
    if not run.resume:
        if ckpt.exists():
            raise CLIError(f"{str(ckpt)!r} already exists; pass --resume to continue it or choose another --out")
        return run, None, []
    if not ckpt.is_file():
        raise CLIError(f"--resume: {str(ckpt)!r} does not exist")
    state = _load(ckpt, method=run.method, keys=(*RUN_KEYS, "run"))
    run, changes = resumed_run(run, state)
    if state["step"] > run.train["steps"]:
        raise CLIError(f"--resume: the checkpoint is at step {state['step']}; pass --steps {state['step']} or more")
    if state["step"] == run.train["steps"] and (not run.train["eval"] or (run.out / "quality.json").is_file()):
        raise CLIError(f"--resume: the run is complete at step {state['step']}"
                       f"{' and evaluated' if run.train['eval'] else ''}; pass --steps above it to train further")
    return run, state, changes


def _load_teacher(run: Run, state: dict | None):
    """(frozen EMA network, its architecture) of the run's fm teacher, or None: from --teacher for a new run,
    from the checkpoint on resume."""
    needs = getattr(run.cls, "needs_teacher", False)
    if state is not None:
        net = _teacher_network(state)
        if needs and net is None:
            raise CLIError("--resume: the checkpoint does not hold its teacher (written by an older flowkern?)")
        return None if net is None else (net, state["teacher_arch"])
    path = run.train["teacher"]
    if path is None:
        if needs:
            raise CLIError(f"method {run.method!r} distils a teacher: pass --teacher PATH (a checkpoint of "
                           f"'flowkern train fm')")
        return None
    if not needs:
        raise CLIError(f"method {run.method!r} trains from data: --teacher is not used by {run.method!r}")
    where = f"--teacher {str(path)!r}"
    try:
        teacher = checkpoint.load(Path(path), method="fm", keys=RUN_KEYS)
    except checkpoint.CheckpointError as err:
        raise CLIError(f"{where}: {err}") from None
    if teacher["data"] != run.train["data"]:
        raise CLIError(f"--teacher was trained on {teacher['data']!r}, not {run.train['data']!r}")
    return _restore(teacher, where)[1], teacher["arch"]


def _train_config(run: Run):
    from flowkern.train.config import TrainConfig

    t = run.train
    try:
        return TrainConfig(steps=t["steps"], batch=t["batch"], lr=t["lr"], optimizer=t["optimizer"],
                           warmup=t["warmup"], lr_decay=t["lr_decay"], grad_clip=t["grad_clip"],
                           ema_decays=tuple(t["ema"]), eval_ema=t["eval_ema"], log_every=t["log_every"],
                           checkpoint_every=t["checkpoint_every"], checkpoint_minutes=t["checkpoint_minutes"],
                           max_consecutive_skips=t["max_consecutive_skips"], ddp_timeout=t["ddp_timeout"],
                           fsdp=t["fsdp"], seed=t["seed"])
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


ARCH_KEYS = {"arch": "mlp", "hidden": 0.0, "depth": 0.0, "time_dim": 0.0, "dropout": 0.0}  # key: absent-value


def _architecture(run: Run, dataset, teacher, state) -> dict:
    """The network's constructor arguments: the checkpoint's on resume, the teacher's for a method that starts
    from it (an explicit different --hidden/... is an error, not silently ignored), else the run's
    --arch with --hidden/--depth/--time-dim/--dropout."""
    if state is not None:
        return state["arch"]
    t = run.train
    if teacher is not None and getattr(run.cls, "init_from_teacher", False):
        arch = dict(teacher[1])
        for key, absent in ARCH_KEYS.items():
            value = arch.get(key, absent)
            if key in run.explicit and run.explicit[key] != value:
                raise CLIError(f"--{key.replace('_', '-')} {run.explicit[key]}: {run.method} starts from the "
                               f"teacher and takes its architecture ({key} {value}); leave it out")
            t[key] = value     # the run records the architecture it trains
        return arch
    try:
        arch = architecture(t["arch"], t, dataset.shape, run.cls)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if getattr(run.cls, "divergence_head", False):    # a joint flow map (u, D), e.g. f2d2
        arch["divergence_head"] = True
    return arch


def _check_size(arch: dict, run: Run, dev: torch.device | None) -> None:
    """CLIError when the network, its gradient, Adam state and EMA copies cannot fit in memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():     # shapes only: no memory is allocated
        params = sum(p.numel() for p in network(arch).parameters())
    copies = 4 + len(run.train["ema"]) + (2 if getattr(run.cls, "needs_teacher", False) else 0)
    need = params * 4 * copies
    dev = dev or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        have = torch.cuda.get_device_properties(dev).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        sizes = " ".join(f"--{k.replace('_', '-')} {arch[k]}" for k in ("hidden", "depth", "time_dim"))
        raise CLIError(f"{sizes}: the network has {params:,} parameters; training it needs about "
                       f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of this {dev.type}")


def _build_network(run: Run, arch: dict, teacher) -> torch.nn.Module:
    from flowkern import _rng

    _rng.seed_all(run.train["seed"])   # the initial weights (and an auxiliary network's) follow --seed too
    model = network(arch)
    if teacher is not None and getattr(run.cls, "init_from_teacher", False):
        model.load_state_dict(teacher[0].state_dict())
    return model


def _build_method(run: Run, model, dataset, teacher):
    """(method, its keyword arguments): the run's method values over the constructor defaults, plus the run values
    (sigma_data: the data's standard deviation, total_steps: --steps, data_dim: features per sample)."""
    run_values = {"sigma_data": dataset.data_std(), "total_steps": run.train["steps"],
                  "data_dim": math.prod(dataset.shape)}
    try:
        kwargs = method_options.resolve(run.cls, run.method_values, run_values)
        method = build_method(run.cls, model, kwargs, None if teacher is None else teacher[0])
    except (TypeError, ValueError) as err:
        raise CLIError(f"{run.method}: {err}") from None
    return method, kwargs


def _check_run(run: Run, method, dataset) -> None:
    """Errors for settings that cannot work, warnings for ones that make little sense."""
    t = run.train
    if t["tensorboard"]:
        from flowkern.train.metrics_log import tensorboard_available

        if not tensorboard_available():
            raise CLIError("--tensorboard needs the tensorboard package (python3 -m pip install tensorboard)")
    if t["eval"] and t["nll"] and "nll" in run.explicit:
        why = nll_unavailable(method, dataset)
        if why is not None:
            raise CLIError(f"--nll: {why}; pass --no-nll")
    if t["eval"] and t["samples"] < 2:
        raise CLIError(f"--samples {t['samples']}: the quality table compares sample sets; pass at least 2")
    if t["eval"] and t["samples"] < 100:
        warn(f"--samples {t['samples']}: SW2 and KL from so few samples are mostly noise (5000 is the default)")
    if t["warmup"] >= t["steps"]:
        warn(f"--warmup {t['warmup']} >= --steps {t['steps']}: the learning rate never reaches --lr {t['lr']}")
    rounds = _halving_rounds(method)
    if rounds and t["steps"] < 10 * rounds:
        recipe = run_config.recipe(run.method)["train"].get("steps", TRAIN_OPTIONS["steps"].default)
        warn(f"{run.method}: --steps {t['steps']} leaves {t['steps'] // rounds or 'less than 1'} optimiser step(s) "
             f"for each of its {rounds} halving rounds; its recipe trains {recipe}")


def _halving_rounds(method) -> int:
    """The halving rounds of a progressive method (start_steps → min_steps), 0 for other methods."""
    start, end = getattr(method, "start_steps", None), getattr(method, "min_steps", None)
    if not isinstance(start, int) or not isinstance(end, int) or not hasattr(method, "round_steps"):
        return 0
    return int(math.log2(start // end)) + 1 if end > 0 and start >= end else 0


def _report(run: Run, trainer, method, model, dataset, teacher, seconds: float) -> None:
    """Rank 0: the quality table of `model` (printed and in quality.json), samples.png and loss.png."""
    from flowkern.train import metrics_log
    from flowkern.train.plots import plot_loss, plot_report

    out = run.out
    nll = run.train["nll"] and nll_unavailable(method, dataset) is None
    result = quality(method, model, dataset, run.train["samples"],
                     teacher=None if teacher is None else teacher[0], nll=nll, progress=run.train["progress"])
    plot_report(result, out / "samples.png", title=f"{run.method} on {run.train['data']} (step {trainer.step_count})")
    plot_loss(trainer.losses, out / "loss.png", title=f"{run.method} loss on {run.train['data']}",
              records=metrics_log.read(out / metrics_log.FILE))
    write_text_atomically(out / "quality.json", json.dumps(report_json(
        result, steps=trainer.step_count, train_seconds=seconds), indent=1), what="quality report")
    print(format_report(result))


def _resolved_train_table(run: Run) -> dict:
    """The [train] table of the run's config.toml: the method, then every train-level setting."""
    train = {"method": run.method, **run.train, "out": str(run.out)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in train.items()}


# -- commands ---------------------------------------------------------------------------------------------------------
def train(args) -> int:
    """`flowkern train`: resolve the run, check it, build data, networks, method and trainer, fit, report."""
    run = resolve(args)
    try:
        check_out_dir(run.out)
    except RunDirError as err:
        raise CLIError(str(err)) from None
    torch.set_num_threads(run.train["threads"])
    run, state, changes = _resume(run)
    teacher = _load_teacher(run, state)
    dataset = _dataset(run.train["data"])
    config = _train_config(run)
    dev = _device(run.train["device"])
    arch = _architecture(run, dataset, teacher, state)
    _check_size(arch, run, dev)
    method, kwargs = _build_method(run, _build_network(run, arch, teacher), dataset, teacher)
    _check_run(run, method, dataset)
    with contextlib.ExitStack() as held:
        if int(os.environ.get("RANK", "0")) == 0:     # one run per directory (rank 0 speaks for a DDP job)
            try:
                held.enter_context(RunLock(run.out))
            except RunDirError as err:
                raise CLIError(str(err)) from None
        return _train(run, state, changes, teacher, dataset, config, dev, arch, method, kwargs,
                      traced=getattr(args, "profile", 0))


def _train(run, state, changes, teacher, dataset, config, dev, arch, method, kwargs, traced=0) -> int:
    from flowkern.train import distributed
    from flowkern.train.loop import Trainer

    train_table = _resolved_train_table(run)
    extra = {"method_kwargs": kwargs, "arch": arch, "teacher_arch": None if teacher is None else teacher[1],
             "data": run.train["data"], "run": train_table}
    if teacher is not None:
        extra["teacher_weights"] = {k: v.detach().cpu() for k, v in teacher[0].state_dict().items()}
    try:
        trainer = Trainer(method, dataset.sample, config, out_dir=run.out, device=dev, extra=extra,
                          progress=run.train["progress"], tensorboard=run.train["tensorboard"])
        if state is not None:
            trainer.load(state)
    except (checkpoint.CheckpointError, ValueError) as err:
        raise CLIError(f"{'--resume: ' if state is not None else ''}{err}") from None
    try:
        return _fit_and_report(run, trainer, state, changes, method, dataset, teacher, train_table, kwargs,
                               traced=traced)
    except TrainingInterrupted as stop:
        if trainer.rank == 0:
            print(f"flowkern: {stop}\nresume with: flowkern train {run.method} --out {run.out} --resume",
                  file=sys.stderr)
        return stop.exit_code
    except (TrainingStopped, WriteError) as stop:
        print(f"flowkern: error: {stop}", file=sys.stderr)
        return getattr(stop, "exit_code", 1)
    finally:
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()


def _fit_and_report(run, trainer, state, changes, method, dataset, teacher, train_table, kwargs, traced=0) -> int:
    if trainer.rank == 0:
        if changes:
            print(f"resuming {run.out} at step {trainer.step_count}; changed: {'; '.join(changes)}")
        elif state is not None:
            print(f"resuming {run.out} at step {trainer.step_count} with its stored settings")
        run_config.write(run.out / "config.toml", train_table, kwargs)
    start = time.perf_counter()
    if trainer.step_count < trainer.config.steps:
        with profile.profile_steps(trainer, traced, run.out) if traced else contextlib.nullcontext():
            trainer.fit()
    seconds = time.perf_counter() - start
    model = trainer.eval_model() if run.train["eval"] else None     # every rank: gathered from the shards (FSDP)
    if trainer.rank == 0:
        print(f"trained {run.method} on {run.train['data']}: {trainer.step_count} steps in {seconds:.1f} s "
              f"({trainer.skipped} skipped); run directory {run.out}")
        if model is not None:
            _report(run, trainer, method, model, dataset, teacher, seconds)
    return 0


def _checked_out(out: Path) -> Path:
    if out.exists():
        raise CLIError(f"{str(out)!r} already exists; choose another --out")
    if out.suffix not in (".pt", ".png"):
        raise CLIError(f"--out must end in .pt or .png, got {str(out)!r}")
    try:
        check_out_dir(out.parent)
    except RunDirError as err:
        raise CLIError(str(err).replace(f"--out {str(out.parent)!r}", f"--out {str(out)!r}")) from None
    return out


def _restored(args):
    """(state, method, EMA model, dataset) of the checkpoint of `sample` / `eval`, on --device."""
    torch.set_num_threads(args.threads)
    state = _load(args.checkpoint, keys=RUN_KEYS)
    method, model = _restore(state, f"checkpoint {str(args.checkpoint)!r}")
    dev = _eval_device(args.device)
    return state, method.to(dev), model.to(dev), _dataset(state["data"])


def sample(args) -> int:
    from flowkern.train.evaluate import draw, score
    from flowkern.train.plots import plot_samples

    out = _checked_out(args.out)
    state, method, model, dataset = _restored(args)
    steps = list(dict.fromkeys(args.steps))
    x = draw(method.sample, model, dataset, steps, n=args.n, seed=args.seed)
    try:
        if out.suffix == ".pt":
            payload = x[steps[0]] if len(steps) == 1 else x
            write_atomically(out, lambda f: torch.save(payload, f), what="samples")
        else:
            reference = dataset.held_out(args.n)
            plot_samples(x, reference, out, title=f"{method.name} on {state['data']} (step {state['step']})",
                         scores=score(x, dataset, reference))
    except WriteError as err:
        print(f"flowkern: error: {err}", file=sys.stderr)
        return 1
    counts = " ".join(map(str, steps))
    print(f"wrote {args.n} samples ({counts} step{'s' if steps != [1] else ''}) to {out}")
    return 0


def evaluate(args) -> int:
    state, method, model, dataset = _restored(args)
    why = nll_unavailable(method, dataset)
    if args.nll and why is not None:
        raise CLIError(f"--nll: {why}")
    teacher = _teacher_network(state)
    if teacher is not None:
        teacher = teacher.to(_eval_device(args.device))
    result = quality(method, model, dataset, args.samples, teacher=teacher, nll=args.nll is not False and why is None,
                     progress=args.progress, steps=args.steps)
    if "nll_ode" in result:   # the likelihood report of a joint flow map, kept beside the checkpoint
        from flowkern.train.nll import update_quality_json

        update_quality_json(args.checkpoint.parent / "quality.json",
                            {k: v for k, v in report_json(result).items() if k != "rows"})
    print(f"{args.checkpoint}: {method.name} on {state['data']}, step {state['step']}")
    print(format_report(result))
    return 0


COMMANDS = {"train": train, "sample": sample, "eval": evaluate}
