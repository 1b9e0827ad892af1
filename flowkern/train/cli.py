"""`flowkern train | sample | eval`: the main job on the embedded data.

    flowkern train <method> [--data checkerboard] [--steps N] [--batch B] [--lr LR] [--out DIR] [--teacher PATH]
                            [--seed S] [--resume] [method options]
    flowkern sample CHECKPOINT --out FILE.pt|FILE.png [--steps K] [--n N] [--seed S]
    flowkern eval CHECKPOINT [--steps 1 2 4 8] [--samples N] [--nll]

`train` writes DIR/checkpoint.pt, DIR/metrics.jsonl, DIR/samples.png, DIR/loss.png, DIR/quality.json and prints a
table of few-step quality (SW₂ and histogram KL to held-out data at 1/2/4/8 steps; for fm also 100 Euler steps; for a
distilled method also its teacher at 1 and 100 Euler steps). Bad input exits with status 2 and a message, before
anything is written. Under `torchrun --nproc-per-node W`, --batch is per process.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from argparse import Namespace
from pathlib import Path

import torch

from flowkern.train import checkpoint
from flowkern.train.evaluate import STEPS, draw, format_table, ode_nll, score

DEFAULTS = {"data": "checkerboard", "steps": 1500, "batch": 256, "lr": 2e-3, "hidden": 128, "depth": 3,
            "time_dim": 64, "warmup": 100, "lr_decay": "none", "ema": (0.99, 0.999), "eval_ema": 0.999, "seed": 0,
            "samples": 5000}


class CLIError(Exception):
    """Bad input: printed as ``flowkern: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# -- parsers ----------------------------------------------------------------------------------------------------------
def _common_train_options(p: argparse.ArgumentParser) -> None:
    from flowkern.data import DATASET_NAMES

    d = DEFAULTS
    p.add_argument("--data", choices=DATASET_NAMES, default=d["data"], help=f"dataset (default {d['data']})")
    p.add_argument("--steps", type=_positive_int, default=d["steps"], help=f"total steps (default {d['steps']})")
    p.add_argument("--batch", type=_positive_int, default=d["batch"], help="rows per process per step")
    p.add_argument("--lr", type=_positive_float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<method>-<data>)")
    p.add_argument("--teacher", type=Path, default=None, help="flow-matching checkpoint (pd, cd, ctm)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps")
    p.add_argument("--optimizer", choices=("adamw", "radam"), default="adamw")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear LR warm-up steps")
    p.add_argument("--lr-decay", choices=("none", "cosine"), default=d["lr_decay"],
                   help=f"after the warm-up: a constant LR or a cosine to 0 at the last step (default {d['lr_decay']})")
    p.add_argument("--grad-clip", type=_positive_float, default=1.0)
    p.add_argument("--ema", type=float, nargs="+", default=list(d["ema"]), help="EMA decays kept")
    p.add_argument("--eval-ema", type=float, default=d["eval_ema"], help="the EMA decay used to sample")
    p.add_argument("--hidden", type=_positive_int, default=d["hidden"], help="MLPFlowMap width")
    p.add_argument("--depth", type=_positive_int, default=d["depth"], help="MLPFlowMap residual blocks")
    p.add_argument("--dropout", type=_probability, default=0.0,
                   help="MLPFlowMap dropout inside each block (iCT's regulariser; ct, cd and ctm replay the grad "
                        "pass's masks in their target passes)")
    p.add_argument("--samples", type=_positive_int, default=d["samples"], help="samples for the quality table")
    p.add_argument("--log-every", type=_positive_int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: these small MLPs gain little from more, and spinning threads "
                        "on a busy machine cost up to 10x)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-nll", action="store_true", help="skip the ODE NLL (fm on 2-D data)")


