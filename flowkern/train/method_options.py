"""A method's command-line flags and config keys, derived from its constructor (docs/adding-a-method.md).

Every keyword-only constructor parameter except `teacher` and the run values (`RUN_VALUES`, which the caller
measures on the run) is a hyperparameter: flag ``--{method}-{name-with-dashes}``, config key ``name`` in the
``[method]`` table. The annotation gives the parser:

    int, float, str        the value                 bool                  --x / --no-x
    Literal["a", "b"]      one of the choices         float | None, ...     a value or "none"
    tuple[float, ...]      one or more values (nargs="+")

The help text is the parameter's entry in the class docstring's ``Args:`` block (``name: text``, continuation
lines indented deeper; ``a, b: text`` documents both), followed by the constructor default.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable

from flowkern.methods.parameters import REQUIRED as _NO_DEFAULT
from flowkern.methods.parameters import method_parameters


@dataclasses.dataclass(frozen=True)
class Option:
    """One hyperparameter: its name, how a string becomes its value (`parse`), choices, nargs, default, help."""

    name: str
    parse: Callable[[str], object]
    kind: str                       # "value", "bool" or "tuple"
    default: object = _NO_DEFAULT
    choices: tuple | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def convert(self, value):
        """A config-file value (TOML: number, string, bool, list) checked and converted like a flag's."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind == "tuple":
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(self.parse(str(v)) for v in items)
        if isinstance(value, bool):
            raise ValueError(f"{self.name} must not be a bool, got {value!r}")
        return self.parse(str(value))


def _scalar_parser(tp, name: str) -> Callable[[str], object]:
    if tp is bool:
        raise TypeError(f"{name}: bool inside a union or tuple is not a supported option type")
    if tp in (int, float):
        def parse(text: str, tp=tp):
            try:
                return tp(text)
            except ValueError:
                kind = "an integer" if tp is int else "a number"
                raise argparse.ArgumentTypeError(f"{name}: expected {kind}, got {text!r}") from None
        return parse
    if tp is str:
        return str
    raise TypeError(f"{name}: unsupported option type {tp!r} (int, float, bool, str, Literal[...], "
                    f"int | None, float | None, tuple[int, ...], tuple[float, ...])")


def _option(name: str, tp, default, help_text: str) -> Option:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return Option(name, bool, "bool", default, help=help_text)
    if origin is typing.Literal:
        choices = tuple(args)
        if not all(isinstance(c, str) for c in choices):
            raise TypeError(f"{name}: Literal choices must be strings, got {choices}")

        def parse(text: str):
            if text not in choices:
                raise argparse.ArgumentTypeError(f"{name}: expected one of {', '.join(choices)}, got {text!r}")
            return text
        return Option(name, parse, "value", default, choices, help_text)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _scalar_parser(next(a for a in args if a is not type(None)), name)
        return Option(name, lambda text: None if text.lower() == "none" else inner(text), "value", default,
                      help=help_text)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Option(name, _scalar_parser(args[0], name), "tuple", default, help=help_text)
    return Option(name, _scalar_parser(tp, name), "value", default, help=help_text)


def run_value_names(cls) -> list[str]:
    """The run values (`flowkern.methods.RUN_VALUES`) the constructor of `cls` takes."""
    return [p.name for p in method_parameters(cls) if p.run_value]


def method_options(cls) -> dict[str, Option]:
    """{name: Option} for every hyperparameter of the Method subclass `cls` (constructor order)."""
    out = {}
    for p in method_parameters(cls):
        if p.run_value:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise TypeError(f"{cls.__name__}.__init__: parameter {p.name!r} has no type annotation")
        out[p.name] = _option(p.name, p.annotation, p.default, p.help)
    return out


def flag(method: str, name: str) -> str:
    return f"--{method}-{name.replace('_', '-')}"


def dest(method: str, name: str) -> str:
    return f"{method}__{name}"


def add_method_flags(parser, method: str, options: dict[str, Option]) -> None:
    """Add ``--{method}-{name}`` for each option (values stay absent from the namespace unless given)."""
    for o in options.values():
        default = "required" if o.required else ("none" if o.default is None else o.default)
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        text = f"{o.help} (default: {default})".strip()
        kw = dict(dest=dest(method, o.name), default=argparse.SUPPRESS, help=text)
        if o.kind == "bool":
            parser.add_argument(flag(method, o.name), action=argparse.BooleanOptionalAction, **kw)
        elif o.kind == "tuple":
            parser.add_argument(flag(method, o.name), type=o.parse, nargs="+", **kw)
        else:
            parser.add_argument(flag(method, o.name), type=o.parse, choices=o.choices,
                                metavar="{" + ",".join(o.choices) + "}" if o.choices else None, **kw)


def given_flags(args: argparse.Namespace, method: str) -> dict:
    """{name: value} of the method flags given on the command line."""
    prefix = f"{method}__"
    return {k[len(prefix):]: (tuple(v) if isinstance(v, list) else v)
            for k, v in vars(args).items() if k.startswith(prefix)}


def resolve(cls, values: dict, run_values: dict) -> dict:
    """The constructor keywords: each hyperparameter's default overridden by `values` (already converted), plus the
    run values the constructor takes (`values` may set one explicitly). ValueError naming an unknown key or a
    missing required hyperparameter."""
    options = method_options(cls)
    takes = run_value_names(cls)
    unknown = sorted(set(values) - set(options) - set(takes))
    if unknown:
        raise ValueError(f"method {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(options) or 'none'}")
    out = {n: o.default for n, o in options.items() if not o.required}
    out.update({n: run_values[n] for n in takes if n in run_values})
    out.update(values)
    missing = [n for n, o in options.items() if o.required and n not in out]
    if missing:
        raise ValueError(f"method {cls.name!r} needs {', '.join(flag(cls.name, n) for n in missing)}")
    return out
