"""Progressive distillation: the two-step x̂ target on the exact Gaussian flow, rounds, training smoke tests."""
from __future__ import annotations

import pytest
import torch
from helpers import MU, SD, GaussianTeacher, fast_cpu, gaussian_batch, tiny_net, train

import flowkern
from flowkern.flow_map import GaussianFlowMap
from flowkern.methods.progressive_distillation import ProgressiveDistillation, two_step_target

F64 = torch.float64
pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)


def _two_euler_steps(x, t, delta):
    """Two Euler steps of the exact Gaussian velocity, written out with GaussianFlowMap.velocity only."""
    flow = GaussianFlowMap(MU, SD)
    x1 = x + (-delta)[:, None] * flow.velocity(x, t, t)
    t1 = t - delta
    return x1 + (-delta)[:, None] * flow.velocity(x1, t1, t1)


def test_two_step_target_reproduces_two_teacher_steps():
    """The student's one DDIM step of size 2Δ from x̂_target lands exactly where the teacher's two steps land."""
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(64, dtype=F64, generator=gen) * 0.9 + 0.1
    delta = t * torch.rand(64, dtype=F64, generator=gen) / 2          # t − 2Δ ∈ [0, t)
    delta[:4] = t[:4] / 2                                              # last step: t'' = 0 gives x̂ = x''
    x = torch.randn(64, 2, dtype=F64, generator=gen)
    with flowkern.use_backend("torch"):
        x_hat = two_step_target(GaussianTeacher(), x, t, delta)
    x_end = _two_euler_steps(x, t, delta)
    t_end = (t - 2 * delta)[:, None]
    student = (t_end / t[:, None]) * x + (1 - t_end / t[:, None]) * x_hat
    assert torch.allclose(student, x_end, rtol=1e-12, atol=1e-12)
    assert torch.allclose(x_hat[:4], x_end[:4], rtol=1e-12, atol=1e-12)


def test_two_step_target_tends_to_the_posterior_mean():
    """As Δ → 0, x̂_target → x_t − t·v(x_t, t) = E[x₀ | x_t], with an O(Δ) gap."""
    flow = GaussianFlowMap(MU, SD)
    x = torch.randn(32, 2, dtype=F64)
    t = torch.full((32,), 0.6, dtype=F64)
    mean = x - 0.6 * flow.velocity(x, t, t)
    gaps = []
    with flowkern.use_backend("torch"):
        for d in (0.04, 0.02, 0.01):
            gaps.append(float((two_step_target(GaussianTeacher(), x, t, torch.full_like(t, d)) - mean).abs().max()))
    assert 1.7 < gaps[0] / gaps[1] < 2.3 and 1.7 < gaps[1] / gaps[2] < 2.3, gaps


def test_student_starts_from_teacher_and_rounds_halve():
    teacher = tiny_net(seed=3)
    method = ProgressiveDistillation(tiny_net(seed=4), teacher=teacher, total_steps=9, start_steps=8, round_steps=3,
                                     min_steps=2)
    for p, q in zip(method.model.parameters(), teacher.parameters()):
        assert torch.equal(p, q)
    assert [method.student_steps(k) for k in range(12)] == [8, 8, 8, 4, 4, 4, 2, 2, 2, 2, 2, 2]
    with torch.no_grad():
        method.model.inp.weight.add_(1.0)
    method.on_step_end(1)          # mid-round: teacher unchanged
    assert not torch.equal(method.teacher.inp.weight, method.model.inp.weight)
    method.on_step_end(2)          # end of round 0: the student becomes the teacher
    assert torch.equal(method.teacher.inp.weight, method.model.inp.weight)
    assert not torch.equal(teacher.inp.weight, method.model.inp.weight)  # the user's teacher is untouched
    assert "teacher.inp.weight" in method.state_dict()


def test_training_loss_falls_no_teacher_grad_float32_targets():
    teacher = tiny_net(seed=5)
    method = ProgressiveDistillation(tiny_net(), teacher=teacher, total_steps=1000, start_steps=1)
    x0 = gaussian_batch(256)
    with flowkern.use_backend("torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, target = method.targets(method.model, x0.bfloat16(), 0)
        assert pred.dtype == target.dtype == torch.float32 and target.shape == x0.shape
        assert pred.requires_grad and not target.requires_grad
        with torch.no_grad():                     # perturb the student so it has something to learn
            for p in method.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        before, after = train(method, x0, 40)
    assert after < 0.5 * before, (before, after)
    assert all(p.grad is None for p in method.teacher.parameters())
    out = method.sample(method.model, torch.randn(5, 2), 4)
    assert out.shape == (5, 2) and out.dtype == torch.float32


def test_bad_options():
    with pytest.raises(ValueError, match="teacher"):
        ProgressiveDistillation(tiny_net(), total_steps=1000)
    with pytest.raises(ValueError, match="start_steps must be a power of two"):
        ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000, start_steps=6)
    with pytest.raises(ValueError, match="min_steps"):
        ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000, start_steps=2, min_steps=4)
    with pytest.raises(ValueError, match="round_steps"):
        ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000, round_steps=0)
    with pytest.raises(ValueError, match="architecture"):
        ProgressiveDistillation(tiny_net(dim=3), teacher=tiny_net(dim=2), total_steps=1000)
    with pytest.raises(TypeError, match="unknown options|unexpected keyword"):
        ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000, bogus=1)
    with pytest.raises(ValueError, match="steps"):
        ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000).sample(tiny_net(), torch.randn(2, 2),
                                                                                        0)


def test_round_length_from_total_steps_and_recipe_defaults():
    method = ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=600, start_steps=8)
    assert (method.start_steps, method.min_steps, method.round_steps) == (8, 1, 150)   # 8, 4, 2, 1: 4 rounds
    assert ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=600, round_steps=7).round_steps == 7
    assert method.round_anneal                                    # the recipe anneals within each round
    assert not ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=600,
                                       round_anneal=False).round_anneal
    default = ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=8000)
    assert (default.start_steps, default.round_steps) == (64, 8000 // 7)                # 64 → 1: 7 rounds


@pytest.mark.usefixtures("fast_cpu")
def test_round_anneal_restarts_the_lr_each_round():
    """lr_scale: 1 → 0 linearly within each round, restarting when N halves; the engine multiplies it in."""
    from flowkern.data import get_dataset
    from flowkern.train import TrainConfig, Trainer

    method = ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000, start_steps=4, round_steps=10,
                                     round_anneal=True)
    assert [method.lr_scale(k) for k in (0, 5, 9, 10, 19, 20, 29, 35)] == pytest.approx(
        [1.0, 0.5, 0.1, 1.0, 0.1, 1.0, 0.1, 0.1])                         # rounds N = 4, 2, 1; N = 1 holds
    assert ProgressiveDistillation(tiny_net(), teacher=tiny_net(), total_steps=1000,
                                   round_anneal=False).lr_scale(7) == 1.0
    config = TrainConfig(steps=12, batch=16, lr=1e-3, warmup=0, ema_decays=(0.9,), eval_ema=0.9)
    trainer = Trainer(method, get_dataset("moons").sample, config, progress=False)
    lrs = [trainer.train_step()["lr"] for _ in range(12)]
    assert lrs == pytest.approx([1e-3 * method.lr_scale(k + 1) for k in range(12)])
