"""flowkern.nn.MLPFlowMap against a plain-PyTorch twin with the same weights: outputs, tangents, gradients."""
from __future__ import annotations

import pytest
import torch
from nn_reference import PlainMLPFlowMap, randomize
from helpers import assert_all_close, check_network_against_twin

import flowkern
from flowkern.nn import MLPFlowMap

CONFIGS = [{"time_mode": "ts", "divergence_head": False}, {"time_mode": "t_delta", "divergence_head": True}]


def make_pair(dtype, *, dim=3, hidden=16, depth=2, time_dim=8, time_scale=3.0, **cfg):
    model = randomize(MLPFlowMap(dim, hidden, depth, time_dim, time_scale=time_scale, **cfg).to(dtype))
    twin = PlainMLPFlowMap(dim, hidden, depth, time_dim, time_scale=time_scale, **cfg).to(dtype)
    twin.load_state_dict(model.state_dict())
    return model, twin


def inputs(dtype, batch=5, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, x_t = (torch.randn(batch, dim, generator=gen, dtype=dtype) for _ in range(2))
    t, s = (torch.rand(batch, generator=gen, dtype=dtype) for _ in range(2))
    t_t, s_t = (torch.randn(batch, generator=gen, dtype=dtype) for _ in range(2))
    return (x, t, s), (x_t, t_t, s_t)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["ts", "t_delta+div"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_plain_twin(cfg, dtype):
    model, twin = make_pair(dtype, **cfg)
    primals, tangents = inputs(dtype)
    with flowkern.use_backend("torch"):
        check_network_against_twin(model, twin, primals, tangents, atol=1e-10 if dtype == torch.float64 else 2e-4)


@pytest.mark.interpreter
def test_triton_interpreter_fused_path_matches_torch_func_jvp(device):
    """The fused Triton kernels (interpreter on CPU, compiled on a GPU) against torch.func.jvp of the plain twin."""
    model, twin = (m.to(device) for m in make_pair(torch.float32, divergence_head=True))
    primals, tangents = (tuple(a.to(device) for a in group) for group in inputs(torch.float32, batch=3))
    with flowkern.use_backend("triton"):
        check_network_against_twin(model, twin, primals, tangents, atol=2e-4)


def test_init_is_zero_and_time_embedding_width():
    model = MLPFlowMap(2, hidden=32, depth=3, time_dim=64, divergence_head=True)
    assert model.time.fc1.in_features == 128  # [cos, sin] of 32 frequencies for each of t and s
    x = torch.randn(4, 2)
    with flowkern.use_backend("torch"):
        u, d = model(x, torch.rand(4), torch.rand(4))
    assert u.shape == (4, 2) and d.shape == (4,)
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(d, torch.zeros_like(d))


def test_scalar_times_broadcast():
    model = randomize(MLPFlowMap(3, 16, 1, 8, time_scale=3.0))
    x = torch.randn(4, 3)
    with flowkern.use_backend("torch"):
        full = model(x, torch.full((4,), 0.5), torch.full((4,), 0.25))
        assert torch.equal(model(x, 0.5, torch.tensor(0.25)), full)


def test_autocast_bf16_keeps_times_float32():
    model, twin = make_pair(torch.float32)
    (x, t, s), (x_t, t_t, s_t) = inputs(torch.float32)
    seen = []
    hook = model.time.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with flowkern.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out, tan = flowkern.nn.jvp(model, (x, t, s), (x_t, t_t, s_t))
    hook.remove()
    assert seen == [torch.float32]  # the embedding itself: float32 under autocast (the Linear then casts)
    assert out.dtype == torch.bfloat16 and tan.dtype == torch.bfloat16
    ref, ref_t = torch.func.jvp(twin, (x, t, s), (x_t, t_t, s_t))
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() < 0.05 * scale
    assert (tan.float() - ref_t).abs().max().item() < 0.05 * ref_t.abs().max().item()


def test_dropout_is_active_in_training_only():
    model = randomize(MLPFlowMap(3, 16, 2, 8, dropout=0.5, time_scale=3.0))
    (x, t, s), _ = inputs(torch.float32)
    with flowkern.use_backend("torch"):
        assert not torch.equal(model(x, t, s), model(x, t, s))
        model.eval()
        assert torch.equal(model(x, t, s), model(x, t, s))


@pytest.mark.parametrize("kwargs, err, match", [
    ({"time_dim": 7}, ValueError, "time_dim must be even"),
    ({"time_mode": "delta"}, ValueError, "time_mode"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"depth": 0}, ValueError, "depth"),
    ({"divergence_head": 1}, TypeError, "divergence_head"),
    ({"hidden": 2.5}, TypeError, "hidden"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        MLPFlowMap(2, **kwargs)


@pytest.mark.parametrize("case, err, match", [
    ("t_half", TypeError, "t must be a float32"),
    ("s_int", TypeError, "s must be a float32"),
    ("t_shape", ValueError, r"t must be a scalar or have shape \[B\]"),
    ("t_2d", ValueError, r"t must be a scalar or have shape \[B\]"),
    ("t_nan_number", ValueError, "t must be finite"),
    ("x_shape", ValueError, r"x must have shape \[B, dim\]"),
    ("x_dtype", TypeError, "x has dtype torch.float64"),
    ("x_list", TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise(case, err, match):
    model = MLPFlowMap(3, 16, 1, 8)
    x, t, s = torch.randn(4, 3), torch.rand(4), torch.rand(4)
    args = {"t_half": (x, t.half(), s), "s_int": (x, t, torch.ones(4, dtype=torch.int64)),
            "t_shape": (x, torch.rand(5), s), "t_2d": (x, t[:, None], s), "t_nan_number": (x, float("nan"), s),
            "x_shape": (torch.randn(4, 2), t, s), "x_dtype": (x.double(), t, s), "x_list": ([[0.0] * 3], t, s)}[case]
    with flowkern.use_backend("torch"), pytest.raises(err, match=match):
        model(*args)


def test_float64_times_with_float32_model():
    """float64 times are accepted (embedding in float64, then cast to the parameters' dtype)."""
    model, twin = make_pair(torch.float32)
    (x, t, s), _ = inputs(torch.float32)
    with flowkern.use_backend("torch"):
        assert_all_close(model(x, t.double(), s.double()), twin(x, t, s), "output", atol=2e-4)
