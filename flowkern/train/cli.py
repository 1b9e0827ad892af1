"""`flowkern train | sample | eval`: the main job on the embedded data (docs/training.md).

    flowkern train <method> [--config RUN.toml] [--data checkerboard] [--steps N] [--batch B] [--lr LR] [--out DIR]
                            [--teacher PATH] [--seed S] [--resume] [--{method}-{parameter} VALUE ...]
    flowkern train --config RUN.toml [options]        (the method named in the run file)
    flowkern sample CHECKPOINT --out FILE.pt|FILE.png [--steps K] [--n N] [--seed S]
    flowkern eval CHECKPOINT [--steps 1 2 4 8] [--samples N] [--nll]

Every setting has a default from the method's recipe (flowkern/train/recipes/<method>.toml: `flowkern train ct
--data 8gaussians` is the ct of docs/results.md), a run file may override it and the command line overrides both.
The method's flags come from its constructor. `train` writes DIR/config.toml (the resolved run), DIR/checkpoint.pt,
DIR/metrics.jsonl, DIR/samples.png, DIR/loss.png, DIR/quality.json and prints a table of few-step quality (SW₂ and
histogram KL to held-out data at 1/2/4/8 steps; for fm also 100 Euler steps; for a distilled method also its teacher
at 1 and 100 Euler steps). Bad input exits with status 2 and one ``flowkern: error: ...`` line, before anything is
written. Under `torchrun --nproc-per-node W`, --batch is per process.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from flowkern.train import checkpoint, method_options, run_config
from flowkern.train.evaluate import STEPS, draw, format_table, ode_nll, score
from flowkern.train.rebuild import build_method, network, restore
from flowkern.train.rebuild import RUN_KEYS
from flowkern.train.run_options import (
    TRAIN_OPTIONS,
    CLIError,
    Run,
    add_train_flags,
    method_class,
    method_from_run_file,
    resolve,
)

__all__ = ["COMMANDS", "CLIError", "add_parsers", "insert_method", "restore"]

_positive_int = TRAIN_OPTIONS["steps"].parse


# -- parsers ----------------------------------------------------------------------------------------------------------
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
        p.add_argument("--config", type=Path, default=None, help="a run file (TOML: [train] and [method] tables)")
        p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps")
        add_train_flags(p, run_config.recipe(name)["train"])
        method_options.add_method_flags(p.add_argument_group(f"{name} options"), name,
                                        method_options.method_options(cls))

    sample = sub.add_parser("sample", help="draw samples from a trained checkpoint")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--out", type=Path, required=True, help="FILE.pt (tensor) or FILE.png (plot)")
    sample.add_argument("--steps", type=_positive_int, default=1)
    sample.add_argument("--n", type=_positive_int, default=2000)
    sample.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="few-step quality of a trained checkpoint")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--steps", type=_positive_int, nargs="+", default=list(STEPS))
    ev.add_argument("--samples", type=_positive_int, default=5000)
    ev.add_argument("--nll", action="store_true", help="also the likelihood report: the few-step NLL of a joint flow "
                    "map, the model's and the teacher's ODE NLL, the teacher's naive few-step NLL (written to "
                    "quality.json beside the checkpoint)")


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


# -- the steps of `flowkern train` -------------------------------------------------------------------------------
def _load(path: Path, method: str | None = None, keys=checkpoint.ENGINE_KEYS) -> dict:
    try:
        return checkpoint.load(path, method=method, keys=keys)
    except checkpoint.CheckpointError as err:
        raise CLIError(str(err)) from None


def _restore(state: dict):
    try:
        return restore(state)
    except checkpoint.CheckpointError as err:
        raise CLIError(str(err)) from None


def _dataset(name: str):
    from flowkern.data import get_dataset

    try:
        return get_dataset(name)
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None


def _resume_state(run: Run) -> dict | None:
    """The checkpoint to continue (--resume), None for a fresh run; refuses to overwrite a run."""
    ckpt = run.out / "checkpoint.pt"
    if not run.resume:
        if ckpt.exists():
            raise CLIError(f"{str(ckpt)!r} already exists; pass --resume to continue it or choose another --out")
        return None
    if not ckpt.is_file():
        raise CLIError(f"--resume: {str(ckpt)!r} does not exist")
    state = _load(ckpt, method=run.method, keys=RUN_KEYS)
    if state["data"] != run.train["data"]:
        raise CLIError(f"--resume: the checkpoint was trained on {state['data']!r}, not {run.train['data']!r}")
    if state["step"] >= run.train["steps"]:
        raise CLIError(f"--resume: the checkpoint is at step {state['step']}; pass --steps above it")
    return state


def _load_teacher(run: Run):
    """(frozen EMA network, its architecture) of the --teacher flow-matching checkpoint, or None."""
    needs = getattr(run.cls, "needs_teacher", False)
    path = run.train["teacher"]
    if path is None:
        if needs:
            raise CLIError(f"method {run.method!r} distils a teacher: pass --teacher PATH (a checkpoint of "
                           f"'flowkern train fm')")
        return None
    if not needs:
        raise CLIError(f"method {run.method!r} trains from data: --teacher is not used by {run.method!r}")
    state = _load(Path(path), method="fm", keys=RUN_KEYS)
    if state["data"] != run.train["data"]:
        raise CLIError(f"--teacher was trained on {state['data']!r}, not {run.train['data']!r}")
    return _restore(state)[1], state["arch"]


def _train_config(run: Run):
    from flowkern.train.config import TrainConfig

    t = run.train
    try:
        return TrainConfig(steps=t["steps"], batch=t["batch"], lr=t["lr"], optimizer=t["optimizer"],
                           warmup=t["warmup"], lr_decay=t["lr_decay"], grad_clip=t["grad_clip"],
                           ema_decays=tuple(t["ema"]), eval_ema=t["eval_ema"], log_every=t["log_every"],
                           checkpoint_every=t["checkpoint_every"], seed=t["seed"])
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def _architecture(run: Run, dataset, teacher, state) -> dict:
    """The network's constructor arguments: the checkpoint's on resume, the teacher's for a method that starts
    from it, else the run's --hidden/--depth/--time-dim/--dropout."""
    if state is not None:
        return state["arch"]
    if teacher is not None and getattr(run.cls, "init_from_teacher", False):
        return dict(teacher[1])
    t = run.train
    arch = {"dim": dataset.dim, "hidden": t["hidden"], "depth": t["depth"], "time_dim": t["time_dim"],
            "dropout": t["dropout"]}
    if getattr(run.cls, "divergence_head", False):
        arch["divergence_head"] = True   # a joint flow map (u, D), e.g. f2d2
    return arch


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


