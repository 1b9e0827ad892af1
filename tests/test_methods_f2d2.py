"""F2D2: the exact joint Gaussian flow map with the exact teacher is a stationary point (semigroup and Lagrangian
forms), its few-step NLL is the exact log-density, the teacher's divergence target, bad input, training, the NLL
report of `flowkern.train.nll`."""
from __future__ import annotations

import math

import pytest
import torch
from flow_map_cases import F64, PerturbedExactMap, assert_stationary_and_restoring
from helpers import MU, SD, GaussianTeacher, fast_cpu, gaussian_batch, tiny_net, train

import flowkern
from flowkern.flow_map import GaussianFlowMap
from flowkern.methods import get_method
from flowkern.methods.f2d2 import F2D2, teacher_velocity_and_divergence
from flowkern.nn import MLPFlowMap

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)


def joint_net(seed=0):
    torch.manual_seed(seed)
    return MLPFlowMap(2, hidden=32, depth=2, time_dim=16, divergence_head=True)


@pytest.mark.parametrize("consistency", ["semigroup", "lagrangian"])
def test_exact_joint_map_with_the_exact_teacher_is_a_stationary_point(consistency):
    method = F2D2(PerturbedExactMap(joint=True), teacher=GaussianTeacher(), levels=2 ** 16, consistency=consistency,
                  warm_start=False)
    assert_stationary_and_restoring(method)


def test_exact_divergence_option_is_stationary_too():
    method = F2D2(PerturbedExactMap(joint=True), teacher=GaussianTeacher(), levels=2 ** 16, divergence="exact",
                  warm_start=False)
    assert_stationary_and_restoring(method)


