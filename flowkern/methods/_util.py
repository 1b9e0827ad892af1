"""Small helpers shared by the methods: frozen copies and argument checks."""
from __future__ import annotations

import copy
import typing

import torch

from flowkern._validate import check_finite_scalar, check_int

# how a method gets its network's JVP (flowkern.jvp): "one_pass", ONE forward with autograd on gives the output and
# its stop-gradient tangent; "two_pass", a no-grad JVP pass, then an ordinary grad pass (one forward more)
JVP_FORMS = typing.Literal["one_pass", "two_pass"]


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with requires_grad off (a teacher or EMA target copy, checkpointed as a registered submodule)."""
    out = copy.deepcopy(module)
    out.requires_grad_(False)
    return out


def whole_state_dict(module: torch.nn.Module) -> dict:
    """module.state_dict() with every sharded entry (a DTensor, under FSDP) gathered whole: loadable into an
    unsharded copy. Under FSDP a collective, called on every rank."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}


def check_decay(name: str, value) -> float:
    value = check_finite_scalar(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def check_probability(name: str, value) -> float:
    value = check_finite_scalar(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    """`value` is one of the strings of `choices` (a tuple, or a ``Literal[...]`` type)."""
    options = typing.get_args(choices) or tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value
