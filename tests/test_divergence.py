"""flowkern.divergence: exact traces, Hutchinson statistics, determinism, bad inputs, on every backend here."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, TRITON_RUNS, backends_under_test

from flowkern._config import use_backend
from flowkern.divergence import divergence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _linear(dim, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return a, (lambda x: x @ a.T)


def _theory_variance(a: torch.Tensor, distribution: str) -> float:
    s = (a + a.T).double() / 2
    if distribution == "gaussian":
        return float(2 * (s ** 2).sum())
    return float(2 * ((s ** 2).sum() - (s.diagonal() ** 2).sum()))


def _mlp(dim, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 24), torch.nn.SiLU(), torch.nn.Linear(24, 24), torch.nn.Tanh(),
                              torch.nn.Linear(24, dim)).to(dtype).to(DEVICE)
    for p in net.parameters():
        p.requires_grad_(False)
    return lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], 1))


@pytest.mark.parametrize("backend", backends_under_test())
def test_exact_method_is_the_trace(backend):
    dtype = _dtype(backend)
    a, fn = _linear(7, dtype=dtype)
    x = torch.randn(3, 7, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        div = divergence(fn, x, method="exact", chunk_size=3)
    torch.testing.assert_close(div.double(), torch.trace(a.double()).expand(3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batching", ["vmap", "stack"])
def test_exact_matches_jacrev_trace_on_an_mlp(batching):
    v = _mlp(5)
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    t = torch.rand(4, dtype=torch.float64, device=DEVICE)
    ref = torch.stack([torch.trace(torch.func.jacrev(lambda xi, i=i: v(xi[None], t[i:i + 1])[0])(x[i])) for i in range(4)])
    div, out = divergence(v, x, t, method="exact", return_output=True, batching=batching)
    torch.testing.assert_close(div, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, v(x, t), rtol=0, atol=0)


def test_multidimensional_samples():
    """x of shape [B, C, H, W]: the trace is over each flattened sample."""
    a, fn = _linear(12)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=DEVICE)
    div = divergence(lambda y: fn(y.flatten(1)).view_as(y), x, method="exact")
    torch.testing.assert_close(div, torch.trace(a).expand(2))
    est = divergence(lambda y: fn(y.flatten(1)).view_as(y), x, probes=3, seed=1)
    assert est.shape == (2,) and torch.isfinite(est).all()


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("probes", [1, 4])
def test_hutchinson_unbiased_with_the_theoretical_variance(backend, distribution, probes):
    """n independent estimates (one per sample: the probes are keyed by the sample index) of tr A for v = A x.

    Mean within 5 standard errors of tr A; sample variance within 5 standard errors (estimated from the fourth
    central moment, SE(s²) ≈ √(Var((X − X̄)²)/n)) of the theory σ²/K: 2‖S‖²_F (gaussian), 2Σ_{i≠j}S_ij² (rademacher).
    """
    dim, n = 6, 3000
    dtype = _dtype(backend)
    a, fn = _linear(dim, seed=3, dtype=dtype)
    x = torch.randn(n, dim, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        est = divergence(fn, x, probes=probes, distribution=distribution, seed=11).double().cpu()
    sigma2 = _theory_variance(a.cpu(), distribution) / probes
    mean, var = est.mean(), est.var()
    assert abs(mean - torch.trace(a.double()).cpu()) < 5 * math.sqrt(sigma2 / n)
    se_var = float(((est - mean) ** 2).var().sqrt() / math.sqrt(n))
    assert se_var < 0.2 * sigma2  # the test has power
    assert abs(float(var) - sigma2) < 5 * se_var, (float(var), sigma2, se_var)


@pytest.mark.parametrize("backend", backends_under_test())
def test_rademacher_is_exact_for_diagonal_jacobians(backend):
    """Rademacher variance 2Σ_{i≠j}S_ij² vanishes for diagonal J: every single-probe estimate is the trace."""
    dtype = _dtype(backend)
    d = torch.linspace(-1, 2, 9, dtype=dtype, device=DEVICE)
    x = torch.randn(5, 9, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        est = divergence(lambda y: torch.sin(y) * d, x, seed=4)
    torch.testing.assert_close(est.double(), (torch.cos(x) * d).sum(1).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_deterministic_for_a_seed(backend, distribution):
    dtype = _dtype(backend)
    _, fn = _linear(5, dtype=dtype)
    x = torch.randn(6, 5, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        first = divergence(fn, x, probes=2, distribution=distribution, seed=123)
        again = divergence(fn, x, probes=2, distribution=distribution, seed=123)
        other = divergence(fn, x, probes=2, distribution=distribution, seed=124)
        torch.manual_seed(0)
        drawn = divergence(fn, x, probes=2, distribution=distribution)
        torch.manual_seed(0)
        drawn_again = divergence(fn, x, probes=2, distribution=distribution)
    assert torch.equal(first, again) and torch.equal(drawn, drawn_again)
    assert not torch.equal(first, other)
    assert len(set(first.tolist())) > 1  # samples draw different probes


@pytest.mark.parametrize("backend", backends_under_test())
def test_vmap_and_stack_batching_agree(backend):
    dtype = _dtype(backend)
    v = _mlp(4, dtype=dtype)
    x = torch.randn(3, 4, dtype=dtype, device=DEVICE)
    t = torch.rand(3, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        d1, o1 = divergence(v, x, t, probes=3, seed=7, batching="vmap", return_output=True)
        d2, o2 = divergence(v, x, t, probes=3, seed=7, batching="stack", return_output=True)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o1, v(x, t))


@pytest.mark.parametrize("backend", backends_under_test())
def test_hutchpp_exact_when_the_sketch_spans_the_space(backend):
    dtype = _dtype(backend)
    a, fn = _linear(4, dtype=dtype)
    x = torch.randn(3, 4, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        est = divergence(fn, x, method="hutch++", probes=12, seed=0)
    torch.testing.assert_close(est.double(), torch.trace(a.double()).expand(3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchpp_unbiased_and_better_than_hutchinson_on_a_low_rank_field(distribution):
    """J = low-rank + small: Hutch++ with K = 6 beats Hutchinson with K = 6 and stays unbiased."""
    dim, n = 8, 2000
    g = torch.Generator().manual_seed(5)
    u = torch.randn(dim, 2, generator=g, dtype=torch.float64)
    a = (u @ u.T * 3 + 0.05 * torch.randn(dim, dim, generator=g, dtype=torch.float64)).to(DEVICE)
    x = torch.randn(n, dim, dtype=torch.float64, device=DEVICE)
    pp = divergence(lambda y: y @ a.T, x, method="hutch++", probes=6, distribution=distribution, seed=1)
    hu = divergence(lambda y: y @ a.T, x, probes=6, distribution=distribution, seed=1)
    assert abs(pp.mean() - torch.trace(a)) < 5 * pp.std() / math.sqrt(n)
    assert pp.var() < 0.5 * hu.var()


@pytest.mark.parametrize("backend", backends_under_test())
def test_gradient_wrt_parameters_regenerates_the_probes(backend):
    """d/dA of Σ_b z_bᵀ A z_b = Σ_b z_b z_bᵀ; on triton the probes are regenerated from the seed in backward."""
    dtype = _dtype(backend)
    dim, batch = 5, 4
    a = torch.randn(dim, dim, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(batch, dim, dtype=dtype, device=DEVICE)
    with use_backend(backend):
        divergence(lambda y: y @ a.T, x, seed=9).sum().backward()
        from flowkern.divergence import probes as _probes
        z = _probes.generate(backend, 1, batch, dim, seed=9, stream=0, distribution="rademacher", dtype=dtype,
                             device=DEVICE)[0]
    torch.testing.assert_close(a.grad, z.T @ z, rtol=1e-5, atol=1e-5)


def test_works_through_flowkern_attention():
    """A fn with a custom autograd.Function (no vmap rule) falls back to stacking the probes along the batch."""
    from flowkern import attention
    from flowkern.testing import math_attention

    torch.manual_seed(0)
    w = torch.randn(3, 8, 8, dtype=torch.float64, device=DEVICE) * 0.3

    def make(attn):
        def fn(x):  # x [B, N, 8]
            q, k, v = (x @ w[i] for i in range(3))
            return attn(q[:, None], k[:, None], v[:, None])[:, 0]
        return fn

    fn, ref_fn = make(attention), make(math_attention)
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=DEVICE)
    ref = torch.stack([torch.func.jacrev(lambda xi: ref_fn(xi[None])[0])(x[i]).reshape(24, 24).trace()
                       for i in range(2)])
    torch.testing.assert_close(divergence(fn, x, method="exact"), ref)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "nope"}, ValueError, "method"),
    ({"method": 3}, TypeError, "method"),
    ({"distribution": "uniform"}, ValueError, "distribution"),
    ({"probes": 0}, ValueError, "probes"),
    ({"probes": 2.0}, TypeError, "probes"),
    ({"method": "hutch++", "probes": 2}, ValueError, "probes"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 2 ** 63}, ValueError, "seed"),
    ({"batching": "loop"}, ValueError, "batching"),
    ({"return_output": 1}, TypeError, "return_output"),
])
def test_bad_options_raise(kwargs, error, match):
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(error, match=match):
        divergence(lambda y: y * 2, x, **kwargs)


@pytest.mark.parametrize("batching", ["auto", "vmap", "stack"])
def test_wrong_output_shape_raises(batching):
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape of x"):
        divergence(lambda y: y[:, :2], x, batching=batching)
    with pytest.raises(ValueError, match="shape of x"):
        divergence(lambda y: y.sum(1), x, method="exact", batching=batching)


def test_bad_fn_and_x_raise():
    with pytest.raises(TypeError, match="callable"):
        divergence(3, torch.randn(2, 3))
    with pytest.raises(TypeError, match="x"):
        divergence(lambda y: y, [1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        divergence(lambda y: y, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x"):
        divergence(lambda y: y, torch.ones(0, 3))


def test_cuda_backend_by_name_on_cpu_raises_clearly():
    x = torch.randn(2, 3)
    if DEVICE.type == "cuda":
        pytest.skip("CPU-only check")
    with use_backend("cuda"), pytest.raises(ValueError, match="cuda"):
        divergence(lambda y: y, x)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_extension_matches_triton(distribution, dtype):
    """Same Philox map: identical Rademacher probes, Gaussian probes to float32 rounding; same reductions."""
    from flowkern import _cuda_ext
    from flowkern.divergence import probes as _probes

    reason = _cuda_ext.cannot_serve(DEVICE, dtype)
    if reason is not None:
        pytest.skip(reason)
    shape = (3, 5, 1027)
    p_cuda = _probes.generate("cuda", *shape, seed=5, stream=1, distribution=distribution, dtype=dtype, device=DEVICE)
    p_triton = _probes.generate("triton", *shape, seed=5, stream=1, distribution=distribution, dtype=dtype,
                                device=DEVICE)
    if distribution == "rademacher":
        assert torch.equal(p_cuda, p_triton)
    else:
        torch.testing.assert_close(p_cuda.float(), p_triton.float(), rtol=1e-5, atol=1e-5)
    jz = torch.randn(shape, device=DEVICE, dtype=dtype)
    r_cuda = _probes.LAUNCHERS["cuda"].probe_reduce(jz, 5, 1, _probes.DISTRIBUTIONS[distribution])[0]
    r_triton = _probes.LAUNCHERS["triton"].probe_reduce(jz, 5, 1, _probes.DISTRIBUTIONS[distribution])[0]
    torch.testing.assert_close(r_cuda, r_triton, rtol=1e-4, atol=1e-3)
    _, fn = _linear(7, dtype=torch.float32)
    x = torch.randn(64, 7, device=DEVICE)
    with use_backend("cuda"):
        d_cuda = divergence(fn, x, probes=4, distribution=distribution, seed=3)
    with use_backend("triton"):
        d_triton = divergence(fn, x, probes=4, distribution=distribution, seed=3)
    torch.testing.assert_close(d_cuda, d_triton, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in the interpreter here")
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_backends_are_statistically_identical(distribution):
    """torch (Generator probes) vs triton (Philox probes): two-sample z-tests on the mean and on the variance."""
    dim, n = 5, 3000
    _, fn = _linear(dim, seed=8, dtype=torch.float32)
    x = torch.randn(n, dim, device=DEVICE)
    est = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            est[backend] = divergence(fn, x, distribution=distribution, seed=21).double().cpu()
    e1, e2 = est["torch"], est["triton"]
    assert not torch.equal(e1, e2)  # different generators ...
    assert abs(e1.mean() - e2.mean()) < 5 * math.sqrt((e1.var() + e2.var()) / n)  # ... same distribution
    se = math.sqrt((((e1 - e1.mean()) ** 2).var() + ((e2 - e2.mean()) ** 2).var()) / n)
    assert abs(e1.var() - e2.var()) < 5 * se
