"""Shared pieces of the command-line tests: tiny run flags and the fast-CPU fixture."""
from __future__ import annotations

import pytest
from helpers import one_thread, torch_backend

TINY = ["--steps", "6", "--batch", "32", "--hidden", "16", "--depth", "1", "--samples", "300", "--no-nll",
        "--no-progress", "--warmup", "2", "--log-every", "2"]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value of `flag` replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.fixture(autouse=True)
def fast_cli():
    """The torch backend and one thread (import it into a test module to apply it to every test there)."""
    with torch_backend(), one_thread():
        yield