def add_parsers(sub) -> None:
    """Add `train`, `sample` and `eval` to the `flowkern` sub-command parsers."""
    from flowkern.methods import METHODS, get_method

    train = sub.add_parser("train", help="train a method on embedded data", description=__doc__.splitlines()[0])
    methods = train.add_subparsers(dest="method", required=True, metavar="method",
                                   help=f"one of: {', '.join(METHODS)}")
    for name in METHODS:
        p = methods.add_parser(name)
        _common_train_options(p)
        try:
            cls = get_method(name)
        except ImportError:
            continue   # reported when the method is run
        cls.add_options(p.add_argument_group(f"{name} options"))

    sample = sub.add_parser("sample", help="draw samples from a trained checkpoint")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--out", type=Path, required=True, help="FILE.pt (tensor) or FILE.png (plot)")
    sample.add_argument("--steps", type=_positive_int, default=1)
    sample.add_argument("--n", type=_positive_int, default=2000)
    sample.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="few-step quality of a trained checkpoint")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--steps", type=_positive_int, nargs="+", default=list(STEPS))
    ev.add_argument("--samples", type=_positive_int, default=DEFAULTS["samples"])
    ev.add_argument("--nll", action="store_true", help="also the ODE NLL (methods with a velocity)")


# -- building models and methods from checkpoints -------------------------------------------------------------------
def _network(arch: dict) -> torch.nn.Module:
    from flowkern.nn import MLPFlowMap

    return MLPFlowMap(arch["dim"], hidden=arch["hidden"], depth=arch["depth"], time_dim=arch["time_dim"],
                      dropout=arch.get("dropout", 0.0))


def _method_class(name: str):
    from flowkern.methods import get_method

    try:
        return get_method(name)
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None


def _dataset(name: str):
    from flowkern.data import get_dataset

    try:
        return get_dataset(name)
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None


def _load(path: Path, method: str | None = None) -> dict:
    try:
        return checkpoint.load(path, method=method)
    except checkpoint.CheckpointError as err:
        raise CLIError(str(err)) from None


def restore(state: dict):
    """(method, eval_model) rebuilt from a training checkpoint; eval_model carries the eval EMA weights."""
    from flowkern.train.config import TrainConfig
    from flowkern.train.ema import EMA

    cls = _method_class(state["method"])
    extra = state["extra"]
    teacher = _network(extra["teacher_arch"]) if extra.get("teacher_arch") else None
    method = cls.from_options(_network(extra["arch"]), Namespace(**extra["options"]), teacher=teacher)
    method.load_state_dict(state["method_state"])
    config = TrainConfig.from_dict(state["config"])
    ema = EMA(method.model, config.ema_decays)
    ema.load_state_dict(state["ema"])
    return method, ema.averaged(config.eval_ema)


def _teacher(path: Path):
    """The frozen EMA network of a flow-matching checkpoint, and its architecture."""
    state = _load(path, method="fm")
    _, model = restore(state)
    return model, state["extra"]["arch"], state["extra"]["data"]


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
    if nll and hasattr(method, "velocity"):
        result["nll"] = ode_nll(method.velocity(model), reference)
        if dataset.has_density:
            result["data_nll"] = -dataset.log_prob(reference).mean().item()
    return result, {k: v[:4000] for k, v in drawn.items() if k in STEPS}, reference


def _print_quality(result: dict, steps) -> None:
    print(format_table(result["rows"], steps))
    if "nll" in result:
        exact = f" (exact NLL of the data: {result['data_nll']:.4f})" if "data_nll" in result else ""
        print(f"NLL via the PF-ODE (RK4, 64 steps, exact divergence): {result['nll']:.4f} nats{exact}")


