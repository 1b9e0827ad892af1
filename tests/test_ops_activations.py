"""gelu (exact, tanh) and silu against F.gelu / F.silu in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from flowkern import ops
from helpers import DTYPES, assert_close, check_against_plain, check_explicit, gradcheck_torch, randn
from conftest import TRITON_RUNS, backends_under_test

BACKENDS = backends_under_test()
ACTS = {
    "gelu": (lambda x: ops.gelu(x), lambda x, t: ops.gelu_jvp(x, t), F.gelu),
    "gelu_tanh": (lambda x: ops.gelu(x, approximate="tanh"), lambda x, t: ops.gelu_jvp(x, t, approximate="tanh"),
                  lambda x: F.gelu(x, approximate="tanh")),
    "silu": (ops.silu, ops.silu_jvp, F.silu),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_activation(backend, dtype, act):
    fused, explicit, plain = ACTS[act]
    gen = torch.Generator().manual_seed(0)
    x = randn(3, 5, 67, dtype=dtype, gen=gen, scale=3.0)  # 1005 elements: one partial block
    x_t = randn(3, 5, 67, dtype=dtype, gen=gen)
    check_against_plain(backend, fused, plain, [x], [x_t], dtype)
    check_explicit(backend, lambda p, t: explicit(p[0], t[0]), plain, [x], [x_t], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_activation_large_and_noncontiguous(backend, act):
    """Several blocks, a non-contiguous input and extreme values (saturation, no NaN)."""
    fused, _, plain = ACTS[act]
    gen = torch.Generator().manual_seed(1)
    x = randn(40, 61, gen=gen, scale=4.0).t()  # 2440 elements, transposed
    x[0, :4] = torch.tensor([-80.0, 80.0, -1e4, 1e4])
    x_t = randn(61, 40, gen=gen)
    y_ref, yt_ref = torch.func.jvp(plain, (x.double(),), (x_t.double(),))
    with flowkern.use_backend(backend):
        y, y_t = torch.func.jvp(fused, (x,), (x_t,))
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(y_t, yt_ref, torch.float32, "tangent")


@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck_float64(act):
    gradcheck_torch(ACTS[act][0], (torch.randn(3, 5),))


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
@pytest.mark.interpreter
@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 3000), act=st.sampled_from(list(ACTS)))
def test_activation_sizes_hypothesis(n, act):
    fused, explicit, plain = ACTS[act]
    gen = torch.Generator().manual_seed(n)
    x, x_t = randn(n, gen=gen, scale=2.0), randn(n, gen=gen)
    y_ref, yt_ref = torch.func.jvp(plain, (x.double(),), (x_t.double(),))
    with flowkern.use_backend("triton"):
        y, y_t = explicit(x, x_t)
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(y_t, yt_ref, torch.float32, "tangent")


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.gelu("x"), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.gelu(torch.ones(3, dtype=torch.int64)), TypeError, "x must have dtype"),
    (lambda: ops.gelu(torch.randn(3), approximate="erf"), ValueError, "approximate must be one of"),
    (lambda: ops.silu_jvp(torch.randn(3), torch.randn(4)), ValueError, "x_t must have the shape of x"),
    (lambda: ops.silu_jvp(torch.randn(3), torch.randn(3).half()), TypeError, "x_t has dtype"),
    (lambda: ops.gelu_jvp(torch.randn(3), None), TypeError, "x_t must be a torch.Tensor"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    with flowkern.use_backend(backend):
        assert ops.silu(torch.randn(0, 3)).shape == (0, 3)
