"""Shared test helpers, one module: attention cases and tolerances, op checks against plain PyTorch, network-vs-twin
checks, method cases on the exact Gaussian flow, and engine fixtures. Test oracles (plain `torch.nn` twins) are in
`tests/nn_reference.py`; closed-form flows in `flowkern.testing`."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import flowkern
import flowkern.nn
from flowkern.flow_map import GaussianFlowMap
from flowkern.methods.base import Method
from flowkern.nn import MLPFlowMap
from flowkern.testing import math_attention


# ----------------------------------------------------------------------------------------------------
# attention cases: Input builders and tolerances shared by the attention tests.

ABS_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
RATIO = 4.0


def make_inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, device="cpu", seed=0, layout="contiguous"):
    """q, k, v and their tangents, fresh random values (never zeros). layout='bnhd' makes every tensor a
    transposed view of a [B, N, H, D] buffer (the layout projections produce); 'expanded_tangent' gives k_t a
    stride-0 batch dimension."""
    g = torch.Generator().manual_seed(seed)

    def rand(h, n):
        if layout == "bnhd":
            return torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(hq, nq), rand(hkv, nk), rand(hkv, nk)
    q_t, k_t, v_t = rand(hq, nq), rand(hkv, nk), rand(hkv, nk)
    if layout == "expanded_tangent":
        k_t = k_t[:1].expand_as(k)
    return q, k, v, q_t, k_t, v_t


def reference_jvp(q, k, v, q_t, k_t, v_t, **kw):
    """(out, out_t) of torch.func.jvp over float64 math attention."""
    d = [x.double().cpu() for x in (q, k, v, q_t, k_t, v_t)]
    mask = kw.get("attn_mask")
    if mask is not None:
        kw = dict(kw, attn_mask=mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    return torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, **kw), tuple(d[:3]), tuple(d[3:]))


def reference_grads(q, k, v, grad_out, **kw):
    d = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None:
        kw = dict(kw, attn_mask=mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    out = math_attention(*d, **kw)
    return torch.autograd.grad(out, d, grad_out.double().cpu())


def reference_tangent_grads(q, k, v, q_t, k_t, v_t, grad_out, grad_out_t, **kw):
    """Gradients of ⟨grad_out, O⟩ + ⟨grad_out_t, Ȯ⟩ w.r.t. (q, k, v, q_t, k_t, v_t): float64 torch.func.grad over
    torch.func.jvp of math attention (grad_out may be None)."""
    d = [x.double().cpu() for x in (q, k, v, q_t, k_t, v_t)]
    mask = kw.get("attn_mask")
    if mask is not None:
        kw = dict(kw, attn_mask=mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    g_t = grad_out_t.double().cpu()
    g = None if grad_out is None else grad_out.double().cpu()

    def loss(*a):
        o, o_t = torch.func.jvp(lambda x, y, z: math_attention(x, y, z, **kw), a[:3], a[3:])
        return (o_t * g_t).sum() + (0.0 if g is None else (o * g).sum())

    return torch.func.grad(loss, argnums=tuple(range(6)))(*d)


def torch_own_error(q, k, v, q_t, k_t, v_t, ref, **kw):
    """PyTorch's own error in the inputs' dtype: math attention (and its JVP) computed in that dtype vs float64."""
    if q.dtype in (torch.float32, torch.float64):
        return 0.0, 0.0
    low = torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, **kw), (q, k, v), (q_t, k_t, v_t))
    return tuple((lo.double().cpu() - r).abs().max().item() for lo, r in zip(low, ref))


def assert_close_to(actual, expected, dtype, torch_err=0.0, what=""):
    err = (actual.double().cpu() - expected).abs().max().item()
    bound = max(ABS_FLOOR[dtype] * max(1.0, expected.abs().max().item()), RATIO * torch_err)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


# ----------------------------------------------------------------------------------------------------
# ops utils: Shared checks of the fused ops (tests/test_ops_*.py) against plain-PyTorch float64 layers written in the tests.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# error bound relative to max(1, max |expected|): a few roundings of the output dtype, float32 maths
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what: str, *, scale_tol: float = 1.0) -> None:
    assert actual is not None, f"{what}: got None"
    expected = expected.double()
    tol = TOL[dtype] * scale_tol
    atol = tol * max(1.0, expected.abs().max().item()) if expected.numel() else tol
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def check_against_plain(backend, fused, plain, primals, tangents, dtype, *, scale_tol: float = 1.0,
                        out_dtype=None) -> None:
    """fused(*primals) vs plain(*primals in float64): outputs, tangents (torch.func.jvp and forward_ad of the fused
    op against torch.func.jvp of the plain one) and gradients (autograd), on `backend`."""
    p64 = [p.double() for p in primals]
    t64 = [t.double() for t in tangents]
    y_ref, yt_ref = torch.func.jvp(plain, tuple(p64), tuple(t64))
    out_dtype = out_dtype or dtype
    with flowkern.use_backend(backend):
        y = fused(*primals)
        assert y.dtype == out_dtype, f"output dtype {y.dtype}, expected {out_dtype}"
        assert y.shape == y_ref.shape
        assert_close(y, y_ref, dtype, "output", scale_tol=scale_tol)

        y1, yt1 = torch.func.jvp(fused, tuple(primals), tuple(tangents))
        assert_close(y1, y_ref, dtype, "torch.func.jvp output", scale_tol=scale_tol)
        assert yt1.dtype == out_dtype
        assert_close(yt1, yt_ref, dtype, "torch.func.jvp tangent", scale_tol=scale_tol)

        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            yt2 = fwAD.unpack_dual(fused(*duals)).tangent
        assert_close(yt2, yt_ref, dtype, "forward_ad tangent", scale_tol=scale_tol)

        leaves = [p.detach().clone().requires_grad_() for p in primals]
        gen = torch.Generator().manual_seed(7)
        g = randn(*y_ref.shape, dtype=out_dtype, gen=gen)
        grads = torch.autograd.grad(fused(*leaves), leaves, g)
    leaves64 = [p.detach().clone().requires_grad_() for p in p64]
    grads_ref = torch.autograd.grad(plain(*leaves64), leaves64, g.double())
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == primals[i].dtype
        coarser = primals[i].dtype if TOL[primals[i].dtype] > TOL[dtype] else dtype  # gradients come back in it
        assert_close(a, b, coarser, f"gradient of input {i}", scale_tol=scale_tol)


def check_explicit(backend, explicit, plain, primals, tangents, dtype, *, scale_tol: float = 1.0) -> None:
    """explicit(...) -> (y, y_t) vs torch.func.jvp of the plain float64 layer. `explicit(primals, tangents)`."""
    y_ref, yt_ref = torch.func.jvp(plain, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    with flowkern.use_backend(backend):
        y, y_t = explicit(primals, tangents)
    assert_close(y, y_ref, dtype, "explicit output", scale_tol=scale_tol)
    assert_close(y_t, yt_ref, dtype, "explicit tangent", scale_tol=scale_tol)


def gradcheck_torch(fn, primals) -> None:
    """float64 gradcheck, backward and forward mode, on the PyTorch backend."""
    leaves = tuple(p.double().detach().requires_grad_() for p in primals)
    with flowkern.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_backward_ad=True)


# ----------------------------------------------------------------------------------------------------
# nn utils: Shared checks of the flowkern networks against their plain-PyTorch twins (tests/nn_reference.py).

def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_all_close(actual, expected, what, *, atol, rtol=None):
    for i, (a, e) in enumerate(zip(as_tuple(actual), as_tuple(expected))):
        assert a.dtype == e.dtype, f"{what}[{i}]: dtype {a.dtype}, expected {e.dtype}"
        torch.testing.assert_close(a, e, atol=atol, rtol=atol if rtol is None else rtol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def check_network_against_twin(model, twin, primals, tangents, *, atol, kwargs=None):
    """model vs twin (same weights): outputs; tangents from flowkern.jvp, torch.func.jvp and forward_ad of the model
    against torch.func.jvp of the twin; gradients of every parameter and of x (ordinary backward)."""
    kwargs = kwargs or {}
    out_ref, tan_ref = torch.func.jvp(lambda *p: twin(*p, **kwargs), primals, tangents)
    out_ref, tan_ref = as_tuple(out_ref), as_tuple(tan_ref)
    assert_all_close(model(*primals, **kwargs), out_ref, "output", atol=atol)

    out, tan = flowkern.nn.jvp(model, primals, tangents, kwargs=kwargs)
    assert_all_close(out, out_ref, "flowkern.jvp output", atol=atol)
    assert_all_close(tan, tan_ref, "flowkern.jvp tangent", atol=atol)
    with torch.no_grad():
        _, tan1 = torch.func.jvp(lambda *p: model(*p, **kwargs), primals, tangents)
    assert_all_close(tan1, tan_ref, "torch.func.jvp tangent", atol=atol)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tan2 = tuple(fwAD.unpack_dual(o).tangent for o in as_tuple(model(*duals, **kwargs)))
    assert_all_close(tan2, tan_ref, "forward_ad tangent", atol=atol)

    gen = torch.Generator().manual_seed(3)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in out_ref]
    grads = []
    for net in (model, twin):
        net.zero_grad(set_to_none=True)
        x = primals[0].detach().clone().requires_grad_()
        outs = as_tuple(net(x, *primals[1:], **kwargs))
        sum((o * c).sum() for o, c in zip(outs, cots)).backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in net.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert grads[0][name] is not None, f"no gradient for {name}"
        assert_all_close(grads[0][name], g, f"gradient of {name}", atol=atol)


# ----------------------------------------------------------------------------------------------------
# methods cases: Shared fixtures for the method tests: tiny networks, the exact Gaussian teacher, and "exact" consistency / CTM

MU, SD = 0.7, 0.4


@pytest.fixture
def fast_cpu():
    """The PyTorch backend (not Triton's interpreter) and one intra-op thread: tiny models run far faster so."""
    with torch_backend(), one_thread():
        yield


def ode_y(y, sigma, sigma_to, mu=MU, sd=SD):
    """Exact Φ_y(y, σ → σ') for Gaussian data, float64; sigma, sigma_to: [B] or scalars."""
    sigma, sigma_to = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, *[1] * (y.dim() - 1))
                       for v in (sigma, sigma_to))
    r = torch.sqrt((sd ** 2 + sigma_to ** 2) / (sd ** 2 + sigma ** 2))
    return mu + r * (y.to(torch.float64) - mu)


