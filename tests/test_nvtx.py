"""NVTX ranges, through the `nvtx` package: every public op opens one range named after it (the outermost one
pushed by the call), every training phase has its range, pushes and pops balance, and nothing is pushed with
FLOWKERN_NVTX=0. Without the package a CPU PyTorch build marks nothing and warns once instead of failing."""
from __future__ import annotations

import pytest
import torch

import flowkern
import flowkern.flow_map as fm
from flowkern import _nvtx
from flowkern.ops import reference as _unused  # noqa: F401 - the ops package fully imported

@pytest.fixture
def ranges(monkeypatch, setenv):
    """The names pushed while FLOWKERN_NVTX=1, observed through the nvtx package; checks every push is popped."""
    nvtx = pytest.importorskip("nvtx", reason="the ranges are observed through the nvtx package")
    pushed, depth = [], [0]

    def push(name, **kw):
        assert kw.get("domain") == "flowkern"
        pushed.append((depth[0], name))
        depth[0] += 1

    def pop(**kw):
        depth[0] -= 1

    monkeypatch.setattr(nvtx, "push_range", push)
    monkeypatch.setattr(nvtx, "pop_range", pop)
    monkeypatch.setattr(_nvtx, "_marker", None)
    setenv("FLOWKERN_NVTX", "1")
    yield pushed
    assert depth[0] == 0, "unbalanced NVTX push/pop"


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X, W, B = _x(3, 8), _x(8, 8, seed=1), _x(8, seed=2)
Q = _x(1, 2, 5, 4)
T, S = torch.full((3,), 0.75), torch.full((3,), 0.25)
GAUSS, JOINT = fm.GaussianFlowMap(), fm.GaussianFlowMap(joint=True)

PUBLIC_OPS = {
    "flowkern.attention": lambda: flowkern.attention(Q, Q, Q),
    "flowkern.jvp": lambda: flowkern.jvp(lambda a: a * 2, (X,), (X,)),
    "flowkern.jvp_attention": lambda: flowkern.jvp_attention(Q, Q, Q, Q, Q, Q),
    "flowkern.ops.layer_norm": lambda: flowkern.ops.layer_norm(X, B, B),
    "flowkern.ops.rms_norm": lambda: flowkern.ops.rms_norm(X, B),
    "flowkern.ops.modulate": lambda: flowkern.ops.modulate(X, X, X),
    "flowkern.ops.gated_residual": lambda: flowkern.ops.gated_residual(X, B, X),
    "flowkern.ops.gelu": lambda: flowkern.ops.gelu(X),
    "flowkern.ops.silu": lambda: flowkern.ops.silu(X),
    "flowkern.ops.linear": lambda: flowkern.ops.linear(X, W, B),
    "flowkern.ops.time_embedding": lambda: flowkern.ops.time_embedding(T, S, 8),
    "flowkern.flow_map.jump": lambda: fm.jump(X, X, T, S),
    "flowkern.flow_map.evaluate": lambda: fm.evaluate(GAUSS, X, T[:, None], S[:, None]),
    "flowkern.flow_map.sample": lambda: fm.sample(GAUSS, X, steps=2),
    "flowkern.flow_map.sample_many": lambda: fm.sample_many(GAUSS, X, steps=(1, 2)),
    "flowkern.flow_map.semigroup_target": lambda: fm.semigroup_target(GAUSS, X, T, S * 2, S),
    "flowkern.divergence": lambda: flowkern.divergence(lambda x: x.sin(), X, method="exact"),
    "flowkern.ode_log_likelihood": lambda: flowkern.ode_log_likelihood(lambda x, t: -x, X, steps=2),
    "flowkern.flow_map_log_likelihood": lambda: flowkern.flow_map_log_likelihood(JOINT, X, steps=2),
}


@pytest.mark.parametrize("name", list(PUBLIC_OPS))
def test_every_public_op_opens_its_range(ranges, name):
    with flowkern.use_backend("torch"):
        PUBLIC_OPS[name]()
    assert ranges and ranges[0] == (0, name), ranges[:4]
    assert all(depth > 0 for depth, _ in ranges[1:]), "the op's range encloses everything it marks"


def test_explicit_jvp_forms_open_the_op_range(ranges):
    with flowkern.use_backend("torch"):
        flowkern.ops.silu_jvp(X, X)
        flowkern.ops.linear_jvp(X, X, W, B, weight_t=W)
    assert [name for _, name in ranges] == ["flowkern.ops.silu_jvp", "flowkern.ops.linear_jvp"]


def test_sampling_rounds_are_nested_ranges(ranges):
    with flowkern.use_backend("torch"):
        fm.sample_many(GAUSS, X, steps=(1, 2, 4))
    rounds = [name for depth, name in ranges if depth == 1 and ".round" in name]
    assert rounds == [f"flowkern.flow_map.sample.round{r}" for r in (1, 2, 3, 4)]   # the longest schedule's 4


def test_training_phases_have_ranges(ranges):
    from helpers import Regression, engine_net, one_thread

    from flowkern.data import get_dataset
    from flowkern.train import TrainConfig, Trainer

    with flowkern.use_backend("torch"), one_thread():
        config = TrainConfig(steps=2, batch=8, warmup=1, ema_decays=(0.9,), eval_ema=0.9)
        Trainer(Regression(engine_net()), get_dataset("8gaussians").sample, config, progress=False,
                device=torch.device("cpu")).fit()
    top = [name for depth, name in ranges if depth == 0]
    for phase in ("data", "loss", "backward", "optimizer", "ema"):
        assert top.count(f"flowkern.train.{phase}") == 2, (phase, top)


def test_nothing_is_pushed_when_disabled(ranges, setenv):
    setenv("FLOWKERN_NVTX", "0")
    with flowkern.use_backend("torch"):
        for fn in PUBLIC_OPS.values():
            fn()
    assert ranges == []


def test_without_nvtx_marker_a_cpu_build_warns_once_and_runs(monkeypatch, setenv):
    import builtins

    real_import = builtins.__import__

    def no_nvtx(name, *args, **kwargs):
        if name == "nvtx":
            raise ImportError("no nvtx")
        return real_import(name, *args, **kwargs)

    def stub(*args):
        raise RuntimeError("NVTX functions not installed")

    monkeypatch.setattr(builtins, "__import__", no_nvtx)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", stub)
    monkeypatch.setattr(_nvtx, "_marker", None)
    setenv("FLOWKERN_NVTX", "1")
    with pytest.warns(RuntimeWarning, match="no ranges are marked"):
        with flowkern.use_backend("torch"):
            out = fm.jump(X, X, T, S)
    torch.testing.assert_close(out, X + (S - T)[:, None] * X)
    with flowkern.use_backend("torch"):
        fm.jump(X, X, T, S)                                          # resolved once: no second warning
