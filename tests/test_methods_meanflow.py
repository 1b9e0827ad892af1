"""MeanFlow: the exact Gaussian flow map is a stationary point of the loss, the fused JVP target equals
torch.func.jvp through a torch.nn twin, no gradient reaches the target, the one-pass and two-pass forms agree, the
guided target and the label dropout follow their formulas, the sampler, and bad input."""
from __future__ import annotations

import pytest
import torch
from helpers import fast_cpu, fixed_loss, gaussian_batch, tiny_net, train
from nn_reference import PlainMLPFlowMap, randomize

import flowkern
from flowkern.methods.meanflow import MeanFlow, mean_flow_times
from flowkern.nn import DiT, MLPFlowMap
from flowkern.testing import GaussianFlowMap

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)
MU, SD = 0.7, 0.4


class PerturbedFlowMap(torch.nn.Module):
    """u = u*(x, t, s) + θ·h(x, t, s): the exact average velocity of N(μ, σ²I) data plus θ times a fixed smooth
    direction, in float64 (differentiable in θ and, through forward AD, in (x, t, s))."""

    def __init__(self, theta: float = 0.0):
        super().__init__()
        self.flow = GaussianFlowMap(MU, SD)
        self.theta = torch.nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))

    def forward(self, x, t, s):
        t, s = t.to(torch.float64)[:, None], s.to(torch.float64)[:, None]
        direction = torch.tanh(x) * (1 + t) + (t - s) * x.flip(-1) + 0.3
        return self.flow.velocity(x, t[:, 0], s[:, 0]) + self.theta * direction


def theta_gradients(theta: float, batches: int = 16, rows: int = 2048, **kw) -> torch.Tensor:
    """dL/dθ of the MeanFlow loss on `batches` independent batches of Gaussian data (one value per batch). The
    exact flow map is that of the independent pairing of data and noise (with minibatch OT, the default, the coupled
    process of a finite batch has no closed form)."""
    model = PerturbedFlowMap(theta)
    method = MeanFlow(model, **{"coupling": "independent", **kw})
    torch.manual_seed(0)
    grads = []
    for b in range(batches):
        x0 = gaussian_batch(rows, seed=100 + b, dtype=torch.float64)
        loss, _ = method.loss(model, x0, 0)
        (g,) = torch.autograd.grad(loss, [model.theta])
        grads.append(g)
    return torch.stack(grads)


@pytest.mark.parametrize("jvp", ["one_pass", "two_pass"])
def test_exact_gaussian_flow_map_is_stationary_and_perturbations_are_pulled_back(jvp):
    """The unweighted loss (p = 0): at θ = 0 the mean gradient is zero within Monte-Carlo error; at θ = ±0.05 it
    points back towards 0 (gradient descent restores the exact map). Mixed rows: r = t and r < t."""
    at_zero = theta_gradients(0.0, weight_power=0.0, equal_fraction=0.25, jvp=jvp)
    mean, sem = at_zero.mean(), at_zero.std() / at_zero.numel() ** 0.5
    plus = theta_gradients(0.05, weight_power=0.0, equal_fraction=0.25, jvp=jvp)
    minus = theta_gradients(-0.05, weight_power=0.0, equal_fraction=0.25, jvp=jvp)
    assert abs(mean) < 4 * sem, (mean, sem)
    assert plus.mean() > 10 * sem and minus.mean() < -10 * sem, (plus.mean(), minus.mean(), sem)


def test_only_rows_with_r_below_t_are_stationary_through_the_jvp_term():
    """With every row at r < t the target is v − (t − r)·du/dt: the exact map stays stationary only because its
    JVP term is right; a map off by a multiple of (t − r) (wrong du/dt) is not."""
    at_zero = theta_gradients(0.0, weight_power=0.0, equal_fraction=0.0)
    assert abs(at_zero.mean()) < 4 * at_zero.std() / at_zero.numel() ** 0.5


