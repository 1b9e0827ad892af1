"""Two-time sinusoidal embedding against a plain float64 implementation; always float32 out."""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern import ops
from helpers import check_against_plain, check_explicit, gradcheck_torch, randn
from conftest import backends_under_test

BACKENDS = backends_under_test()


def plain_embedding(dim, mode, max_period=10000.0, time_scale=1.0):
    half = dim // 2

    def f(t, s):
        freqs = time_scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        second = t - s if mode == "t_delta" else s
        return torch.cat([g(tau[:, None] * freqs) for tau in (t, second) for g in (torch.cos, torch.sin)], dim=-1)

    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["ts", "t_delta"])
@pytest.mark.parametrize("dim,time_scale", [(18, 1.0), (10, 1000.0)])
def test_time_embedding(backend, time_dtype, mode, dim, time_scale):
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(7, generator=gen).to(time_dtype)
    s = torch.rand(7, generator=gen).to(time_dtype)
    tans = [randn(7, dtype=time_dtype, gen=gen), randn(7, dtype=time_dtype, gen=gen)]
    plain = plain_embedding(dim, mode, time_scale=time_scale)
    # float32 maths: f·τ carries a relative error ~1e-7·time_scale, the tangent scales with f ≤ time_scale
    tol = 3 * time_scale
    check_against_plain(backend, lambda t, s: ops.time_embedding(t, s, dim, mode=mode, time_scale=time_scale),
                        plain, [t, s], tans, torch.float32, scale_tol=tol, out_dtype=torch.float32)
    check_explicit(backend, lambda p, q: ops.time_embedding_jvp(p[0], p[1], dim, q[0], q[1], mode=mode,
                                                                time_scale=time_scale),
                   plain, [t, s], tans, torch.float32, scale_tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_under_autocast(backend):
    t, s = torch.rand(5), torch.rand(5)
    with flowkern.use_backend(backend):
        expected = ops.time_embedding(t, s, 16, time_scale=1000.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e, e_t = torch.func.jvp(lambda t: ops.time_embedding(t, s, 16, time_scale=1000.0), (t,),
                                    (torch.ones(5),))
    assert e.dtype == torch.float32 and e_t.dtype == torch.float32
    torch.testing.assert_close(e, expected)


def test_gradcheck_float64():
    for mode in ("ts", "t_delta"):
        gradcheck_torch(lambda t, s: ops.time_embedding(t, s, 8, mode=mode, time_scale=3.0),
                        (torch.rand(3), torch.rand(3)))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.time_embedding(torch.rand(3, 1), torch.rand(3, 1), 8), ValueError, "t must have 1 dimensions"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(4), 8), ValueError, "s must have the shape of t"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 7), ValueError, "dim must be even"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 8.0), TypeError, "dim must be an int"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 0), ValueError, "dim must be >= 2"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 8, mode="st"), ValueError, "mode must be"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 8, max_period=0.0), ValueError,
     "max_period must be > 0"),
    (lambda: ops.time_embedding(torch.rand(3), torch.rand(3), 8, time_scale=float("inf")), ValueError,
     "time_scale must be finite"),
    (lambda: ops.time_embedding(torch.arange(3), torch.arange(3), 8), TypeError, "t must have dtype"),
    (lambda: ops.time_embedding(torch.rand(0), torch.rand(0), 8), ValueError, "at least one time"),
    (lambda: ops.time_embedding_jvp(torch.rand(3), torch.rand(3), 8, torch.rand(2)), ValueError,
     "t_t must have the shape of t"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
