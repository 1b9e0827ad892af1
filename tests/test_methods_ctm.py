"""CTM: the two-time jump G on the exact Gaussian flow, the CTM target, DSM, GAN balancing, training, options."""
from __future__ import annotations

import pytest
import torch
from helpers import (
    MU,
    SD,
    ExactCTMNet,
    GaussianTeacher,
    assert_target_pass_replays_dropout,
    dropout_net,
    fast_cpu,
    gaussian_batch,
    ode_y,
    posterior_mean,
    tiny_net,
    train,
)

import flowkern
from flowkern.flow_map import GaussianFlowMap
from flowkern.methods import ctm as ctm_module
from flowkern.methods import edm
from flowkern.methods.ctm import CTM, ctm_g, ctm_jump

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)
F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_jump_at_s_equal_t_is_identity(dtype):
    net = tiny_net().to(dtype)
    y = torch.randn(32, 2, dtype=dtype) * 4
    sigma = torch.exp(torch.linspace(-6, 4.3, 32, dtype=dtype))
    with flowkern.use_backend("torch"):
        out = ctm_jump(net, y, sigma, sigma, 0.5)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert torch.allclose(out, y.to(out.dtype), rtol=tol, atol=tol)


def test_exact_model_jump_is_the_exact_flow_map():
    """With g* of the exact flow, G(y, σ_t, σ_s) — done as a flowkern DDIM jump — equals the exact Φ, checked in
    EDM coordinates (closed form) and in flowkern coordinates (GaussianFlowMap.phi)."""
    net = ExactCTMNet()
    y = MU + torch.randn(64, 2, dtype=F64) * 3
    sig_t = torch.exp(torch.linspace(-3, 4, 64, dtype=F64))
    for sig_s in (torch.full_like(sig_t, 0.002), sig_t * 0.3):
        with flowkern.use_backend("torch"):
            out = ctm_jump(net, y, sig_t, sig_s, 0.5)
        assert torch.allclose(out, ode_y(y, sig_t, sig_s), rtol=1e-9, atol=1e-9)
        t, s = edm.sigma_to_t(sig_t), edm.sigma_to_t(sig_s)
        phi = GaussianFlowMap(MU, SD).phi(y * (1 - t)[:, None], t, s)
        assert torch.allclose(out * (1 - s)[:, None], phi, rtol=1e-9, atol=1e-9)
    # g(y, σ, σ) is the denoiser (what DSM trains)
    assert torch.allclose(ctm_g(net, y, sig_t, sig_t, 0.5), posterior_mean(y, sig_t), rtol=1e-9, atol=1e-9)


def test_ctm_target_with_exact_teacher_and_model():
    """pred and target differ only by the teacher's Heun error: small, and shrinking when the grid is refined."""
    x0 = gaussian_batch(512, dtype=F64)
    gaps = []
    for n in (40, 80):
        method = CTM(ExactCTMNet(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=n, max_teacher_steps=4)
        torch.manual_seed(0)
        with flowkern.use_backend("torch"):
            pred, target = method.targets(method.model, x0, 0)
        gaps.append(float((pred - target).abs().max()))
    assert gaps[1] < 2e-3 and gaps[0] / gaps[1] > 3, gaps


def test_teacher_solve_moves_each_row_its_own_segment():
    """Rows with segments of different lengths (0..4 steps) against one row-at-a-time Heun loop."""
    method = CTM(tiny_net(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=12, max_teacher_steps=4)
    grid = edm.karras_sigmas(12, edm.SIGMA_MIN, edm.SIGMA_MAX, edm.RHO, dtype=F64)
    i_from = torch.tensor([5, 9, 3, 11, 4])
    i_to = torch.tensor([5, 5, 1, 10, 0])
    y = torch.randn(5, 2, dtype=F64)
    with flowkern.use_backend("torch"):
        got = method.teacher_solve(y, grid, i_from, i_to)
        for r in range(5):
            want = y[r:r + 1]
            for i in range(int(i_from[r]), int(i_to[r]), -1):
                want = edm.heun_step(method.teacher, want, grid[i:i + 1], grid[i - 1:i])
            assert torch.allclose(got[r:r + 1], want, rtol=1e-12, atol=1e-12), r
    assert torch.equal(got[0], y[0])                                    # a zero-length segment is untouched


def test_index_sampling():
    method = CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, num_scales=18, max_teacher_steps=3)
    i_t, i_s, i_u = method.sample_indices(20000, torch.device("cpu"))
    assert bool(((i_s <= i_u) & (i_u < i_t) & (i_t - i_u <= 3) & (i_t <= 17) & (i_t >= 1) & (i_s >= 0)).all())
    assert int(i_s.min()) == 0 and int(i_t.max()) == 17 and int((i_t - i_u).max()) == 3
    assert bool((i_u == i_s).any()) and bool((i_u > i_s).any())


@pytest.mark.parametrize("prob", [0.5, 1.0])
def test_index_sampling_s_min_prob(prob):
    method = CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, num_scales=18, max_teacher_steps=3,
                 s_min_prob=prob)
    torch.manual_seed(0)
    i_t, i_s, i_u = method.sample_indices(20000, torch.device("cpu"))
    assert bool(((i_s <= i_u) & (i_u < i_t) & (i_t - i_u <= 3)).all())
    # P(i_s = 0) = prob + (1 − prob)·E[1/i_t], i_t ~ U{1..17}
    want = prob + (1 - prob) * sum(1 / k for k in range(1, 18)) / 17
    assert abs(float((i_s == 0).float().mean()) - want) < 0.015