def test_teacher_divergence_target_is_unbiased():
    """A non-isotropic linear field v = A x: Hutchinson with one Rademacher probe is noisy per sample but its mean
    is tr A; the exact option is tr A in every row."""
    a = torch.tensor([[0.5, 2.0], [-1.0, -1.5]], dtype=F64)

    class Linear(torch.nn.Module):
        def forward(self, x, t, s):
            return x @ a.T

    x = torch.randn(20000, 2, dtype=F64)
    t = torch.rand(20000, dtype=F64)
    v, div = teacher_velocity_and_divergence(Linear(), x, t)
    assert torch.allclose(v, x @ a.T)
    assert div.std() > 0.5                                          # one probe: per-sample noise
    assert abs(float(div.mean()) - float(a.trace())) < 4 * float(div.std()) / math.sqrt(20000)
    _, exact = teacher_velocity_and_divergence(Linear(), x[:8], t[:8], method="exact")
    assert torch.allclose(exact, torch.full((8,), float(a.trace()), dtype=F64))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_few_step_nll_of_the_exact_joint_map_is_the_exact_log_density(steps):
    flow = GaussianFlowMap(MU, SD, joint=True)
    x = gaussian_batch(512, dtype=F64)
    logp = flowkern.flow_map_log_likelihood(flow, x, steps)
    torch.testing.assert_close(logp, flow.log_prob(x, 0.0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("consistency", ["semigroup", "lagrangian"])
def test_off_diagonal_rows_step_toward_the_noise_too(consistency):
    """The few-step likelihood jumps from the data toward the noise (s > t): that fraction of the off-diagonal rows
    is trained in that direction, and the diagonal grid includes t = 0, where those jumps start."""
    method = F2D2(joint_net(), teacher=joint_net(1), consistency=consistency, warm_start=False)
    torch.manual_seed(0)
    t, s, n = method._times(torch.zeros(4000, 2))
    n_off = 4000 - n
    assert n_off == 1000 and bool((t[:n] == s[:n]).all()) and bool((t[:n] == 0).any())
    assert int((s[n:] > t[n:]).sum()) == 500 and int((s[n:] <= t[n:]).sum()) == 500
    one_way = F2D2(joint_net(), teacher=joint_net(1), consistency=consistency, warm_start=False,
                   toward_noise_fraction=0.0)
    t, s, n = one_way._times(torch.zeros(4000, 2))
    assert bool((s[n:] <= t[n:]).all())
    with pytest.raises(ValueError, match="toward_noise_fraction"):
        F2D2(joint_net(), teacher=joint_net(1), toward_noise_fraction=1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="divergence_head=True"):
        F2D2(tiny_net(), teacher=tiny_net())
    with pytest.raises(ValueError, match="teacher"):
        F2D2(joint_net())
    with pytest.raises(ValueError, match="probes"):
        F2D2(joint_net(), teacher=tiny_net(), probes=0)
    with pytest.raises(ValueError, match="levels"):
        F2D2(joint_net(), teacher=tiny_net(), levels=6)
    with pytest.raises(ValueError, match="divergence"):
        F2D2(joint_net(), teacher=tiny_net(), divergence="hutch++")
    with pytest.raises(ValueError, match="consistency"):
        F2D2(joint_net(), teacher=tiny_net(), consistency="eulerian")
    with pytest.raises(ValueError, match="divergence_scale"):
        F2D2(joint_net(), teacher=tiny_net(), divergence_scale=0.0)
    with pytest.raises(ValueError, match="warm_start"):
        F2D2(joint_net(), teacher=MLPFlowMap(2, hidden=16, depth=2, time_dim=16))

    class VelocityOnly(torch.nn.Module):                             # no D output, no declaration either
        def forward(self, x, t, s):
            return torch.zeros_like(x)

    method = F2D2(VelocityOnly(), teacher=tiny_net(), warm_start=False)
    with pytest.raises(ValueError, match=r"returning \(u, D\)"):
        method.loss(method.model, gaussian_batch(16), 0)


def test_warm_start_copies_the_teacher_velocity_and_zero_d_head():
    teacher = tiny_net(seed=7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    method = F2D2(joint_net(), teacher=teacher)
    x, t = torch.randn(8, 2), torch.rand(8)
    u, d = method.model(x, t, t)
    torch.testing.assert_close(u, teacher(x, t, t))
    assert torch.equal(d, torch.zeros(8))


def test_registry_defaults_round_trip_and_targets():
    assert get_method("f2d2") is F2D2
    method = F2D2(joint_net(), teacher=tiny_net())
    hp = method.hyperparameters()
    assert hp == {"levels": 128, "bootstrap_fraction": 0.25, "divergence": "hutchinson", "probes": 1,
                  "divergence_scale": 10.0, "consistency": "semigroup", "warm_start": True, "target_clip": None,
                  "toward_noise_fraction": 0.5}
    assert F2D2(joint_net(), teacher=tiny_net(), **hp).hyperparameters() == hp
    (u, d), (u_t, d_t), n = method.targets(method.model, gaussian_batch(64))
    assert n == 48 and u.requires_grad and d.requires_grad and not u_t.requires_grad and not d_t.requires_grad
    assert d.shape == d_t.shape == (64,)


def test_training_lowers_the_loss_without_touching_the_teacher():
    torch.manual_seed(0)
    teacher = tiny_net(seed=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    method = F2D2(joint_net(), teacher=teacher, warm_start=False)
    before, after = train(method, gaussian_batch(256), 40)
    assert after < 0.7 * before, (before, after)
    assert all(p.grad is None for p in method.teacher.parameters())
    with torch.no_grad():
        x0, logp = flowkern.flow_map.sample(method.model, torch.randn(5, 2), steps=2, likelihood=True)
    assert x0.shape == (5, 2) and logp.shape == (5,) and torch.isfinite(logp).all()


def test_nll_report_of_the_exact_joint_map():
    """The report on exact models: the joint map's k-step NLL and the exact teacher's ODE NLL are the exact NLL of
    the data; the teacher's 1-step Euler NLL (the naive few-step likelihood) is far off."""
    from flowkern.train.nll import format_nll, nll_report

    flow = GaussianFlowMap(MU, SD, joint=True)
    x = gaussian_batch(400, dtype=F64)
    exact = -float(flow.log_prob(x, 0.0).mean())
    teacher = GaussianTeacher()
    report = nll_report(flow, x, dataset_name="gaussian", velocity=lambda x, t: flow(x, t, t)[0],
                        teacher_velocity=lambda x, t: teacher(x, t, t),
                        data_log_prob=lambda x: flow.log_prob(x, 0.0), ode_steps=32, progress=False)
    assert set(report) == {"nll_steps", "nll_ode", "teacher_nll_ode", "nll_naive_steps", "data_nll"}
    assert list(report["nll_steps"]) == ["1", "2", "4", "8"]
    for k, value in report["nll_steps"].items():
        assert abs(value - exact) < 1e-9, k
    assert abs(report["nll_ode"] - exact) < 1e-5 and abs(report["teacher_nll_ode"] - exact) < 1e-5
    assert abs(report["data_nll"] - exact) < 1e-12
    assert abs(report["nll_naive_steps"]["1"] - exact) > 0.3
    assert abs(report["nll_naive_steps"]["8"] - exact) < 0.1 * abs(report["nll_naive_steps"]["1"] - exact)
    assert "joint flow map" in format_nll(report)


def test_bits_per_dim_on_image_levels():
    """Digits-like data (17 levels on [-1, 1], bins of width 1/8): a model uniform on [-17/16, 17/16]^64 scores
    log2(17) bits/dim, the NLL of its density 64·log(17/8)."""
    from flowkern.train.nll import _bits_per_dim

    nll = 64 * math.log(17 / 8)
    out = _bits_per_dim({"nll_ode": nll}, "digits", 64)
    assert abs(out["nll_ode_bpd"] - math.log2(17)) < 1e-12


TINY = ["--steps", "4", "--batch", "32", "--hidden", "16", "--depth", "1", "--samples", "200", "--no-progress",
        "--warmup", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    from flowkern.__main__ import main

    out = tmp_path_factory.mktemp("f2d2") / "fm"
    with flowkern.use_backend("torch"):
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY, "--no-nll"]) == 0
    return out


def test_cli_trains_f2d2_and_writes_the_likelihood_report(fm_run, tmp_path, capsys, monkeypatch):
    import json

    import flowkern.train.nll
    from flowkern.__main__ import main

    monkeypatch.setattr(flowkern.train.nll, "ODE_STEPS", 4)          # the ODE NLLs: 4 RK4 steps are enough here

    teacher = str(fm_run / "checkpoint.pt")
    assert main(["train", "f2d2", "--data", "checkerboard", "--teacher", teacher, "--out", str(tmp_path / "x"),
                 *TINY]) == 2
    assert "--teacher was trained on '8gaussians'" in capsys.readouterr().err
    assert main(["train", "f2d2", "--data", "8gaussians", "--teacher", teacher, "--out", str(tmp_path / "bad"),
                 "--f2d2-probes", "0", *TINY]) == 2
    assert "probes" in capsys.readouterr().err
    out = tmp_path / "f2d2"
    assert main(["train", "f2d2", "--data", "8gaussians", "--teacher", teacher, "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "NLL, joint flow map" in printed and "teacher Euler (naive)" in printed
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["nll_steps"]) == set(quality["nll_naive_steps"]) == {"1", "2", "4", "8"}
    for key in ("nll_ode", "teacher_nll_ode", "data_nll"):
        assert math.isfinite(quality[key]), key
    (out / "quality.json").unlink()
    assert main(["eval", str(out / "checkpoint.pt"), "--samples", "200", "--nll"]) == 0
    assert "NLL, joint flow map" in capsys.readouterr().out
    again = json.loads((out / "quality.json").read_text())
    assert again["nll_steps"] == pytest.approx(quality["nll_steps"], abs=1e-4)
