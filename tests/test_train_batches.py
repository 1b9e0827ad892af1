"""Batches drawn ahead (`flowkern.train.batches`): a method that pairs its noise with the data by minibatch OT gets
that noise from the engine, drawn and paired one step ahead in a worker thread, and the worker changes no number of
a run: the same losses and weights as drawing in the step, an exact resume with a batch in flight, a failed draw
raised at its own step."""
from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_ot_paired, engine_net, one_thread, torch_backend

from flowkern.data import get_dataset
from flowkern.methods import coupling
from flowkern.methods.consistency_training import ConsistencyTraining
from flowkern.methods.coupling import NoisePairing
from flowkern.methods.flow_matching import FlowMatching
from flowkern.methods.meanflow import MeanFlow
from flowkern.methods.scm import SCT
from flowkern.methods.self_distillation import EulerianSelfDistillation, LagrangianSelfDistillation
from flowkern.methods.shortcut import Shortcut
from flowkern.train import TrainConfig, Trainer
from flowkern.train.batches import Batches, noise_seed

BLOCK, BATCH = 16, 24    # a full block and a partial one per step

COUPLED = {
    "meanflow": lambda: MeanFlow(engine_net(), coupling="ot", coupling_block=BLOCK),
    "shortcut": lambda: Shortcut(engine_net(), coupling="ot", coupling_block=BLOCK),
    "lsd": lambda: LagrangianSelfDistillation(engine_net(), coupling="ot", coupling_block=BLOCK),
    "esd": lambda: EulerianSelfDistillation(engine_net(), coupling="ot", coupling_block=BLOCK),
    "ct": lambda: ConsistencyTraining(engine_net(), total_steps=100, sigma_data=0.5, coupling="ot",
                                      coupling_block=BLOCK),
    "sct": lambda: SCT(engine_net(), sigma_data=0.5, coupling="ot", coupling_block=BLOCK),
}


@pytest.fixture(autouse=True)
def _fast():
    with torch_backend(), one_thread():
        yield


def _trainer(method, data=None, steps=6, **kw):
    config = TrainConfig(steps=steps, batch=BATCH, lr=3e-3, warmup=2, ema_decays=(0.9,), eval_ema=0.9, **kw)
    return Trainer(method, data or get_dataset("8gaussians").sample, config, progress=False)


def _in_the_step(trainer):
    """The trainer with its batches drawn inside each step (no worker)."""
    b = trainer.batches
    trainer.batches = Batches(b.data, b.batch, rank=b.rank, world=b.world, device=b.device,
                              seed=trainer.config.seed, pairing=b.pairing, ahead=False)
    return trainer


def _assert_same_run(a, b):
    assert a.losses == b.losses
    for (name, p), q in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_drawing_ahead_changes_no_number(name):
    ahead = _trainer(COUPLED[name]())
    assert ahead.batches.ahead and ahead.batches.pairing == ahead.method.noise_pairing()
    ahead.fit()
    inline = _in_the_step(_trainer(COUPLED[name]()))
    assert not inline.batches.ahead
    inline.fit()
    _assert_same_run(ahead, inline)


def test_the_pairing_is_solved_in_the_worker_and_the_loss_gets_that_noise(monkeypatch):
    solved_in, seen = [], []
    solve = coupling.ot_permutation
    monkeypatch.setattr(coupling, "ot_permutation",
                        lambda x0, z: solved_in.append(threading.current_thread().name) or solve(x0, z))
    method = COUPLED["shortcut"]()
    loss = method.loss
    monkeypatch.setattr(method, "loss", lambda net, x0, step, noise=None: seen.append((x0, noise)) or
                        loss(net, x0, step, noise=noise))
    trainer = _trainer(method, steps=3)
    solved_in.clear()     # the first batch is drawn in the step: nothing is ahead of it yet
    seen.clear()
    trainer.batches._drop()
    trainer.batches = Batches(trainer.batches.data, BATCH, rank=0, world=1, device=trainer.device, seed=0,
                              pairing=method.noise_pairing())
    trainer.fit()
    # steps 2 and 3 (and the unused batch after the last) were paired in the worker, two blocks each
    assert solved_in[2:] and all(n.startswith("flowkern-batches") for n in solved_in[2:]), solved_in
    assert len(seen) == 3
    data, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(noise_seed(0, 0))
    pairing = NoisePairing(BLOCK)
    for x0, eps in seen:
        expected_x0 = get_dataset("8gaussians").sample(BATCH, data)
        assert torch.equal(x0, expected_x0)
        assert torch.equal(eps, pairing.draw(expected_x0, noise))
        assert_ot_paired(x0[:BLOCK], eps[:BLOCK])