def posterior_mean(y, sigma, mu=MU, sd=SD):
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (y.dim() - 1))
    return mu + sd ** 2 / (sd ** 2 + sigma ** 2) * (y.to(torch.float64) - mu)


class GaussianTeacher(nn.Module):
    """The exact flowkern velocity of Gaussian data as a module: teacher(x, t, t) = v(x, t)."""

    def __init__(self, mu=MU, sd=SD):
        super().__init__()
        self.flow = GaussianFlowMap(mu, sd)

    def forward(self, x, t, s):
        return self.flow.velocity(x, t, t).to(x.dtype)


def _edm_inputs(x_in, t, sigma_data):
    """Invert the preconditioned network inputs: (c_in·y, t(σ)) -> (y, σ) in float64."""
    t = t.to(torch.float64)
    sigma = t / (1 - t)
    y = x_in.to(torch.float64) * torch.sqrt(sigma ** 2 + sigma_data ** 2)[:, None]
    return y, sigma


class ExactConsistencyNet(nn.Module):
    """Raw output F making f(y, σ) = c_skip·y + c_out·F equal the exact f*(y, σ) = Φ_y(y, σ → σ_min)."""

    def __init__(self, sigma_min=0.002, sigma_data=0.5):
        super().__init__()
        self.sigma_min, self.sigma_data = sigma_min, sigma_data

    def forward(self, x_in, t, s):
        y, sigma = _edm_inputs(x_in, t, self.sigma_data)
        d2 = self.sigma_data ** 2
        c_skip = d2 / ((sigma - self.sigma_min) ** 2 + d2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / torch.sqrt(sigma ** 2 + d2)
        f = ode_y(y, sigma, self.sigma_min)
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        raw = torch.where((c_out == 0)[:, None], torch.zeros_like(y), (f - c_skip[:, None] * y) / safe[:, None])
        return raw.to(x_in.dtype)


class ExactCTMNet(nn.Module):
    """Raw output F making G(y, σ_t, σ_s) equal the exact Φ_y(y, σ_t → σ_s) (g* = the denoiser at σ_s = σ_t)."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data

    def forward(self, x_in, t, s):
        y, sigma = _edm_inputs(x_in, t, self.sigma_data)
        s = s.to(torch.float64)
        sigma_s = s / (1 - s)
        ratio = (sigma_s / sigma)[:, None]
        same = (sigma_s == sigma)[:, None]
        safe = torch.where(same, torch.full_like(ratio, 0.5), ratio)
        g = torch.where(same, posterior_mean(y, sigma), (ode_y(y, sigma, sigma_s) - safe * y) / (1 - safe))
        d2 = self.sigma_data ** 2
        c_skip = d2 / (sigma ** 2 + d2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma ** 2 + d2)
        return ((g - c_skip[:, None] * y) / c_out[:, None]).to(x_in.dtype)


def tiny_net(dim=2, dropout=0.0, seed=0):
    """A small `flowkern.nn.MLPFlowMap` (its output layer is zero at init: u = 0)."""
    torch.manual_seed(seed)
    return MLPFlowMap(dim, hidden=32, depth=2, time_dim=16, dropout=dropout)


def dropout_net():
    """tiny_net with dropout 0.5 and perturbed weights (adaLN-zero switches the dropout branch off at init)."""
    net = tiny_net(dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return net


def assert_target_pass_replays_dropout(method, module, monkeypatch):
    """The caller has collapsed the method's target pair onto its prediction (same input, same times, target
    weights = model weights), so pred == target exactly iff the target pass drew the grad pass's dropout masks.
    Control: with `module`'s replay_rng made a no-op, the masks, and so the two, differ."""
    x0 = gaussian_batch(64)
    pred, target = method.targets(method.model, x0, 0)[:2]
    assert torch.equal(pred.detach(), target)
    monkeypatch.setattr(module, "replay_rng", lambda device: contextlib.nullcontext())
    pred, target = method.targets(method.model, x0, 0)[:2]
    assert not torch.equal(pred.detach(), target)