def test_adaptive_weight_is_the_stop_gradient_closed_form():
    """loss = mean_i w_i·‖Δ_i‖², w_i = (‖Δ_i‖² + c)^(−p) with no gradient through w: the gradient equals
    2·w_i·Δ_i backpropagated through u."""
    model = randomize(tiny_net(), std=0.3)
    method = MeanFlow(model, weight_power=0.8, weight_eps=0.05)
    x0 = gaussian_batch(64)
    torch.manual_seed(3)
    loss, logs = method.loss(model, x0, 0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(3)
    z, t, r, v, y = method.targets(x0)
    u, target = method.prediction_and_target(model, z, t, r, v, y)
    sq = (u - target).square().sum(1)
    w = (sq.detach() + 0.05) ** -0.8
    torch.testing.assert_close(loss, (w * sq).mean())
    manual = torch.autograd.grad(u, list(model.parameters()), grad_outputs=2 * w[:, None] * (u - target).detach() / 64)
    for a, b in zip(grads, manual):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logs["weight_mean"], w.mean())


def test_targets_shapes_dtypes_and_equal_rows():
    method = MeanFlow(tiny_net(), equal_fraction=0.25)
    x0 = gaussian_batch(64)
    z, t, r, v, y = method.targets(x0)
    assert z.shape == v.shape == x0.shape and t.shape == r.shape == (64,) and y is None
    assert t.dtype == r.dtype == torch.float32 and bool((r <= t).all()) and bool(((t > 0) & (t < 1)).all())
    assert int((r == t).sum()) >= 16 and bool((r[:16] == t[:16]).all()) and bool((r[16:] < t[16:]).all())
    _, target = method.prediction_and_target(method.model, z, t, r, v, y)
    assert target.dtype == torch.float32 and target.grad_fn is None and not target.requires_grad


def test_logit_normal_times_follow_the_max_min_law():
    """P(max(a, b) ≤ x) = F(x)², P(min ≤ x) = 1 − (1 − F(x))² for F the logit-normal(−0.4, 1) CDF."""
    t, r = mean_flow_times(200_000, mean=-0.4, std=1.0, equal_fraction=0.0)
    normal = torch.distributions.Normal(-0.4, 1.0)
    for q in (0.2, 0.4, 0.6, 0.8):
        f = float(normal.cdf(torch.logit(torch.tensor(q))))
        assert abs(float((t <= q).double().mean()) - f ** 2) < 5e-3
        assert abs(float((r <= q).double().mean()) - (1 - (1 - f) ** 2)) < 5e-3


