"""sCT and sCD (TrigFlow): coordinates and the teacher conversion on the exact Gaussian flow (float64), stationarity
of the exact TrigFlow consistency function, the JVP against a plain torch.nn twin, targets, masking of non-finite
tangents, samplers, bad input and a few CLI training steps."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import MU, SD, GaussianTeacher, dropout_net, fast_cpu, gaussian_batch, one_thread, tiny_net, \
    torch_backend
from nn_reference import PlainMLPFlowMap, randomize
from test_train_cli import TINY
from torch import nn

import flowkern
import flowkern.methods.scm as scm_module
from flowkern.methods import get_method
from flowkern.methods.scm import SCD, SCT
from flowkern.methods.trigflow import (
    MID_T,
    consistency_function,
    network_jvp,
    network_time,
    sampling_times,
    scale,
    t_max,
    teacher_velocity,
    trig_time,
)

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)   # the triton case selects its backend inside
F64 = torch.float64
SIGMA_D = 0.5


# ----------------------------------------------------------------------------------------------------- exact answers
# Gaussian data N(μ, SD²I) on TrigFlow's path x_t = cos t·x₀ + sin t·σ_d·ε: x_t ~ N(cos t·μ, S_t²I) with
# S_t² = cos²t·SD² + sin²t·σ_d², so the PF-ODE map to t = 0 is f*(x, t) = μ + (SD/S_t)·(x − cos t·μ).


def trig_std(t, sigma_d=SIGMA_D):
    return torch.sqrt(torch.cos(t) ** 2 * SD ** 2 + torch.sin(t) ** 2 * sigma_d ** 2)


def exact_f(x, t, sigma_d=SIGMA_D, mu=MU):
    t = t.to(F64)[:, None]
    return mu + SD / trig_std(t, sigma_d) * (x.to(F64) - torch.cos(t) * mu)


def exact_trig_velocity(x, t, sigma_d=SIGMA_D):
    """dx_t/dt of the PF-ODE: −sin t·μ + (S_t'/S_t)·(x − cos t·μ), S_t' = sin t·cos t·(σ_d² − SD²)/S_t."""
    t = t.to(F64)[:, None]
    s = trig_std(t, sigma_d)
    ds = torch.sin(t) * torch.cos(t) * (sigma_d ** 2 - SD ** 2) / s
    return -torch.sin(t) * MU + ds / s * (x.to(F64) - torch.cos(t) * MU)


class ExactTrigNet(nn.Module):
    """net(x/σ_d, τ, 0) = F* with cos t·x − sin t·σ_d·F* = f*(x, t) (t = atan2(τ, σ_d(1 − τ))), plus eps·h: a
    perturbation by a constant direction h with a trainable size eps (0 at the exact answer). `mu` shifts the data
    mean the answer assumes (a wrong answer for the controls)."""

    def __init__(self, sigma_d=SIGMA_D, eps=0.0, mu=MU):
        super().__init__()
        self.sigma_d, self.mu = sigma_d, mu
        self.eps = nn.Parameter(torch.tensor(float(eps), dtype=F64))
        self.register_buffer("h", torch.tensor([1.0, -0.5], dtype=F64))

    def forward(self, x_in, tau, s):
        t = torch.atan2(tau.to(F64), self.sigma_d * (1 - tau.to(F64)))
        x = x_in.to(F64) * self.sigma_d
        f = exact_f(x, t, self.sigma_d, self.mu)
        F = (torch.cos(t)[:, None] * x - f) / (self.sigma_d * torch.sin(t))[:, None]
        return (F + self.eps * self.h).to(x_in.dtype)


def build(cls, model, **kw):
    kw = {"sigma_data": SIGMA_D, "tangent_warmup": 0, **kw}
    if cls is SCD:
        kw.setdefault("teacher", GaussianTeacher())
    return cls(model, **kw)


# ----------------------------------------------------------------------------------------------------- coordinates


def test_trigflow_path_is_the_flowkern_path_rescaled():
    """x_t = α(t)·x_τ with τ = τ(t), both from the same x₀ and ε; t(τ(t)) = t; cos t·sin t·dτ/dt = τ(1 − τ)."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 64, 3, generator=gen, dtype=F64)
    t = torch.rand(64, generator=gen, dtype=F64) * math.pi / 2
    tau = network_time(t, 0.7)
    trig = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * 0.7 * eps
    flowkern_state = (1 - tau)[:, None] * x0 + tau[:, None] * eps
    torch.testing.assert_close(trig, scale(t, 0.7)[:, None] * flowkern_state, atol=1e-13, rtol=0)
    torch.testing.assert_close(trig_time(tau, 0.7), t, atol=1e-13, rtol=0)
    _, dtau = torch.func.jvp(lambda u: network_time(u, 0.7), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(torch.cos(t) * torch.sin(t) * dtau, tau * (1 - tau), atol=1e-13, rtol=0)
    assert float(network_time(torch.tensor(0.0), 0.7)) == 0.0
    assert float(network_time(torch.tensor(math.pi / 2, dtype=F64), 0.7)) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("sigma_d", [0.5, 2.0])
def test_teacher_velocity_is_the_exact_trigflow_velocity(sigma_d):
    """The flowkern velocity of Gaussian data (the exact `fm` teacher), converted, is TrigFlow's exact PF-ODE
    velocity, and d/dt of the exact TrigFlow flow from t = 0."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 2, generator=gen, dtype=F64) * 1.3
    t = torch.rand(128, generator=gen, dtype=F64) * 1.5 + 0.01
    got = teacher_velocity(GaussianTeacher(), x, t, sigma_d)
    torch.testing.assert_close(got, exact_trig_velocity(x, t, sigma_d), atol=1e-12, rtol=1e-12)
    # the flow from x₀ at t = 0: x(t) = cos t·μ + (S_t/SD)·(x₀ − μ); its derivative along t is the velocity at x(t)
    x0 = x

    def flow(u):
        return torch.cos(u)[:, None] * MU + trig_std(u[:, None], sigma_d) / SD * (x0 - MU)

    xt, dxt = torch.func.jvp(flow, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(teacher_velocity(GaussianTeacher(), xt, t, sigma_d), dxt, atol=1e-12, rtol=1e-12)


def test_exact_consistency_function_maps_the_flow_to_its_start():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2, generator=gen, dtype=F64)
    t = torch.rand(64, generator=gen, dtype=F64) * 1.5 + 0.01
    f = consistency_function(ExactTrigNet().double(), x, t, SIGMA_D)
    torch.testing.assert_close(f, exact_f(x, t), atol=1e-12, rtol=1e-12)
    assert torch.equal(consistency_function(tiny_net().double(), x, torch.zeros(64, dtype=F64), SIGMA_D), x)


# ----------------------------------------------------------------------------------------------------- stationarity


def gradient_statistics(method, x0, seed=0):
    """(mean, standard error) over rows of the loss's gradient with respect to the perturbation size eps, and the
    autograd gradient of the loss itself (which must equal the mean)."""
    torch.manual_seed(seed)
    d = method.targets(method.model, x0, 10 ** 6)
    h = method.model.h
    per_row = 2 * ((d["pred"] - d["target"]).detach() * h).mean(1)     # e^{−w} = 1: w_φ starts at 0
    torch.manual_seed(seed)
    loss = method.loss(method.model, x0, 10 ** 6)[0]
    loss = loss["model"] if isinstance(loss, dict) else loss
    (grad,) = torch.autograd.grad(loss, method.model.eps)
    return float(per_row.mean()), float(per_row.std() / math.sqrt(len(per_row))), float(grad)


@pytest.mark.parametrize("cls", [SCT, SCD])
def test_exact_consistency_function_is_a_stationary_point(cls):
    """At the exact answer the mean gradient is zero within Monte-Carlo error (sCT: E[g | x_t] = 0; for Gaussian
    data g | x_t is symmetric, so the normalised tangent's mean is zero too); a ±perturbation is pulled back."""
    x0 = gaussian_batch(100_000, dtype=F64)
    mean, se, grad = gradient_statistics(build(cls, ExactTrigNet()), x0)
    assert grad == pytest.approx(mean, rel=1e-9, abs=1e-15)
    assert abs(mean) < 4 * se + 1e-12, (mean, se)
    for eps in (0.05, -0.05):
        pulled, se_eps, _ = gradient_statistics(build(cls, ExactTrigNet(eps=eps)), x0)
        assert pulled * eps > 0 and abs(pulled) > 10 * max(se, se_eps), (eps, pulled, se, se_eps)


def test_scd_tangent_vanishes_at_the_exact_answer():
    """With the exact teacher the tangent is deterministic: g = cos t·df*/dt = 0 to rounding, row by row."""
    method = build(SCD, ExactTrigNet())
    torch.manual_seed(0)
    d = method.targets(method.model, gaussian_batch(4096, dtype=F64), 10 ** 6)
    assert float(d["tangent_norm"].max()) < 1e-9
    assert float((d["pred"] - d["target"]).abs().max()) < 1e-8


@pytest.mark.parametrize("cls", [SCT, SCD])
def test_a_wrong_answer_is_not_stationary(cls):
    """Control: the consistency function of data with another mean gets a mean gradient far outside the error."""
    x0 = gaussian_batch(100_000, dtype=F64)
    mean, se, _ = gradient_statistics(build(cls, ExactTrigNet(mu=MU + 0.3)), x0)
    assert abs(mean) > 20 * se, (mean, se)


def test_warm_up_factor():
    method = build(SCT, tiny_net(), tangent_warmup=100)
    assert [method.warmup(k) for k in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert build(SCT, tiny_net()).warmup(0) == 1.0


# ----------------------------------------------------------------------------------------------------- the JVP pass


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_jvp_through_the_fused_network_equals_torch_func_of_a_plain_twin(backend, device):
    """cos t·sin t·dF/dt from the method's pass equals torch.func.jvp through a torch.nn twin of the composite
    t ↦ twin(x_t(t)/σ_d, τ(t), 0) along the conditional path x_t(t) = cos t·x₀ + sin t·z."""
    if backend == "triton":
        from conftest import TRITON_RUNS

        if not TRITON_RUNS:
            pytest.skip("needs Triton (GPU or interpreter)")
    dtype = F64 if backend == "torch" else torch.float32
    model = randomize(flowkern.nn.MLPFlowMap(2, 16, 2, 8, time_scale=3.0)).to(device, dtype)
    twin = PlainMLPFlowMap(2, 16, 2, 8, time_scale=3.0).double()
    twin.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    x0, z = (torch.randn(5, 2, generator=gen, dtype=F64) for _ in range(2))
    t = torch.rand(5, generator=gen, dtype=F64) * 1.4 + 0.1

    def composite(u):
        x = torch.cos(u)[:, None] * x0 + torch.sin(u)[:, None] * z
        tau = SIGMA_D * torch.sin(u) / (torch.cos(u) + SIGMA_D * torch.sin(u))
        return twin(x / SIGMA_D, tau, torch.zeros_like(tau))

    ref, dref = torch.func.jvp(composite, (t,), (torch.ones_like(t),))
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    dx_dt = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0
    with flowkern.use_backend(backend):
        out, tangent = network_jvp(model, x_t.to(device, dtype), t.to(device, dtype), dx_dt.to(device, dtype),
                                   SIGMA_D)
    atol = 1e-10 if dtype == F64 else 2e-4
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=atol)
    torch.testing.assert_close(tangent.cpu().double(), (torch.cos(t) * torch.sin(t))[:, None] * dref, atol=atol,
                               rtol=atol)
    assert dref.abs().max() > 1e-2


@pytest.mark.parametrize("cls", [SCT, SCD])
def test_one_pass_equals_two_passes_in_float64(cls):
    """The default one-pass JVP (one forward with the graph on) gives the two-pass form's loss and gradients, with
    the same dropout masks (float64, dropout on)."""
    results = []
    for jvp in ("one_pass", "two_pass"):
        model = dropout_net().double()
        teacher = {"teacher": randomize(tiny_net(seed=1), std=0.2).double()} if cls is SCD else {}
        method = build(cls, model, jvp=jvp, tangent_warmup=4, adaptive_weighting=True, **teacher)
        randomize(method.weight_net, std=0.1)
        method.train()
        torch.manual_seed(5)
        losses, logs = method.loss(method.model, gaussian_batch(64, dtype=F64), 2)
        grads = torch.autograd.grad(losses["model"], list(model.parameters()), retain_graph=True)
        (w_grad,) = torch.autograd.grad(losses["weighting"], [method.weight_net.linear.weight])
        results.append((losses["model"].detach(), grads, w_grad, float(logs["tangent_norm"])))
    (l1, g1, w1, n1), (l2, g2, w2, n2) = results
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w1, w2, atol=1e-12, rtol=1e-10)
    assert n1 == pytest.approx(n2, rel=1e-12) and n1 > 1e-3
    assert SCT(tiny_net(), sigma_data=0.5).jvp == "one_pass"


@pytest.mark.parametrize("cls", [SCT, SCD])
def test_targets_shape_dtype_and_no_gradient_into_them_under_bf16(cls):
    teacher = tiny_net(seed=1)
    method = build(cls, tiny_net(seed=2), adaptive_weighting=True, **({"teacher": teacher} if cls is SCD else {}))
    randomize(method.model, std=0.2)
    x0 = gaussian_batch(64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = method.targets(method.model, x0, 10)
        losses, logs = method.loss(method.model, x0, 10)
    assert d["pred"].shape == d["target"].shape == (64, 2)
    assert d["pred"].dtype == d["target"].dtype == torch.float32 and d["t"].dtype == torch.float32
    assert d["pred"].requires_grad and not d["target"].requires_grad
    assert set(losses) == {"model", "weighting"} and losses["model"].dtype == torch.float32
    losses["model"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.model.parameters() if p.requires_grad)
    assert float(logs["nonfinite_tangents"]) == 0.0


def test_the_stop_gradient_pass_sees_the_grad_pass_dropout_masks():
    """Two-pass form: F⁻ from the JVP pass equals the grad pass's F_θ bit for bit only with the same masks."""
    method = build(SCT, dropout_net())
    method.train()
    seen = []
    original = scm_module.network_jvp

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0])
        return out

    scm_module.network_jvp = spy
    try:
        d = method.targets(method.model, gaussian_batch(64), 10)
    finally:
        scm_module.network_jvp = original
    assert torch.equal(seen[0], d["pred"].detach())
    with torch.no_grad():
        again = method.targets(method.model, gaussian_batch(64), 10)["pred"]
    assert not torch.equal(again, d["pred"].detach())     # other draws, other masks: the test can fail


def test_rows_with_a_non_finite_tangent_are_masked_and_counted(monkeypatch):
    method = build(SCT, tiny_net())
    original = scm_module.network_jvp

    def poisoned(*args, **kwargs):
        out, tangent = original(*args, **kwargs)
        tangent = tangent.clone()
        tangent[1, 0], tangent[4, 1] = float("nan"), float("inf")
        return out, tangent

    monkeypatch.setattr(scm_module, "network_jvp", poisoned)
    losses, logs = method.loss(method.model, gaussian_batch(32), 5)
    assert float(logs["nonfinite_tangents"]) == 2.0 and torch.isfinite(losses["model"])
    losses["model"].backward()
    assert all(torch.isfinite(p.grad).all() for p in method.model.parameters() if p.grad is not None)
    d = method.targets(method.model, gaussian_batch(32), 5)
    assert d["keep"].tolist() == [i not in (1, 4) for i in range(32)]


# ----------------------------------------------------------------------------------------------------- sampling


def test_sampling_times():
    assert sampling_times(1, SIGMA_D) == [pytest.approx(math.atan(80 / SIGMA_D))]
    assert sampling_times(2, SIGMA_D)[1] == MID_T
    assert sampling_times(4, SIGMA_D)[1:] == pytest.approx([1.1, 1.1 * 2 / 3, 1.1 / 3])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_the_exact_answer_draws_the_data(steps):
    """The exact consistency function turns noise into N(μ, SD²) samples at any step count (t_max < π/2: the
    data part of x_{t_max} that σ_d·noise leaves out is cos t_max·μ ≈ 0.004)."""
    method = build(SCT, ExactTrigNet())
    torch.manual_seed(0)
    samples = method.sample(method.model, torch.randn(200_000, 2, dtype=F64), steps)
    assert samples.dtype == F64
    se = SD / math.sqrt(samples.shape[0])
    assert (samples.mean(0) - MU).abs().max() < 5 * se + 0.01
    assert (samples.std(0) - SD).abs().max() < 5 * se + 0.01


# ----------------------------------------------------------------------------------------------------- interface


def test_registered_with_the_teacher_flags():
    assert get_method("sct") is SCT and get_method("scd") is SCD
    assert not SCT.needs_teacher and SCD.needs_teacher and not SCD.init_from_teacher


@pytest.mark.parametrize(("kw", "message"), [
    ({"sigma_data": 0.0}, "sigma_data"), ({"sigma_data": float("nan")}, "sigma_data"),
    ({"sigma_data": float("inf")}, "sigma_data"), ({"tangent_c": 0.0}, "tangent_c"),
    ({"tangent_c": -1.0}, "tangent_c"), ({"tangent_c": float("nan")}, "tangent_c"), ({"p_std": 0.0}, "p_std"),
    ({"p_mean": float("inf")}, "p_mean"), ({"tangent_warmup": -1}, "tangent_warmup"),
    ({"weighting_lr": 0.0}, "weighting_lr"), ({"mid_t": 0.0}, "mid_t"), ({"mid_t": 1.6}, "mid_t"),
    ({"one_pass": 1}, "one_pass"),
])
@pytest.mark.parametrize("cls", [SCT, SCD])
def test_bad_options(cls, kw, message):
    with pytest.raises((TypeError, ValueError), match=message):
        build(cls, tiny_net(), **kw)


def test_teacher_required_by_scd_and_refused_by_sct():
    with pytest.raises(ValueError, match="teacher"):
        SCD(tiny_net(), sigma_data=0.5)
    with pytest.raises(TypeError, match="teacher"):
        SCT(tiny_net(), teacher=tiny_net(), sigma_data=0.5)
    with pytest.raises(TypeError, match="x0"):
        build(SCT, tiny_net()).loss(tiny_net(), [1.0], 0)


def test_p_mean_follows_the_data_scale_and_weighting_is_an_auxiliary():
    method = SCT(tiny_net(), sigma_data=2.0)
    assert method.p_mean == pytest.approx(-1.0 + math.log(4.0))
    assert method.hyperparameters()["p_mean"] == method.p_mean
    aux = method.auxiliary_networks()
    assert list(aux) == ["weighting"] and aux["weighting"].module is method.weight_net
    assert build(SCT, tiny_net(), adaptive_weighting=False).auxiliary_networks() == {}
    assert SCD(tiny_net(), teacher=tiny_net(), sigma_data=2.0).auxiliary_networks() == {}   # sCD's default: off
    assert "weight_net.linear.weight" in method.state_dict()


# ----------------------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny `flowkern train fm` checkpoint on 8 Gaussians."""
    from flowkern.__main__ import main

    out = tmp_path_factory.mktemp("scm") / "fm"
    with torch_backend(), one_thread():
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY]) == 0
    return out / "checkpoint.pt"