def gaussian_batch(n=256, dim=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (MU + SD * torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype)


def fixed_loss(method, x0, step=0, seed=123):
    """The method's loss on x0 with a fixed draw of times and noise (no grad; the global RNG is left as it was)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = float(method.loss(method.model, x0, step)[0])
    torch.set_rng_state(state)
    return loss


def train(method, x0, steps, lr=3e-3):
    """A minimal loop (the engine's job elsewhere). Returns (fixed-draw loss before, after)."""
    before = fixed_loss(method, x0)
    opt = torch.optim.Adam(method.model.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = method.loss(method.model, x0, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(step)
    return before, fixed_loss(method, x0)


# ----------------------------------------------------------------------------------------------------
# train utils: Helpers for the training tests: tiny networks, deterministic toy methods, the torch backend.

def engine_net(dim: int = 2, seed: int = 0) -> MLPFlowMap:
    torch.manual_seed(seed)
    return MLPFlowMap(dim, hidden=32, depth=1, time_dim=8)


class Regression(Method):
    """A deterministic loss (no RNG): ‖net(x₀, ½, ½) − (x₀ flipped)‖², for engine tests (DDP parity, NaN guard)."""

    name = "regression"

    def __init__(self, model, *, nan_at=(), inf_grad_at=()):
        super().__init__(model)
        self.nan_at, self.inf_grad_at = set(nan_at), set(inf_grad_at)

    def loss(self, net, x0, step):
        half = torch.full((x0.shape[0],), 0.5)
        loss = (net(x0, half, half) - x0.flip(-1)).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        if step in self.inf_grad_at:   # finite loss, non-finite gradient: d/dp sqrt(0·Σp) = 0/0
            loss = loss + torch.sqrt((next(self.model.parameters()) * 0.0).sum())
        return loss, {}


@contextlib.contextmanager
def torch_backend():
    with flowkern.use_backend("torch"):
        yield


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a busy 2-core machine spinning
    threads make them ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Aux:
    """The fields of `flowkern.methods.base.Auxiliary` the engine reads."""

    module: torch.nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


class WithCritic(Method):
    """Regression plus an auxiliary network `critic` (a linear map on samples). The model's term goes through the
    critic, the critic's term through the model: each network must get only its own term's gradient. Deterministic
    (no RNG); `nan_critic_at`: steps whose critic term is NaN."""

    name = "with_critic"

    def __init__(self, model, *, critic_lr: float = 1e-2, nan_critic_at=()):
        super().__init__(model)
        torch.manual_seed(3)
        self.critic = torch.nn.Linear(2, 1)
        self.critic_lr, self.nan_critic_at = critic_lr, set(nan_critic_at)

    def auxiliary_networks(self):
        return {"critic": Aux(self.critic, self.critic_lr, betas=(0.5, 0.9))}

    def terms(self, net, x0, step):
        half = torch.full((x0.shape[0],), 0.5)
        y = net(x0, half, half)
        model = (y - x0.flip(-1)).pow(2).mean() + self.critic(y).mean()
        critic = (self.critic(x0) - 1).pow(2).mean() + self.critic(y).pow(2).mean()
        if step in self.nan_critic_at:
            critic = critic * float("nan")
        return {"model": model, "critic": critic}

    def loss(self, net, x0, step):
        return self.terms(net, x0, step), {}


def assert_ot_paired(x0: torch.Tensor, z: torch.Tensor) -> None:
    """x0[i] is paired with z[i] by an optimal assignment of squared distances: no exchange of two rows' partners
    lowers the total cost (2-opt, necessary for optimality), while the identity pairing of fresh noise would fail."""
    cost = torch.cdist(x0.flatten(1).double(), z.flatten(1).double()).square()
    diag = cost.diagonal()
    gain = diag[:, None] + diag[None, :] - cost - cost.T     # > 0: swapping the partners of i and j is cheaper
    assert float(gain.max()) <= 1e-9, f"pairing is not optimal: a swap gains {float(gain.max()):.3g}"