def _twin_target(model, z, t, r, v):
    twin = PlainMLPFlowMap(2, 16, 1, 8, time_scale=model.time.time_scale)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, dudt = torch.func.jvp(twin, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return v - (t - r)[:, None] * dudt, twin(z, t, r)


@pytest.mark.parametrize("backend, jvp", [("torch", "one_pass"), ("torch", "two_pass"),
                                          pytest.param("triton", "one_pass", marks=pytest.mark.interpreter)])
def test_fused_target_equals_torch_func_jvp_through_a_plain_twin(backend, jvp):
    if backend == "triton":
        from conftest import TRITON_RUNS

        if not TRITON_RUNS:
            pytest.skip("needs Triton (GPU or interpreter)")
    model = randomize(MLPFlowMap(2, 16, 1, 8, time_scale=1.0), std=0.3)
    method = MeanFlow(model, jvp=jvp, equal_fraction=0.25)
    z, t, r, v, y = method.targets(gaussian_batch(16))
    with flowkern.use_backend(backend):
        u, target = method.prediction_and_target(model, z, t, r, v, y)
    ref_target, ref_u = _twin_target(model, z, t, r, v)
    torch.testing.assert_close(target, ref_target, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(u.detach(), ref_u.detach(), atol=1e-5, rtol=1e-5)
    assert (target - v).abs().max() > 1e-3  # the JVP term is there


def test_one_pass_and_two_pass_give_the_same_loss_and_gradients_in_float64():
    model = randomize(tiny_net(), std=0.3).double()
    x0 = gaussian_batch(64, dtype=torch.float64)
    results = []
    for form in ("one_pass", "two_pass"):
        torch.manual_seed(5)
        loss, _ = MeanFlow(model, jvp=form).loss(model, x0, 0)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_dit_with_labels_trains_on_the_guided_target():
    """A class-conditional DiT: the loss runs with labels, gradients reach the network, the label embedding
    included."""
    model = randomize(DiT((4, 4), 1, patch=2, hidden=16, depth=1, heads=2, time_dim=8, num_classes=3,
                          time_scale=1.0), std=0.2)
    method = MeanFlow(model, num_classes=3, cfg_scale=2.0, cfg_kappa=0.5, label_dropout=0.2)
    x0 = torch.randn(8, 1, 4, 4)
    loss, _ = method.loss(model, x0, 0, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and model.label_embed.weight.grad.abs().sum() > 0


class LabelStub(torch.nn.Module):
    """u(x, t, s | y) = (y + 1)·1 (null class y = 3 gives 4): known guidance velocities."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, s, y=None):
        return (y.to(x.dtype)[:, None] + 1) * torch.ones_like(x) + self.w * x


def test_guided_velocity_and_label_dropout_follow_the_formula():
    method = MeanFlow(LabelStub(), num_classes=3, cfg_scale=2.0, cfg_kappa=0.5, cfg_t_min=0.3, cfg_t_max=0.9,
                      label_dropout=0.25)
    x0 = torch.zeros(4000, 2)
    labels = torch.arange(4000) % 3
    torch.manual_seed(0)
    z, t, r, v_tilde, y = method.targets(x0, labels)
    unguided = MeanFlow(LabelStub(), num_classes=3, label_dropout=0.25)
    torch.manual_seed(0)
    _, t_again, _, v, y_again = unguided.targets(x0, labels)   # the same draws: the guidance passes drew nothing
    assert torch.equal(t, t_again) and torch.equal(y, y_again)
    dropped = y == 3
    inside = (t >= 0.3) & (t <= 0.9)
    guided = 2.0 * v + 0.5 * (labels.double() + 1)[:, None] + (1 - 2.0 - 0.5) * 4.0
    expected = torch.where((inside & ~dropped)[:, None], guided.float(), v)
    torch.testing.assert_close(v_tilde, expected)
    assert abs(float(dropped.double().mean()) - 0.25) < 0.03
    assert torch.equal(y[~dropped], labels[~dropped])


def test_sampler_with_the_exact_map_is_exact():
    """1 step: ε − u*(ε, 1, 0) = μ + σ·ε; 2 steps compose exactly to the same point."""
    method = MeanFlow(tiny_net())
    flow = GaussianFlowMap(MU, SD)
    noise = torch.randn(256, 2, dtype=torch.float64)
    for steps in (1, 2):
        x = method.sample(flow, noise, steps)
        torch.testing.assert_close(x, MU + SD * noise, atol=1e-10, rtol=1e-10)


def test_a_few_steps_lower_the_squared_error():
    """40 Adam steps on Gaussian data: the unweighted ‖Δ‖² of a fixed draw falls (the adaptive weight keeps the
    weighted loss near 1 while ‖Δ‖² ≫ c, so the logged mse is the measure)."""
    torch.manual_seed(0)
    method = MeanFlow(MLPFlowMap(2, hidden=32, depth=2, time_dim=16, time_scale=1.0), weight_power=0.0)
    before, after = train(method, gaussian_batch(256), 40, lr=3e-3)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("kw, err, match", [
    ({"equal_fraction": 1.5}, ValueError, "equal_fraction"),
    ({"equal_fraction": -0.1}, ValueError, "equal_fraction"),
    ({"label_dropout": 2.0}, ValueError, "label_dropout"),
    ({"cfg_t_min": -0.5}, ValueError, "cfg_t_min"),
    ({"cfg_t_min": 0.8, "cfg_t_max": 0.2}, ValueError, "cfg_t_max"),
    ({"weight_eps": 0.0}, ValueError, "weight_eps"),
    ({"weight_eps": float("nan")}, ValueError, "weight_eps"),
    ({"weight_eps": float("inf")}, ValueError, "weight_eps"),
    ({"weight_power": -1.0}, ValueError, "weight_power"),
    ({"weight_power": float("nan")}, ValueError, "weight_power"),
    ({"t_std": 0.0}, ValueError, "t_std"),
    ({"jvp": "three_pass"}, ValueError, "jvp"),
    ({"num_classes": -1}, ValueError, "num_classes"),
    ({"teacher": torch.nn.Linear(2, 2)}, TypeError, "teacher"),
])
def test_bad_arguments_raise(kw, err, match):
    with pytest.raises(err, match=match):
        MeanFlow(tiny_net(), **kw)


def test_bad_labels_raise():
    x0 = gaussian_batch(8)
    with pytest.raises(ValueError, match="num_classes=0"):
        MeanFlow(tiny_net()).loss(tiny_net(), x0, 0, labels=torch.zeros(8, dtype=torch.long))
    conditional = MeanFlow(LabelStub(), num_classes=3)
    with pytest.raises(ValueError, match="labels are required"):
        conditional.loss(conditional.model, x0, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        conditional.loss(conditional.model, x0, 0, labels=torch.full((8,), 3))
    with pytest.raises(TypeError, match="integer tensor"):
        conditional.loss(conditional.model, x0, 0, labels=torch.zeros(8))
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        conditional.loss(conditional.model, x0, 0, labels=torch.zeros(4, dtype=torch.long))


def test_cli_refuses_bad_input_before_writing_anything(tmp_path, capsys):
    from flowkern.__main__ import main

    out = tmp_path / "run"
    fm_ckpt = tmp_path / "teacher.pt"
    fm_ckpt.write_bytes(b"")
    assert main(["train", "meanflow", "--out", str(out), "--teacher", str(fm_ckpt)]) == 2
    assert "--teacher is not used" in capsys.readouterr().err
    for flag, value in (("--meanflow-equal-fraction", "1.5"), ("--meanflow-weight-eps", "0"),
                        ("--meanflow-weight-eps", "nan")):
        code = None
        try:
            code = main(["train", "meanflow", "--out", str(out), flag, value, "--steps", "2"])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2, (flag, value)
        assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_loss_is_reproducible_from_the_seed():
    method = MeanFlow(tiny_net())
    x0 = gaussian_batch(64)
    assert fixed_loss(method, x0) == fixed_loss(method, x0)


def test_ot_coupling_pairs_the_batch_by_minibatch_optimal_transport():
    from helpers import assert_ot_paired

    x0 = gaussian_batch(64)
    method = MeanFlow(tiny_net(), coupling="ot", coupling_block=64)
    torch.manual_seed(0)
    z, t, r, v, _ = method.targets(x0)
    assert_ot_paired(x0, v + x0)     # the noise ε = v + x₀
    with pytest.raises(AssertionError):  # the paper's independent pairing
        torch.manual_seed(0)
        z, t, r, v, _ = MeanFlow(tiny_net(), coupling="independent").targets(x0)
        assert_ot_paired(x0, v + x0)
    with pytest.raises(ValueError, match="coupling"):
        MeanFlow(tiny_net(), coupling="sinkhorn")


def test_ot_coupling_of_a_class_conditional_batch_pairs_within_each_class():
    """Across the whole batch OT would bias ε given the class away from N(0, I), the sampler's draw."""
    from helpers import assert_ot_paired

    x0 = gaussian_batch(64)
    labels = torch.arange(64) % 2
    method = MeanFlow(tiny_net(), coupling="ot", num_classes=2, label_dropout=0.0)
    torch.manual_seed(0)
    eps = method.noise(x0, labels)
    for c in (0, 1):
        assert_ot_paired(x0[labels == c], eps[labels == c])
    with pytest.raises(AssertionError):
        assert_ot_paired(x0, eps)