def test_cli_trains_sct_and_scd(teacher_run, tmp_path):
    import json

    from flowkern.__main__ import main

    for method, extra in (("sct", []), ("scd", ["--teacher", str(teacher_run)])):
        out = tmp_path / method
        assert main(["train", method, "--data", "8gaussians", "--out", str(out), *TINY, *extra,
                     f"--{method}-tangent-warmup", "2"]) == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert "nonfinite_tangents" in lines[-1] and ("weighting_loss" in lines[-1]) == (method == "sct")
        assert (out / "quality.json").is_file()


def test_cli_teacher_errors_write_nothing(teacher_run, tmp_path, capsys):
    from flowkern.__main__ import main

    cases = [(["train", "scd"], "distils a teacher"),
             (["train", "sct", "--teacher", str(teacher_run)], "not used by 'sct'"),
             (["train", "scd", "--teacher", str(teacher_run), "--data", "checkerboard"], "trained on"),
             (["train", "sct", "--sct-tangent-c", "0"], "tangent_c"),
             (["train", "sct", "--sct-tangent-c", "nan"], "tangent_c")]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        data = [] if "--data" in argv else ["--data", "8gaussians"]
        assert main([*argv, *data, "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("flowkern: error:"), err
        assert not out.exists()


@pytest.mark.parametrize("cls", [SCT, SCD])
def test_the_cli_offers_no_ode_nll_for_a_consistency_function(cls):
    """A consistency function has no velocity field: `flowkern train sct` must not try the ODE NLL at its end (a
    method attribute named `velocity` with another meaning once made it crash there)."""
    from flowkern.data import get_dataset
    from flowkern.train.evaluate import nll_unavailable

    teacher = {"teacher": tiny_net(seed=1)} if cls is SCD else {}
    method = build(cls, tiny_net(), **teacher)
    assert "has no velocity field" in nll_unavailable(method, get_dataset("checkerboard"))


def test_sct_ot_coupling_pairs_data_and_noise_by_minibatch_optimal_transport():
    from helpers import assert_ot_paired

    x0 = gaussian_batch(64)
    method = build(SCT, tiny_net(), coupling="ot", coupling_block=64)
    assert_ot_paired(x0, method.noise(x0))
    assert method.noise(x0).std() == pytest.approx(method.sigma_data, rel=0.3)
    with pytest.raises(ValueError, match="coupling"):
        build(SCT, tiny_net(), coupling="sinkhorn")


class _RecordingNet(nn.Module):
    """F = x/2 at every time; keeps each call's input x/σ_d."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5, dtype=F64))
        self.inputs = []

    def forward(self, x_in, tau, s):
        self.inputs.append(x_in.detach().clone())
        return self.w * x_in


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_sct_sampler_re_noises_with_the_training_coupling(coupling):
    """The 2-step sampler's re-noise z = (x_mid − cos t_mid·x̂₀)/sin t_mid is OT-paired with x̂₀ when sct was trained
    with coupling='ot' (the coupled process's marginals), and not when it was trained independently."""
    from helpers import assert_ot_paired

    net = _RecordingNet()
    method = build(SCT, net, coupling=coupling, coupling_block=64)
    torch.manual_seed(0)
    method.sample(net, torch.randn(64, 2, dtype=F64), 2)
    first, second = (x * SIGMA_D for x in net.inputs)
    t0 = torch.full((64,), t_max(SIGMA_D), dtype=F64)
    x0_hat = consistency_function(lambda x, tau, s: 0.5 * x, first, t0, SIGMA_D)
    z = (second - math.cos(MID_T) * x0_hat) / math.sin(MID_T)
    assert z.std().item() == pytest.approx(SIGMA_D, rel=0.3)
    if coupling == "ot":
        assert_ot_paired(x0_hat, z)
    else:
        with pytest.raises(AssertionError, match="not optimal"):
            assert_ot_paired(x0_hat, z)