def _report(run: Run, trainer, method, dataset, teacher, seconds: float) -> None:
    """Rank 0: the quality table (printed and in quality.json), samples.png and loss.png."""
    from flowkern.train.plots import plot_loss, plot_samples

    out = run.out
    print(f"trained {run.method} on {run.train['data']}: {trainer.config.steps} steps in {seconds:.1f} s "
          f"({trainer.skipped} skipped); run directory {out}")
    nll = run.train["nll"] and dataset.dim == 2
    result, drawn, reference = _quality(method, trainer.eval_model(), dataset, run.train["samples"],
                                        teacher=None if teacher is None else teacher[0], nll=nll)
    plot_samples(drawn, reference[:4000], out / "samples.png", title=f"{run.method} on {run.train['data']}")
    plot_loss(trainer.losses, out / "loss.png", title=f"{run.method} loss")
    (out / "quality.json").write_text(json.dumps(
        {"steps": trainer.step_count, "train_seconds": seconds, **{k: v for k, v in result.items() if k != "rows"},
         "rows": {label: scores for label, scores in result["rows"]}}, indent=1))
    _print_quality(result, (*STEPS, 100) if run.method == "fm" or teacher is not None else STEPS)


def _resolved_train_table(run: Run) -> dict:
    """The [train] table of the run's config.toml: the method, then every train-level setting."""
    train = {"method": run.method, **run.train, "out": str(run.out)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in train.items()}