def test_a_checkpoint_with_a_batch_in_flight_resumes_exactly(tmp_path):
    straight = _trainer(COUPLED["meanflow"](), steps=8)
    straight.fit()
    first = _trainer(COUPLED["meanflow"](), steps=8)
    first.fit(4)
    assert first.batches._next is not None           # the batch of step 5 is drawn already
    first.save(tmp_path / "ck.pt")
    torch.manual_seed(7)
    second = _trainer(MeanFlow(engine_net(seed=3), coupling="ot", coupling_block=BLOCK), steps=8)
    second.train_step()                              # a batch in flight on the resuming side too: dropped
    second.load(tmp_path / "ck.pt")
    second.fit()
    _assert_same_run(second, straight)


def test_a_checkpoint_without_a_noise_state_reseeds_it_deterministically(tmp_path):
    first = _trainer(COUPLED["lsd"](), steps=6)
    first.fit(3)
    state = first.state_dict()
    for rank_state in state["rng"]:
        del rank_state["noise"]                      # as written before the engine drew the noise
    runs = []
    for _ in range(2):
        t = _trainer(COUPLED["lsd"](), steps=6)
        t.load(state)
        t.fit()
        runs.append(t)
    _assert_same_run(*runs)


class _FailingAt:
    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, n, generator):
        self.calls += 1
        if self.calls - 1 == self.at:
            raise RuntimeError(f"draw {self.at} failed")
        return get_dataset("8gaussians").sample(n, generator)


def test_a_failed_draw_ahead_is_raised_at_its_own_step():
    trainer = _trainer(COUPLED["shortcut"](), data=_FailingAt(2))
    trainer.train_step()
    trainer.train_step()                             # the worker failed while this step ran
    with pytest.raises(RuntimeError, match="draw 2 failed"):
        trainer.train_step()
    assert trainer.step_count == 2


def test_a_method_without_pairing_draws_in_the_step():
    trainer = _trainer(FlowMatching(engine_net()))
    assert trainer.batches.pairing is None and not trainer.batches.ahead
    trainer.train_step()
    assert trainer.batches._next is None
    assert MeanFlow(engine_net(), coupling="independent").noise_pairing() is None


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_a_loss_checks_the_noise_it_is_given(name):
    method = COUPLED[name]()
    x0 = torch.randn(BATCH, 2)
    with pytest.raises(ValueError, match="noise"):
        method.loss(method.model, x0, 0, noise=torch.randn(BATCH, 3))
    with pytest.raises(TypeError, match="noise"):
        method.loss(method.model, x0, 0, noise=torch.randn(BATCH, 2, dtype=torch.float64))


def test_sct_noise_has_the_data_scale():
    pairing = SCT(engine_net(), sigma_data=0.25, coupling="ot", coupling_block=BLOCK).noise_pairing()
    assert pairing == NoisePairing(BLOCK, 0.25)
    eps = pairing.draw(torch.randn(4000, 2), torch.Generator().manual_seed(0))
    assert abs(float(eps.std()) - 0.25) < 0.01


def test_bad_pairings():
    with pytest.raises(ValueError, match="block"):
        NoisePairing(0)
    with pytest.raises(ValueError, match="scale"):
        NoisePairing(8, -1.0)
    with pytest.raises(TypeError, match="pairing"):
        Batches(get_dataset("moons").sample, 8, rank=0, world=1, device="cpu", seed=0, pairing="ot")
    with pytest.raises(TypeError, match="data"):
        Batches(None, 8, rank=0, world=1, device="cpu", seed=0)
    with pytest.raises(ValueError, match="batch"):
        Batches(get_dataset("moons").sample, 0, rank=0, world=1, device="cpu", seed=0)
    with pytest.raises(ValueError, match="rank"):
        Batches(get_dataset("moons").sample, 8, rank=2, world=2, device="cpu", seed=0)
