"""Library-internal paths that must not read device values back to the host inside a training step."""
from __future__ import annotations

import importlib

import pytest
import torch

import flowkern.flow_map as fm
from flowkern import use_backend

jump_module = importlib.import_module("flowkern.flow_map.jump")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, u = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.rand(4, generator=g)
    return x, u, t, t * torch.rand(4, generator=g)


def test_prevalidated_jump_checks_no_values(monkeypatch):
    """The internal entry (times drawn by the library itself) reads no values back: the public jump's time check
    (a host sync on CUDA) is never called, and the result is the same Φ, differentiable alike."""
    from flowkern import _validate

    x, u, t, s = _inputs()
    want = x + (s - t)[:, None] * u

    def no_value_reads(*args, **kwargs):
        raise AssertionError("a value check (host sync) in the prevalidated path")

    monkeypatch.setattr(_validate, "check_time_values", no_value_reads)
    with use_backend("torch"):
        with pytest.raises(AssertionError, match="value check"):
            fm.jump(x, u, t, s)                                                      # the public entry checks
        u_grad = u.clone().requires_grad_()
        got = jump_module.jump_prevalidated(x, u_grad, t.double(), s.double())     # cast to the time dtype
        torch.testing.assert_close(got, want)
        got.sum().backward()
        torch.testing.assert_close(u_grad.grad, (s - t)[:, None].expand(4, 3))
        logp, div = torch.randn(4), torch.randn(4)
        got, lp = jump_module.jump_prevalidated(x, u, t, s, logp=logp, div=div)
        torch.testing.assert_close(lp, logp + (s - t) * div)


def test_public_jump_still_checks_its_times():
    x, u, t, s = _inputs()
    with use_backend("torch"), pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fm.jump(x, u, t + 2.0, s)
