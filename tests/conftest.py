"""Test setup shared by every test.

* Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set here, before
  any kernel module is imported (Triton reads it when a kernel is decorated).
* `setenv` changes an environment variable flowkern reads and reloads `flowkern._config` (read once at import).
* Every floating tensor made by `torch.empty`/`torch.empty_like` is filled with NaN, so an output element a kernel
  forgets to write fails the test instead of passing on leftover memory.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flowkern._config import triton_interpreting  # noqa: E402
from flowkern._dispatch import triton_available  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON_RUNS = triton_available() and (HAS_CUDA or triton_interpreting())


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    return make


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    yield


@pytest.fixture
def setenv(monkeypatch):
    """setenv(name, value): change an environment variable flowkern reads, and `flowkern._config.reload()` it
    (flowkern reads its environment once); the old values are restored and re-read after the test."""
    from flowkern import _config

    def set_and_reload(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        _config.reload()

    yield set_and_reload
    monkeypatch.undo()
    _config.reload()


@pytest.fixture
def device():
    return DEVICE


def backends_under_test():
    """The backends every op is compared on here: the reference always, Triton where it runs (GPU or interpreter)."""
    params = [pytest.param("torch", id="torch")]
    if TRITON_RUNS:
        params.append(pytest.param("triton", id="triton", marks=pytest.mark.interpreter))
    return params


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
