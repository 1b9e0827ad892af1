"""Small helpers shared by the methods: frozen copies, EMA targets, repeating a dropout mask, option checks."""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from flowkern._validate import check_finite_scalar, check_int


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with requires_grad off (a teacher or EMA target copy, checkpointed as a registered submodule)."""
    out = copy.deepcopy(module)
    out.requires_grad_(False)
    return out


def update_ema(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← decay·θ⁻ + (1 − decay)·θ for the parameters; buffers are copied."""
    with torch.no_grad():
        for p_t, p_s in zip(target.parameters(), source.parameters()):
            p_t.lerp_(p_s.detach().to(p_t.dtype), 1 - decay)
        for b_t, b_s in zip(target.buffers(), source.buffers()):
            b_t.copy_(b_s)


@contextlib.contextmanager
def replay_rng(device: torch.device):
    """Run a block, then restore the RNG state it started from: the pass after the block draws the same random
    numbers (the same dropout mask) as the pass inside it. CPU generator always, plus `device`'s CUDA generator."""
    devices = [device] if device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for d, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, d)


def check_decay(name: str, value) -> float:
    value = check_finite_scalar(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def add_cli_options(parser, prefix: str, options: dict) -> None:
    """Add ``--{prefix}-{option}`` flags for `options` = {name: (type, default, help)} (the CLI's per-method flags;
    the prefix keeps several methods' flags apart in one parser)."""
    for opt, (kind, default, text) in options.items():
        flag = f"--{prefix}-{opt.replace('_', '-')}"
        if kind is bool:   # --flag / --no-flag
            parser.add_argument(flag, dest=f"{prefix}_{opt}", action=argparse.BooleanOptionalAction, default=default,
                                help=f"{text} (default {'on' if default else 'off'})")
            continue
        parser.add_argument(flag, dest=f"{prefix}_{opt}", type=kind, default=default, help=f"{text} (default {default})")


def cli_values(args, prefix: str, options: dict) -> dict:
    """The options' values from a parsed namespace (missing flags take their defaults)."""
    return {opt: getattr(args, f"{prefix}_{opt}", default) for opt, (_, default, _) in options.items()}