def train(args) -> int:
    from flowkern.train import distributed, rng
    from flowkern.train.config import TrainConfig
    from flowkern.train.loop import Trainer
    from flowkern.train.plots import plot_loss, plot_samples

    torch.set_num_threads(args.threads)
    cls = _method_class(args.method)
    dataset = _dataset(args.data)
    out = args.out or Path("runs") / f"{args.method}-{args.data}"
    ckpt = out / "checkpoint.pt"
    state = None
    if args.resume:
        if not ckpt.is_file():
            raise CLIError(f"--resume: {str(ckpt)!r} does not exist")
        state = _load(ckpt, method=args.method)
        if state["extra"]["data"] != args.data:
            raise CLIError(f"--resume: the checkpoint was trained on {state['extra']['data']!r}, not {args.data!r}")
        if state["step"] >= args.steps:
            raise CLIError(f"--resume: the checkpoint is at step {state['step']}; pass --steps above it")
    elif ckpt.exists():
        raise CLIError(f"{str(ckpt)!r} already exists; pass --resume to continue it or choose another --out")
    needs = getattr(cls, "needs_teacher", False)
    if args.teacher is None and needs:
        raise CLIError(f"method {args.method!r} distils a teacher: pass --teacher PATH (a checkpoint of "
                       f"'flowkern train fm')")
    if args.teacher is not None and args.method == "fm":
        raise CLIError("flow matching trains from data: --teacher is not used by 'fm'")
    try:
        config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, optimizer=args.optimizer,
                             warmup=args.warmup, lr_decay=args.lr_decay, grad_clip=args.grad_clip,
                             ema_decays=tuple(args.ema),
                             eval_ema=args.eval_ema, log_every=args.log_every,
                             checkpoint_every=args.checkpoint_every, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    teacher = teacher_arch = None
    arch = {"dim": dataset.dim, "hidden": args.hidden, "depth": args.depth, "time_dim": DEFAULTS["time_dim"],
            "dropout": args.dropout}
    if args.teacher is not None:
        teacher, teacher_arch, teacher_data = _teacher(args.teacher)
        if teacher_data != args.data:
            raise CLIError(f"--teacher was trained on {teacher_data!r}, not {args.data!r}")
        if getattr(cls, "init_from_teacher", False):
            arch = dict(teacher_arch)
    if state is not None:
        arch = state["extra"]["arch"]
    rng.seed_all(args.seed)   # the initial weights (and a discriminator's) follow --seed too
    model = _network(arch)
    if teacher is not None and getattr(cls, "init_from_teacher", False):
        model.load_state_dict(teacher.state_dict())
    args.data_dim = math.prod(dataset.shape)   # for methods with a discriminator on samples (ctm --ctm-gan)
    data_std = f"{args.method}_sigma_data"
    if hasattr(args, data_std) and getattr(args, data_std) is None:   # EDM's σ_data, measured on the data
        setattr(args, data_std, dataset.data_std())
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    try:
        method = cls.from_options(model, Namespace(**options), teacher=teacher)
    except (TypeError, ValueError) as err:
        raise CLIError(f"{args.method}: {err}") from None
    extra = {"arch": arch, "teacher_arch": teacher_arch, "data": args.data, "options": options}
    trainer = Trainer(method, dataset.sample, config, out_dir=out, extra=extra, progress=not args.no_progress)
    if state is not None:
        trainer.load(state)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    if trainer.rank == 0:
        print(f"trained {args.method} on {args.data}: {config.steps} steps in {seconds:.1f} s "
              f"({trainer.skipped} skipped); run directory {out}")
        model = trainer.eval_model()
        nll = not args.no_nll and dataset.dim == 2
        result, drawn, reference = _quality(method, model, dataset, args.samples, teacher=teacher, nll=nll)
        plot_samples(drawn, reference[:4000], out / "samples.png", title=f"{args.method} on {args.data}")
        plot_loss(trainer.losses, out / "loss.png", title=f"{args.method} loss")
        (out / "quality.json").write_text(json.dumps(
            {"steps": trainer.step_count, "train_seconds": seconds,
             **{k: v for k, v in result.items() if k != "rows"},
             "rows": {label: scores for label, scores in result["rows"]}}, indent=1))
        _print_quality(result, (*STEPS, 100) if args.method == "fm" or teacher is not None else STEPS)
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
    state = _load(args.checkpoint)
    method, model = restore(state)
    dataset = _dataset(state["extra"]["data"])
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
    state = _load(args.checkpoint)
    method, model = restore(state)
    dataset = _dataset(state["extra"]["data"])
    reference = dataset.held_out(args.samples)
    steps = tuple(args.steps)
    result = {"rows": [(f"{method.name} (EMA)", score(draw(method.sample, model, dataset, steps, n=args.samples),
                                                      dataset, reference))]}
    if args.nll and hasattr(method, "velocity"):
        result["nll"] = ode_nll(method.velocity(model), reference)
        if dataset.has_density:
            result["data_nll"] = -dataset.log_prob(reference).mean().item()
    print(f"{args.checkpoint}: {method.name} on {state['extra']['data']}, step {state['step']}")
    _print_quality(result, steps)
    return 0


COMMANDS = {"train": train, "sample": sample, "eval": evaluate}
