"""A method's constructor parameters, read from its signature and its docstring (the one description of each).

Every keyword-only parameter of a method's ``__init__`` other than ``teacher`` is either a *run value* (its name is
in `RUN_VALUES`: the caller supplies it from the run, e.g. the data's standard deviation) or a *hyperparameter*
(one default, the tuned recipe). Its help text is its entry in the class docstring's ``Args:`` block::

    Args:
        name: text,
            continuation lines indented deeper.
"""
from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass

RUN_VALUES = ("sigma_data", "total_steps", "data_dim")
REQUIRED = inspect.Parameter.empty  # the default of a parameter the caller must give
# parameters added after checkpoints were first written, with the value every run before them had (ct trained
# with independent noise before `coupling` existed): a checkpoint that lacks one rebuilds its method with it
EARLIER_VALUES = {"coupling": "independent"}


@dataclass(frozen=True)
class MethodParameter:
    """One keyword parameter: its name, resolved annotation, default (`REQUIRED` if none) and help text."""

    name: str
    annotation: object
    default: object
    help: str

    @property
    def run_value(self) -> bool:
        return self.name in RUN_VALUES

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def args_help(doc: str | None) -> dict[str, str]:
    """{name: text} from the ``Args:`` block of a docstring: ``name: text`` (``a, b: text`` documents both),
    continuation lines indented deeper and joined with single spaces."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        match = re.match(r"\s*([\w\s,]+?):\s*(.*)", line) if depth == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for n in names:
                out[n] = match.group(2).strip()
        elif names and depth > indent:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
        else:
            break
    return out


def method_parameters(cls: type) -> list[MethodParameter]:
    """The keyword-only parameters of ``cls.__init__`` except ``teacher``, in signature order."""
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__}")
    hints = typing.get_type_hints(cls.__init__)
    docs = args_help(cls.__doc__)
    return [MethodParameter(p.name, hints.get(p.name, p.annotation), p.default, docs.get(p.name, ""))
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "teacher"]


def stored_kwargs(cls: type, kwargs: dict) -> dict:
    """A checkpoint's method_kwargs for `cls`, completed with `EARLIER_VALUES` for the parameters it predates."""
    names = {p.name for p in method_parameters(cls)}
    return {**{k: v for k, v in EARLIER_VALUES.items() if k in names and k not in kwargs}, **kwargs}
