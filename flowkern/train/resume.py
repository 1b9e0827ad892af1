"""`flowkern train --resume`: the same run, from the settings stored in its checkpoint.

The checkpoint's ``run`` table (every train-level setting) and ``method_kwargs`` are the run. A setting given on
the command line or in a ``--config`` file must agree with them, except the `RESUMABLE` ones (the step target, the
logging, checkpointing, evaluation and device settings), which may change; `resumed_run` returns the changes, which
the log prints. The method's run value ``total_steps`` follows ``--steps`` when the run had it from ``--steps``."""
from __future__ import annotations

from pathlib import Path

from flowkern.methods.parameters import stored_kwargs
from flowkern.train import method_options
from flowkern.train.run_options import RESUMABLE, TRAIN_OPTIONS, CLIError, Run, flag


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _shown(v) -> str:
    return "none" if v is None else " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _same_path(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def resumed_run(run: Run, state: dict) -> tuple[Run, list[str]]:
    """(the run to continue, ["steps: 1500 → 3000", ...]); CLIError for a setting that conflicts with the run."""
    stored = dict(state["run"])
    stored.pop("method", None)
    train = {k: stored.get(k, o.default) for k, o in TRAIN_OPTIONS.items()}
    train = {k: (tuple(v) if isinstance(v, list) else v) for k, v in train.items()}
    changes = []
    for key, value in run.explicit.items():
        before = train[key]
        same = _same_path(value, before) if key in ("out", "teacher") else _same(value, before)
        if same:
            continue
        if key == "data":
            raise CLIError(f"--resume: the checkpoint was trained on {before!r}, not {value!r}")
        if key not in RESUMABLE:
            may = ", ".join(flag(k) for k in RESUMABLE if k != "out")
            raise CLIError(f"--resume: {flag(key)} {_shown(value)} conflicts with the run's {_shown(before)} (a "
                           f"resumed run keeps its settings; only {may} may change; start a new run with another "
                           f"--out for other settings)")
        if key != "out":
            changes.append(f"{key}: {_shown(before)} → {_shown(value)}")
        train[key] = value
    train["out"] = str(run.out)
    kwargs = stored_kwargs(run.cls, state["method_kwargs"])
    for key, value in run.explicit_method.items():
        if key in kwargs and not _same(value, kwargs[key]):
            raise CLIError(f"--resume: {method_options.flag(run.method, key)} {_shown(value)} conflicts with the "
                           f"run's {_shown(kwargs[key])} (a resumed run keeps its method settings)")
    if "total_steps" in kwargs and kwargs["total_steps"] == stored.get("steps"):
        del kwargs["total_steps"]         # follows --steps
    values = {k: v for k, v in kwargs.items() if k in method_options.method_options(run.cls)
              or k in method_options.run_value_names(run.cls)}
    return Run(run.method, run.cls, train, values, resume=True, explicit=run.explicit,
               explicit_method=run.explicit_method), changes
