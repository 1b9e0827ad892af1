"""Run descriptions as TOML files (docs/training.md): reading, writing, and the recipes shipped with the package.

A run file has two flat tables: ``[train]`` (the method's name, the dataset and the common options of
`flowkern train`, names with underscores) and ``[method]`` (the method's keyword arguments, by parameter name):

    [train]
    method = "ct"
    data = "8gaussians"
    steps = 15000
    lr_decay = "cosine"

    [method]
    ect_stages = 6

A recipe (``flowkern/train/recipes/<method>.toml``) is a run file with the train-level settings of a method's
tuned run (docs/results.md); its method-level settings are the constructor defaults.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

RECIPES = Path(__file__).with_name("recipes")
TABLES = ("train", "method")


class RunFileError(ValueError):
    """A run file that is missing, not TOML, or not shaped like a run description."""


def read(path) -> dict:
    """{"train": {...}, "method": {...}} from a run file (RunFileError naming the problem)."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"config {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"config {str(path)!r} is not valid TOML: {err}") from None
    return parse(raw, str(path))


def parse(raw: dict, where: str = "config") -> dict:
    """Check the shape of a decoded run file: only the flat tables [train] and [method]."""
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise RunFileError(f"{where}: unknown key {', '.join(map(repr, unknown))}; a run file has the tables "
                           f"[train] and [method]")
    out = {}
    for table in TABLES:
        values = raw.get(table, {})
        if not isinstance(values, dict):
            raise RunFileError(f"{where}: {table} must be a table ([{table}])")
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise RunFileError(f"{where}: [{table}] {nested[0]} is a table; run-file tables are flat")
        out[table] = dict(values)
    return out


def recipe(method: str) -> dict:
    """The shipped recipe of `method` ({"train": ..., "method": ...}; empty tables when it has none)."""
    path = RECIPES / f"{method}.toml"
    return read(path) if path.is_file() else {"train": {}, "method": {}}


# -- writing --------------------------------------------------------------------------------------------------------
def _value(v, key: str) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, key) for x in v) + "]"
    raise TypeError(f"{key}: a run file holds numbers, strings, bools and lists, got {type(v).__name__}")


def dumps(train: dict, method: dict) -> str:
    """The run file text: the flat tables [train] and [method] (None is written as "none", which the options
    read back as None)."""
    lines = []
    for table, values in (("train", train), ("method", method)):
        lines += [f"[{table}]"] + [f"{k} = {_value(v, k)}" for k, v in values.items()] + [""]
    return "\n".join(lines)


def write(path, train: dict, method: dict) -> Path:
    """The run file at `path`, written atomically (flowkern.train.atomic.WriteError when it cannot be)."""
    from flowkern.train.atomic import write_text_atomically

    return write_text_atomically(path, dumps(train, method), what="run config")
