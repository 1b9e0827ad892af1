"""The training engine: loss falls, flow-matching targets, NaN/Inf guard, warm-up, EMA, exact resume."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import Regression, one_thread, engine_net, torch_backend

from flowkern.data import get_dataset
from flowkern.methods import Method, get_method, method_names
from flowkern.methods.flow_matching import FlowMatching, logit_normal
from flowkern.train import EMA, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("torch_backend_fixture")


@pytest.fixture
def torch_backend_fixture():
    with torch_backend(), one_thread():
        yield


def _trainer(method, steps=30, batch=64, **kw):
    config = TrainConfig(steps=steps, batch=batch, lr=kw.pop("lr", 3e-3), warmup=kw.pop("warmup", 5),
                         ema_decays=(0.9, 0.99), eval_ema=0.9, **kw)
    return Trainer(method, get_dataset("8gaussians").sample, config, progress=False)


def test_registry():
    assert method_names() == ["fm", "pd", "cd", "ct", "ctm", "meanflow", "sct", "scd", "shortcut", "lsd", "esd", "psd",
                              "f2d2"]
    assert get_method("fm") is FlowMatching
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: fm, pd, cd, ct, ctm, meanflow, sct, scd, shortcut, lsd, esd, psd, "
                                             "f2d2"):
        get_method("nope")


def test_flow_matching_loss_falls():
    trainer = _trainer(FlowMatching(engine_net()), steps=60)
    losses = trainer.fit()
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10


def test_flow_matching_targets():
    torch.manual_seed(0)
    x0 = torch.randn(4096, 2) * 2 + 1
    xt, t, v = FlowMatching(engine_net()).targets(x0)
    assert xt.shape == x0.shape and v.shape == x0.shape and t.shape == (4096,)
    assert xt.dtype == v.dtype == t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    eps = v + x0                                    # v = ε − x₀
    torch.testing.assert_close(xt, (1 - t[:, None]) * x0 + t[:, None] * eps)
    assert abs(eps.mean().item()) < 0.03 and abs(eps.std().item() - 1) < 0.03
    logit = torch.logit(logit_normal(100_000, mean=-0.4, std=1.3, generator=torch.Generator().manual_seed(0)))
    assert abs(logit.mean().item() + 0.4) < 0.02 and abs(logit.std().item() - 1.3) < 0.02


def test_flow_matching_sample_is_euler():
    net = engine_net(seed=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        noise = torch.randn(16, 2)
        x = noise.clone()
        for i in range(4):
            t = torch.full((16,), 1 - i / 4)
            x = x + (-0.25) * net(x, t, t)
        torch.testing.assert_close(FlowMatching(net).sample(net, noise, 4), x, rtol=1e-5, atol=1e-6)


def test_flow_matching_rejects_bad_options():
    with pytest.raises(ValueError, match="t_std"):
        FlowMatching(engine_net(), t_std=0.0)
    with pytest.raises(TypeError, match="teacher"):
        FlowMatching(engine_net(), teacher=engine_net())


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
def test_nan_guard_skips_and_counts(kind):
    bad = {"nan_at": (3, 4)} if kind == "nan_loss" else {"inf_grad_at": (3, 4)}
    trainer = _trainer(Regression(engine_net(), **bad), steps=3, warmup=0)
    trainer.fit()
    before = [p.detach().clone() for p in trainer.method.parameters()]
    ema_before = [s.clone() for s in trainer.ema.shadow[0.9]]
    trainer.fit(5)                                  # steps 3 and 4 are bad
    assert trainer.skipped == 2 and trainer.step_count == 5
    for p, q in zip(trainer.method.parameters(), before):
        assert torch.equal(p, q)
    for s, q in zip(trainer.ema.shadow[0.9], ema_before):
        assert torch.equal(s, q)
    trainer.fit(7)                                  # training goes on, weights stay finite and move again
    assert trainer.skipped == 2
    assert all(bool(torch.isfinite(p).all()) for p in trainer.method.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.method.parameters(), before))


def test_warmup_and_clipping():
    trainer = _trainer(Regression(engine_net()), steps=3, warmup=4, lr=1e-3, grad_clip=1e-3)
    lrs = []
    for _ in range(3):
        record = trainer.train_step()
        lrs.append(record["lr"])
        # after clipping the global gradient norm is at most grad_clip
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.params if p.grad is not None))
        assert norm.item() <= 1e-3 * (1 + 1e-5) and record["grad_norm"] > 1e-3
    assert lrs == pytest.approx([0.5e-3, 0.75e-3, 1e-3])  # the lr for step k + 1: lr·min(1, (k + 2)/4)


def test_cosine_decay_schedule():
    """Warm-up, then half a cosine from lr to lr·lr_floor at the last step; "none" stays at lr."""
    from flowkern.train.config import lr_factor

    config = TrainConfig(steps=104, warmup=4, lr_decay="cosine", lr_floor=0.1)
    assert [lr_factor(k, config) for k in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(4, config) == pytest.approx(1.0)
    assert lr_factor(54, config) == pytest.approx(0.1 + 0.9 * 0.5)           # half way: the mid-point
    assert lr_factor(104, config) == pytest.approx(0.1)
    assert lr_factor(200, TrainConfig(steps=104, warmup=4)) == 1.0
    trainer = _trainer(Regression(engine_net()), steps=6, warmup=0, lr=1e-3, lr_decay="cosine")
    lrs = [trainer.train_step()["lr"] for _ in range(6)]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (k + 1) / 6)) for k in range(6)])
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")
    with pytest.raises(ValueError, match="lr_floor"):
        TrainConfig(lr_floor=2.0)


def test_ema_matches_closed_form():
    net = engine_net()
    ema = EMA(net, (0.5, 0.999))
    p0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()                                    # update 1: β = min(d, 2/11)
    for d in (0.5, 0.999):
        beta = min(d, 2 / 11)
        for s, a in zip(ema.shadow[d], p0):
            torch.testing.assert_close(s, beta * a + (1 - beta) * (a + 1))
    model = ema.averaged(0.5)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(ValueError, match="not tracked"):
        ema.averaged(0.7)


def test_teacher_stays_frozen_in_eval_mode():
    class WithTeacher(Regression):
        def __init__(self, model, teacher):
            Method.__init__(self, model, teacher=teacher)
            self.nan_at = self.inf_grad_at = set()

    teacher = engine_net(seed=1)
    frozen = [p.clone() for p in teacher.parameters()]
    trainer = _trainer(WithTeacher(engine_net(), teacher), steps=2)
    trainer.fit()
    assert not trainer.method.teacher.training and trainer.method.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), frozen))
    assert all(p is not q for p in trainer.params for q in teacher.parameters())   # not optimised
    assert set(trainer.method.state_dict()) >= {f"teacher.{k}" for k in teacher.state_dict()}  # checkpointed


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="eval_ema"):
        TrainConfig(ema_decays=(0.9,), eval_ema=0.99)
    with pytest.raises(TypeError, match="method"):
        Trainer(object(), get_dataset("moons").sample, TrainConfig())


@pytest.mark.parametrize("optimizer", ["adamw", "radam"])
def test_exact_resume(tmp_path, optimizer):
    """12 steps in one go == 6 steps, checkpoint, a fresh trainer (other RNG state) resumes for 6: bit for bit."""
    straight = _trainer(FlowMatching(engine_net()), steps=12, optimizer=optimizer)
    straight.fit()
    first = _trainer(FlowMatching(engine_net()), steps=12, optimizer=optimizer)
    first.fit(6)
    first.save(tmp_path / "ck.pt")
    torch.manual_seed(999)                          # disturb every RNG before resuming
    second = _trainer(FlowMatching(engine_net(seed=5)), steps=12, optimizer=optimizer)
    second.load(tmp_path / "ck.pt")
    assert second.step_count == 6
    second.fit()
    assert second.losses == straight.losses
    for p, q in zip(second.method.state_dict().values(), straight.method.state_dict().values()):
        assert torch.equal(p, q)
    for d in (0.9, 0.99):
        for s, q in zip(second.ema.shadow[d], straight.ema.shadow[d]):
            assert torch.equal(s, q)


# -- auxiliary networks (a method's second network, e.g. a discriminator) -------------------------------------------
def _critic_trainer(steps=4, **kw):
    from helpers import WithCritic

    method = WithCritic(engine_net(), nan_critic_at=kw.pop("nan_critic_at", ()))
    return _trainer(method, steps=steps, batch=16, **kw)


def test_auxiliary_gets_only_its_own_gradient():
    """Each network's gradient is that of its own term alone (the model's term goes through the critic)."""
    trainer = _critic_trainer(grad_clip=None, warmup=0)
    method = trainer.method
    gen = torch.Generator()
    gen.set_state(trainer.data_generator.get_state())
    x0 = get_dataset("8gaussians").sample(16, gen)
    terms = method.terms(method.model, x0, 0)
    critic = list(method.critic.parameters())
    expected_critic = torch.autograd.grad(terms["critic"], critic, retain_graph=True)
    expected_model = torch.autograd.grad(terms["model"], trainer.params)
    record = trainer.train_step()
    for p, g in zip(critic, expected_critic):
        torch.testing.assert_close(p.grad, g)
    for p, g in zip(trainer.params, expected_model):
        torch.testing.assert_close(p.grad, g)
    assert record["critic_loss"] == pytest.approx(terms["critic"].item())
    assert all(id(p) not in {id(q) for q in critic} for p in trainer.params)


def test_auxiliary_optimizer_is_adam_scheduled_and_clipped():
    trainer = _critic_trainer(warmup=4, grad_clip=1e-3)
    opt = trainer.optimizers["critic"]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.5, 0.9)
    lrs = []
    for _ in range(3):
        record = trainer.train_step()
        lrs.append(opt.param_groups[0]["lr"])
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.method.critic.parameters()))
        assert norm.item() <= 1e-3 * (1 + 1e-5) and record["critic_grad_norm"] > 1e-3
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.75, 1e-2 * 1.0])   # the run's warm-up times its own lr


def test_auxiliary_nan_skips_the_step():
    trainer = _critic_trainer(steps=2, nan_critic_at=(2,), warmup=0)
    trainer.fit()
    critic = [p.detach().clone() for p in trainer.method.critic.parameters()]
    model = [p.detach().clone() for p in trainer.params]
    trainer.fit(3)
    assert trainer.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(trainer.method.critic.parameters(), critic))
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, model))
    trainer.fit(4)
    assert not all(torch.equal(p, q) for p, q in zip(trainer.method.critic.parameters(), critic))


def test_two_trainers_loading_one_state_dict_train_apart():
    """A state dict loaded from memory is copied: two trainers resumed from it run the same steps, and training
    them leaves the dict as it was."""
    first = _trainer(FlowMatching(engine_net()), steps=8)
    first.fit(4)
    state = first.state_dict()
    moments = [v.clone() for s in state["optimizers"]["model"]["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor)]
    runs = []
    for _ in range(2):
        t = _trainer(FlowMatching(engine_net(seed=3)), steps=8)
        t.load(state)
        t.fit()
        runs.append(t.losses)
    assert runs[0] == runs[1]
    after = [v for s in state["optimizers"]["model"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after))


def test_auxiliary_optimizer_resumes_exactly(tmp_path):
    straight = _critic_trainer(steps=6)
    straight.fit()
    first = _critic_trainer(steps=6)
    first.fit(3)
    first.save(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert set(state["optimizers"]) == {"model", "critic"} and state["optimizers"]["critic"]["state"]
    assert set(state["schedulers"]) == {"model", "critic"}
    second = _critic_trainer(steps=6)
    second.load(tmp_path / "ck.pt")
    second.fit()
    assert second.losses == straight.losses
    for p, q in zip(second.method.critic.parameters(), straight.method.critic.parameters()):
        assert torch.equal(p, q)


def test_loss_terms_are_checked():
    class Bad(Regression):
        def loss(self, net, x0, step):
            return {"critic": super().loss(net, x0, step)[0]}, {}

    with pytest.raises(TypeError, match="'model' term"):
        _trainer(Bad(engine_net()), steps=1).train_step()
