"""flowkern.flow_map.evaluate / sample / sample_many / semigroup_target on Gaussian data, where the flow map, the
divergence and every log-density are known in closed form (flowkern.testing.GaussianFlowMap)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern.flow_map as fm
from flowkern import use_backend
from conftest import DEVICE, TRITON_RUNS, backends_under_test

DIM = 5
MU = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3])
SIGMA = 0.4


def gaussian(joint=False):
    return fm.GaussianFlowMap(MU.to(DEVICE), SIGMA, joint=joint)


def noise(batch=7, seed=0, dtype=torch.float32):
    return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


class Counted:
    """Wraps a model; records the rows of every call."""

    def __init__(self, model):
        self.model = model
        self.rows = []

    def __call__(self, x, t, s):
        self.rows.append(x.shape[0])
        assert t.dtype == torch.float32 and s.dtype == torch.float32 and t.shape == s.shape == (x.shape[0],)
        return self.model(x, t, s)


class MLP(torch.nn.Module):
    """A small (x, t, s) -> u network (a stand-in for flowkern.nn)."""

    def __init__(self, dim=DIM, hidden=32, joint=False):
        super().__init__()
        self.joint = joint
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim + 1))

    def forward(self, x, t, s):
        out = self.net(torch.cat([x, t[:, None].to(x.dtype), s[:, None].to(x.dtype)], dim=1))
        return (out[:, :-1], out[:, -1]) if self.joint else out[:, :-1]


class RowwiseMLP(MLP):
    """The same MLP with each Linear as an elementwise product and a sum over inputs: a row's result does not depend
    on the batch it sits in. (A GEMM library may pick batch-size dependent kernels: torch's CPU Linear does, so a
    GEMM model's rows can differ in the last bits between a batched call and separate calls.)"""

    def forward(self, x, t, s):
        h = torch.cat([x, t[:, None].to(x.dtype), s[:, None].to(x.dtype)], dim=1)
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                h = (h[:, :, None] * layer.weight.t()[None]).sum(1) + layer.bias
            else:
                h = layer(h)
        return (h[:, :-1], h[:, -1]) if self.joint else h[:, :-1]


# ------------------------------------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("backend", backends_under_test())
def test_evaluate_reproduces_exact_flow_map(backend):
    g = gaussian()
    x = noise(6)
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(6, 4, generator=gen).to(DEVICE)
    s = torch.rand(6, 4, generator=gen).to(DEVICE)
    s[:, 0] = t[:, 0]  # t = s: Φ = x
    model = Counted(g)
    with use_backend(backend):
        phi, u = fm.evaluate(model, x, t, s, return_u=True)
    assert model.rows == [24] and phi.shape == (6, 4, DIM) and u.shape == (6, 4, DIM)
    want = g.phi(x.repeat_interleave(4, 0), t.reshape(-1), s.reshape(-1)).reshape(6, 4, DIM)
    torch.testing.assert_close(phi.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(phi[:, 0], x)


def test_evaluate_chunks_to_max_batch_and_differentiates():
    model = Counted(MLP())
    x = noise(5).requires_grad_()
    t = torch.rand(5, 3, generator=torch.Generator().manual_seed(2))
    s = t * 0.5
    with use_backend("torch"):
        whole = fm.evaluate(model, x, t, s)
        chunked = fm.evaluate(model, x, t, s, max_batch=4)
    assert model.rows == [15, 4, 4, 4, 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(chunked.square().sum(), x)
    xr = x.detach().repeat_interleave(3, 0).requires_grad_()
    ref = xr + (s - t).reshape(-1, 1) * model.model(xr, t.reshape(-1), s.reshape(-1))
    (gr,) = torch.autograd.grad(ref.square().sum(), xr)
    torch.testing.assert_close(gx, gr.reshape(5, 3, DIM).sum(1), rtol=1e-5, atol=1e-5)


def test_evaluate_joint_log_density_is_exact():
    g = gaussian(joint=True)
    x = noise(4, seed=3).double()
    t = torch.tensor([[1.0, 0.7], [0.5, 0.5], [0.2, 0.9], [0.9, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.1], [0.1, 0.5], [0.8, 0.3], [0.4, 1.0]], dtype=torch.float64)
    logp_t = g.log_prob(x.repeat_interleave(2, 0), t.reshape(-1)).reshape(4, 2)
    phi, lp = fm.evaluate(g, x, t, s, logp=logp_t[:, 0])
    # log p_s(Φ(x, t, s)) = log p_t(x) + (s − t)·D
    want = g.log_prob(phi.reshape(-1, DIM), s.reshape(-1)).reshape(4, 2) - logp_t + logp_t[:, :1]
    torch.testing.assert_close(lp, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.booleans()), min_size=1, max_size=3),
       batch=st.integers(1, 3))
def test_hypothesis_time_pairs(pairs, batch):
    """Any time pairs, t = s, s > t (away from data: "backwards" to noise) and K = 1 included."""
    g = gaussian(joint=True)
    t = torch.tensor([p[0] for p in pairs], dtype=torch.float64).repeat(batch, 1)
    s = torch.tensor([p[0] if p[2] else p[1] for p in pairs], dtype=torch.float64).repeat(batch, 1)
    x = noise(batch, seed=len(pairs)).double()
    phi, lp = fm.evaluate(g, x, t, s)
    k = t.shape[1]
    want = g.phi(x.repeat_interleave(k, 0), t.reshape(-1), s.reshape(-1)).reshape(batch, k, DIM)
    torch.testing.assert_close(phi, want, rtol=1e-12, atol=1e-12)
    dlogp = -DIM * torch.log(g.scale(s) / g.scale(t))  # (s − t)·D
    torch.testing.assert_close(lp, dlogp, rtol=1e-9, atol=1e-12)
    # the semigroup holds through any r, here r = the first pair's s
    two, direct = fm.semigroup_target(g, x, t[:, 0], s[:, 0], s[:, -1])
    torch.testing.assert_close(two[0], direct[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(two[1], direct[1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_sample_reproduces_exact_flow_map_and_likelihood(backend, steps):
    g = gaussian(joint=True)
    z = noise(9, seed=steps)
    model = Counted(g)
    with use_backend(backend):
        x0, logp0 = fm.sample(model, z, steps=steps, likelihood=True)
    assert model.rows == [9] * steps
    ones, zeros = torch.ones(9, device=DEVICE), torch.zeros(9, device=DEVICE)
    torch.testing.assert_close(x0.double(), g.phi(z, ones, zeros), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp0.double(), g.log_prob(x0.double(), 0.0), rtol=1e-5, atol=1e-4)
    # the same without the likelihood, from a plain (u) model
    with use_backend(backend):
        x0_plain = fm.sample(gaussian(), z, steps=steps)
    torch.testing.assert_close(x0_plain, x0, rtol=1e-6, atol=1e-6)


def test_sample_custom_and_per_sample_schedules():
    g = gaussian()
    z = noise(4, seed=5)
    sched = torch.tensor([1.0, 0.9, 0.4, 0.05, 0.0])
    per_sample = torch.stack([sched, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), sched, sched])
    a = fm.sample(g, z, schedule=sched)
    b = fm.sample(g, z, schedule=per_sample)
    want = g.phi(z, torch.ones(4), torch.zeros(4)).float()
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-5)
    # a schedule that stops early lands on the exact marginal map to its last time
    part = fm.sample(g, z, schedule=torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(part.double(), g.phi(z, torch.ones(4), torch.full((4,), 0.25)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "gaussian_joint", "mlp", "mlp_joint"])
def test_sample_many_equals_separate_samples_bit_for_bit(kind):
    """Same per-row arithmetic: the same float32 times, the same multiply-then-add jump per element, whatever the
    row's position in the batched call. Bit for bit whenever the model's rows are batch-invariant."""
    torch.manual_seed(0)
    model = {"gaussian": gaussian(), "gaussian_joint": gaussian(joint=True),
             "mlp": RowwiseMLP(), "mlp_joint": RowwiseMLP(joint=True)}[kind]
    joint = kind.endswith("joint")
    z = noise(11, seed=6)
    counted = Counted(model)
    with use_backend("torch"), torch.no_grad():
        many = fm.sample_many(counted, z, steps=(1, 2, 4, 8), likelihood=joint)
        assert counted.rows == [44, 33, 22, 22, 11, 11, 11, 11]  # 8 rounds, the 15 calls' rows
        counted.rows.clear()
        separate = [fm.sample(counted, z, steps=n, likelihood=joint) for n in (1, 2, 4, 8)]
        assert len(counted.rows) == 15
    for got, want in zip(many, separate):
        got, want = (got, want) if joint else ((got,), (want,))
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_sample_many_with_a_gemm_model_agrees_to_gemm_rounding():
    torch.manual_seed(1)
    model = MLP(joint=True)
    z = noise(11, seed=6)
    with torch.no_grad():
        many = fm.sample_many(model, z, steps=(1, 2, 4, 8), likelihood=True)
        for (a, la), n in zip(many, (1, 2, 4, 8)):
            b, lb = fm.sample(model, z, steps=n, likelihood=True)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_sample_many_orders_results_like_steps_and_accepts_schedules():
    g = gaussian(joint=True)
    z = noise(3, seed=7)
    a = fm.sample_many(g, z, steps=(4, 1, 2))
    b = [fm.sample(g, z, steps=n) for n in (4, 1, 2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    scheds = [torch.tensor([1.0, 0.3, 0.0]), torch.tensor([1.0, 0.0])]
    c = fm.sample_many(g, z, schedules=scheds)
    assert all(torch.equal(p, fm.sample(g, z, schedule=sc)) for p, sc in zip(c, scheds))


def test_sample_many_differentiates_through_the_model():
    model = MLP()
    z = noise(4, seed=8)
    with use_backend("torch"):
        many = fm.sample_many(model, z, steps=(1, 2))
        loss_many = sum(x.square().sum() for x in many)
        g_many = torch.autograd.grad(loss_many, list(model.parameters()))
        loss_sep = sum(fm.sample(model, z, steps=n).square().sum() for n in (1, 2))
        g_sep = torch.autograd.grad(loss_sep, list(model.parameters()))
    for a, b in zip(g_many, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
def test_sample_many_on_triton_matches_torch():
    g = gaussian(joint=True)
    z = noise(5, seed=9)
    with use_backend("torch"):
        ref = fm.sample_many(g, z, steps=(1, 2, 4), likelihood=True)
    with use_backend("triton"):
        got = fm.sample_many(g, z, steps=(1, 2, 4), likelihood=True)
    for (a, la), (b, lb) in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-5)


def test_sample_half_precision_noise_keeps_float32_times_and_logp():
    g = gaussian(joint=True)
    z = noise(6, seed=10, dtype=torch.bfloat16)
    x0, lp = fm.sample(Counted(g), z, steps=2, likelihood=True)
    assert x0.dtype == torch.bfloat16 and lp.dtype == torch.float32
    want = g.phi(z, torch.ones(6), torch.zeros(6))
    torch.testing.assert_close(x0.double(), want, rtol=2e-2, atol=3e-2)


def test_standard_normal_logp():
    z = noise(3)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(fm.standard_normal_logp(z), want)


# ------------------------------------------------------------------------------------------------ semigroup


@pytest.mark.parametrize("backend", backends_under_test())
def test_semigroup_target_exact_and_batched(backend):
    g = gaussian()
    x = noise(5, seed=11)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.0], device=DEVICE)
    s = torch.tensor([0.0, 0.1, 0.5, 0.8, 0.6], device=DEVICE)
    r = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.1], device=DEVICE)
    model = Counted(g)
    with use_backend(backend):
        two, direct = fm.semigroup_target(model, x, t, r, s)
    assert model.rows == [10, 5]  # u(x, t, r) and u(x, t, s) together, then u(·, r, s)
    want = g.phi(x, t, s)
    torch.testing.assert_close(direct.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.double(), want, rtol=1e-5, atol=1e-5)


def test_semigroup_two_half_steps_is_the_shortcut_target():
    model = Counted(MLP())
    x = noise(4, seed=12)
    t, s = torch.full((4,), 0.75), torch.full((4,), 0.25)
    with torch.no_grad():
        two, direct = fm.semigroup_target(model, x, t, s=s)  # r = (t + s)/2
        mid = x + (0.5 - 0.75) * model.model(x, t, torch.full((4,), 0.5))
        want_two = mid + (0.25 - 0.5) * model.model(mid, torch.full((4,), 0.5), s)
        want_direct = x + (0.25 - 0.75) * model.model(x, t, s)
    assert model.rows == [8, 4]
    torch.testing.assert_close(two, want_two, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direct, want_direct, rtol=1e-6, atol=1e-6)


def test_semigroup_joint_log_density():
    g = gaussian(joint=True)
    x = noise(3, seed=13).double()
    lp_x = g.log_prob(x, 0.9)
    (two, lp_two), (direct, lp_direct) = fm.semigroup_target(g, x, 0.9, 0.4, 0.1, logp=lp_x)
    want = g.log_prob(direct, 0.1)
    torch.testing.assert_close(lp_direct, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp_two, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(two, direct, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ validation


def test_validation_errors():
    g = gaussian()
    z = noise(3)
    with pytest.raises(ValueError, match="exactly one of steps"):
        fm.sample(g, z)
    with pytest.raises(ValueError, match="exactly one of steps"):
        fm.sample(g, z, steps=2, schedule=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fm.sample(g, z, steps=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fm.sample(g, z, schedule=torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"schedule must lie in \[0, 1\]"):
        fm.sample(g, z, schedule=torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match=r"schedule must have shape \[N \+ 1\]"):
        fm.sample(g, z, schedule=torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"likelihood=True needs a joint model returning a pair \(u, D\)"):
        fm.sample(g, z, steps=1, likelihood=True)
    with pytest.raises(ValueError, match="only used with likelihood=True"):
        fm.sample(g, z, steps=1, logp=torch.zeros(3))
    with pytest.raises(TypeError, match="steps must be a non-empty sequence"):
        fm.sample_many(g, z, steps=4)
    with pytest.raises(ValueError, match=r"steps\[1\] must be >= 1"):
        fm.sample_many(g, z, steps=(1, 0))
    with pytest.raises(ValueError, match="not both"):
        fm.sample_many(g, z, steps=(1,), schedules=[torch.tensor([1.0, 0.0])])
    with pytest.raises(TypeError, match="model must be callable"):
        fm.sample(None, z, steps=1)
    with pytest.raises(ValueError, match="model must return u shaped like its input"):
        fm.sample(lambda x, t, s: x[:, :2], z, steps=1)
    with pytest.raises(ValueError, match=r"model's D .* must have shape \[R\]"):
        fm.sample(lambda x, t, s: (x, x), z, steps=1, likelihood=True)
    with pytest.raises(ValueError, match=r"t must have shape \[B, K\]"):
        fm.evaluate(g, z, torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="t must have 2 dimensions"):
        fm.evaluate(g, z, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="t and s must have one shape"):
        fm.evaluate(g, z, torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        fm.evaluate(g, z, torch.zeros(3, 1), torch.full((3, 1), 2.0))
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        fm.evaluate(g, z, torch.zeros(3, 1), torch.zeros(3, 1), max_batch=0)
    with pytest.raises(ValueError, match="r must be finite"):
        fm.semigroup_target(g, z, 1.0, math.inf, 0.0)
    with pytest.raises(ValueError, match=r"r must lie in \[0, 1\]"):
        fm.semigroup_target(g, z, 1.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="logp was given but the model returned u alone"):
        fm.evaluate(g, z, torch.zeros(3, 1), torch.zeros(3, 1), logp=torch.zeros(3))
    with pytest.raises(ValueError, match="logp was given but the model returned u alone"):
        fm.semigroup_target(g, z, 1.0, 0.5, 0.0, logp=torch.zeros(3))
    with pytest.raises(TypeError, match="needs the end time s"):
        fm.semigroup_target(g, z, 1.0, 0.5)