# -- commands ---------------------------------------------------------------------------------------------------------
def _quality(method, model, dataset, samples: int, teacher=None, seed: int = 0, nll: bool = False):
    """Rows of the quality table, the samples for the plot, and the NLL (fm on data with a density)."""
    reference = dataset.held_out(samples)
    fm = method.name == "fm"
    drawn = draw(method.sample, model, dataset, (*STEPS, 100) if fm else STEPS, n=samples, seed=seed)
    rows = [(f"{method.name} (EMA)", score(drawn, dataset, reference))]
    if teacher is not None:
        from flowkern.methods.flow_matching import FlowMatching

        euler = FlowMatching(teacher).sample
        rows.append(("teacher fm (Euler)", score(draw(euler, teacher, dataset, (1, 100), n=samples, seed=seed),
                                                 dataset, reference)))
    result = {"rows": rows}
    if nll and getattr(method, "divergence_head", False):
        from flowkern.train.nll import method_nll_report

        result.update(method_nll_report(method, model, dataset, reference))
    elif nll and hasattr(method, "velocity"):
        result["nll"] = ode_nll(method.velocity(model), reference)
        if dataset.has_density:
            result["data_nll"] = -dataset.log_prob(reference).mean().item()
    return result, {k: v[:4000] for k, v in drawn.items() if k in STEPS}, reference


def _print_quality(result: dict, steps) -> None:
    print(format_table(result["rows"], steps))
    if "nll_ode" in result:
        from flowkern.train.nll import format_nll

        print(format_nll(result))
    if "nll" in result:
        exact = f" (exact NLL of the data: {result['data_nll']:.4f})" if "data_nll" in result else ""
        print(f"NLL via the PF-ODE (RK4, 64 steps, exact divergence): {result['nll']:.4f} nats{exact}")


def train(args) -> int:
    """`flowkern train`: resolve the run, check it, build data, networks, method and trainer, fit, report."""
    from flowkern.train import distributed
    from flowkern.train.loop import Trainer

    run = resolve(args)
    torch.set_num_threads(run.train["threads"])
    state = _resume_state(run)
    teacher = _load_teacher(run)
    dataset = _dataset(run.train["data"])
    config = _train_config(run)
    arch = _architecture(run, dataset, teacher, state)
    method, kwargs = _build_method(run, _build_network(run, arch, teacher), dataset, teacher)
    train_table = _resolved_train_table(run)
    extra = {"method_kwargs": kwargs, "arch": arch, "teacher_arch": None if teacher is None else teacher[1],
             "data": run.train["data"], "run": train_table}
    trainer = Trainer(method, dataset.sample, config, out_dir=run.out, extra=extra, progress=run.train["progress"])
    if state is not None:
        trainer.load(state)
    if trainer.rank == 0:
        run_config.write(run.out / "config.toml", train_table, kwargs)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    if trainer.rank == 0:
        _report(run, trainer, method, dataset, teacher, seconds)
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()
    return 0


def sample(args) -> int:
    from flowkern.train.evaluate import fixed_noise
    from flowkern.train.plots import plot_samples

    if args.out.exists():
        raise CLIError(f"{str(args.out)!r} already exists; choose another --out")
    if args.out.suffix not in (".pt", ".png"):
        raise CLIError(f"--out must end in .pt or .png, got {str(args.out)!r}")
    state = _load(args.checkpoint, keys=RUN_KEYS)
    method, model = _restore(state)
    dataset = _dataset(state["data"])
    with torch.no_grad():
        x = method.sample(model, fixed_noise(dataset, args.n, args.seed), args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".pt":
        torch.save(x, args.out)
    else:
        plot_samples({args.steps: x}, dataset.held_out(args.n), args.out, title=f"{method.name}")
    print(f"wrote {args.n} samples ({args.steps} step{'s' if args.steps > 1 else ''}) to {args.out}")
    return 0


def evaluate(args) -> int:
    state = _load(args.checkpoint, keys=RUN_KEYS)
    method, model = _restore(state)
    dataset = _dataset(state["data"])
    reference = dataset.held_out(args.samples)
    steps = tuple(args.steps)
    result = {"rows": [(f"{method.name} (EMA)", score(draw(method.sample, model, dataset, steps, n=args.samples),
                                                      dataset, reference))]}
    if args.nll:
        from flowkern.train.nll import method_nll_report, update_quality_json

        result.update(method_nll_report(method, model, dataset, reference))
        update_quality_json(args.checkpoint.parent / "quality.json", result)
    print(f"{args.checkpoint}: {method.name} on {state['data']}, step {state['step']}")
    _print_quality(result, steps)
    return 0


COMMANDS = {"train": train, "sample": sample, "eval": evaluate}