def test_exact_model_sampler_is_exact_in_one_step():
    noise = torch.randn(256, 2, dtype=F64)
    method = CTM(ExactCTMNet(), teacher=GaussianTeacher(), sigma_data=0.5)
    with flowkern.use_backend("torch"):
        one = method.sample(method.model, noise, 1)
        three = method.sample(method.model, noise, 3)
    want = ode_y(80.0 * noise, 80.0, 0.002)
    assert one.dtype == F64 and torch.allclose(one, want, rtol=1e-9, atol=1e-9)
    assert torch.allclose(three, want, rtol=1e-8, atol=1e-8)      # semigroup: γ = 0 jumps compose exactly


def test_training_loss_falls_no_grad_into_teacher_or_target():
    method = CTM(tiny_net(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=10, max_teacher_steps=2,
                 target_decay=0.9, dsm_weight=1.0)
    x0 = gaussian_batch(256)
    with flowkern.use_backend("torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, target = method.targets(method.model, x0.bfloat16(), 0)
        assert pred.dtype == target.dtype == torch.float32 and pred.shape == target.shape == (256, 2)
        assert pred.requires_grad and not target.requires_grad
        torch.manual_seed(0)
        before, after = train(method, x0, 60)
        out = method.sample(method.model, torch.randn(5, 2), 2)
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None for p in method.target.parameters())
    assert out.shape == (5, 2) and out.dtype == torch.float32


def test_target_pass_uses_the_grad_pass_dropout_mask(monkeypatch):
    """A flat σ grid and a teacher that stays put make the target's inputs and times the prediction's; with the
    EMA target equal to the model the two agree exactly iff both jumps draw the grad pass's dropout masks."""
    method = CTM(dropout_net(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=10, max_teacher_steps=2)
    method.target.load_state_dict(method.model.state_dict())
    monkeypatch.setattr(ctm_module, "karras_sigmas", lambda n, *args, device, dtype: torch.full((n,), 0.7))
    monkeypatch.setattr(method, "teacher_solve", lambda y, grid, i_from, i_to: y)
    assert_target_pass_replays_dropout(method, ctm_module, monkeypatch)


def _gan_ctm(**kw):
    return CTM(tiny_net(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=10, gan=True, data_dim=2, **kw)


def _backward_as_the_engine(losses, method):
    """Each loss into its own network's parameters only (the engine's `backward(loss, inputs=params)`)."""
    torch.autograd.backward(losses["model"], inputs=list(method.model.parameters()))
    d_params = list(method.discriminator.parameters())
    assert all(p.grad is None for p in d_params)            # the generator term leaves D alone
    torch.autograd.backward(losses["discriminator"], inputs=d_params)


def test_gan_term_balanced_and_discriminator_loss():
    method = _gan_ctm(gan_start=1)
    x0 = gaussian_batch(128)
    d0 = [p.clone() for p in method.discriminator.parameters()]
    with flowkern.use_backend("torch"):
        loss0, stats0 = method.loss(method.model, x0, 0)        # before gan_start: no GAN term, no D loss
        assert "gan_weight" not in stats0 and isinstance(loss0, torch.Tensor)
        losses, stats = method.loss(method.model, x0, 1)
        assert set(losses) == {"model", "discriminator"}
        _backward_as_the_engine(losses, method)
    assert 0 < stats["gan_weight"] < 1e4 and torch.isfinite(losses["model"])
    assert all(torch.equal(a, b) for a, b in zip(d0, method.discriminator.parameters()))   # loss() steps nothing
    assert all(p.grad is not None for p in method.model.parameters())
    assert all(p.grad is not None for p in method.discriminator.parameters())
    assert all(p.grad is None for p in method.target.parameters())


def test_gan_discriminator_gradient_and_balance_match_the_formulas():
    """One step's discriminator gradient is that of the logistic loss −log σ(D(x₀)) − log(1 − σ(D(sg pred))), and
    λ_GAN = ‖∇_w L_CTM‖/(‖∇_w L_GAN‖ + 1e-4) with L_GAN = −log σ(D(pred)), recomputed from the same draw."""
    method = _gan_ctm(dsm_weight=0.0)
    x0 = gaussian_batch(64)
    d_params = list(method.discriminator.parameters())
    with flowkern.use_backend("torch"):
        torch.manual_seed(11)
        losses, stats = method.loss(method.model, x0, 0)
        got = torch.autograd.grad(losses["discriminator"], d_params)
        torch.manual_seed(11)
        pred, target = method.targets(method.model, x0, 0)
    disc = method.discriminator
    real, fake = torch.sigmoid(disc(x0)), torch.sigmoid(disc(pred.detach()))
    want = torch.autograd.grad(-(torch.log(real).mean() + torch.log(1 - fake).mean()), d_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    w = ctm_module.last_linear_weight(method.model)
    ctm = ((pred - target) ** 2).mean()
    gen = -torch.log(torch.sigmoid(disc(pred))).mean()
    g_ctm = torch.autograd.grad(ctm, w, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gen, w)[0]
    lam = g_ctm.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(stats["gan_weight"], lam.detach(), rtol=1e-5, atol=0)


def test_gan_discriminator_is_an_auxiliary_network_in_the_state_dict():
    method = _gan_ctm(gan_lr=3e-4)
    aux = method.auxiliary_networks()
    assert list(aux) == ["discriminator"] and aux["discriminator"].module is method.discriminator
    assert (aux["discriminator"].lr, aux["discriminator"].betas, aux["discriminator"].weight_decay) == \
        (3e-4, (0.5, 0.9), 0.0)
    assert any(k.startswith("discriminator.") for k in method.state_dict())
    assert CTM(tiny_net(), teacher=GaussianTeacher(), sigma_data=0.5).auxiliary_networks() == {}
    assert not hasattr(method, "_d_opt")
    sized = CTM(tiny_net(dim=5), teacher=tiny_net(dim=5), sigma_data=0.5, gan=True, data_dim=5)
    assert sized.discriminator.net[0].in_features == 5                  # the discriminator's input: data_dim


def test_bad_options():
    with pytest.raises(ValueError, match="teacher"):
        CTM(tiny_net(), sigma_data=0.5)
    with pytest.raises(ValueError, match="data_dim"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, gan=True)
    with pytest.raises(TypeError, match="gan"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, gan=1)
    with pytest.raises(ValueError, match="max_teacher_steps"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, max_teacher_steps=0)
    with pytest.raises(ValueError, match="dsm_weight"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, dsm_weight=-1.0)
    with pytest.raises(ValueError, match="num_scales"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, num_scales=1)
    with pytest.raises(ValueError, match="s_min_prob"):
        CTM(tiny_net(), teacher=tiny_net(), sigma_data=0.5, s_min_prob=1.5)
