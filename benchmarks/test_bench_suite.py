"""The benchmark table: every public op and one training step of every registered method, each beside its baseline.

One row per case, measured in the same run as its baseline (`record` in conftest.py): the median time, TFLOP/s or
GB/s where the work is counted, peak memory, and `speedup` = baseline time / flowkern time, the figure the
regression gate compares. Baselines:

* the layer ops and attention: the stock PyTorch way (`torch.func.jvp` over the plain functional op; the math-SDPA
  JVP; `F.scaled_dot_product_attention`);
* the flow-map jump: the plain tensor expression x + (s − t)·u;
* divergence, likelihoods and training steps: the same call on flowkern's PyTorch reference backend;
* the step with minibatch-OT noise: the same step solving the pairing inside it instead of one step ahead.

Shapes: a DiT-XL-like layer (2048 rows × 1152 features, bf16) and B=1, H=16, N=2048, D=64 attention on a GPU;
`--smoke` makes every shape tiny and runs on the CPU in float32 (the reference backend on both sides).

    pytest benchmarks/test_bench_suite.py --benchmark-json=bench.json [--smoke]
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flowkern
from flowkern import ops
from flowkern._measure import attention_jvp_flops
from flowkern.baselines import math_sdpa_jvp
from flowkern.methods import method_names


def _size(smoke: bool) -> dict:
    if smoke:
        return dict(rows=8, features=16, heads=2, seq=32, head_dim=16, batch=16, hidden=16, dtype=torch.float32)
    return dict(rows=2048, features=1152, heads=16, seq=2048, head_dim=64, batch=1024, hidden=512,
                dtype=torch.bfloat16)


def _randn(size, device, *shape, dtype=None):
    return torch.randn(*shape, device=device, dtype=dtype or size["dtype"])


def _rows_bytes(size, tensors: int) -> int:
    return tensors * size["rows"] * size["features"] * torch.finfo(size["dtype"]).bits // 8


# ------------------------------------------------------------------------------------------------ layer ops

def _layer_cases(size, device):
    """name -> (flowkern call, baseline call, bytes the fused pass must move)."""
    n, f = size["rows"], size["features"]
    x, x_t, y = (_randn(size, device, n, f) for _ in range(3))
    w, b = _randn(size, device, f), _randn(size, device, f)
    shift, scale, gate = (_randn(size, device, n, f) for _ in range(3))
    weight = _randn(size, device, f, f)
    jvp = torch.func.jvp
    return {
        "layer_norm": (lambda: ops.layer_norm_jvp(x, x_t, w, b),
                       lambda: jvp(lambda a: F.layer_norm(a, (f,), w, b), (x,), (x_t,)), _rows_bytes(size, 4)),
        "rms_norm": (lambda: ops.rms_norm_jvp(x, x_t, w),
                     lambda: jvp(lambda a: F.rms_norm(a, (f,), w, 1e-6), (x,), (x_t,)), _rows_bytes(size, 4)),
        "modulate": (lambda: ops.modulate_jvp(x, shift, scale, x_t),
                     lambda: jvp(lambda a: F.layer_norm(a, (f,), eps=1e-6) * (1 + scale) + shift, (x,), (x_t,)),
                     _rows_bytes(size, 6)),
        "gated_residual": (lambda: ops.gated_residual_jvp(x, gate, y, x_t, None, x_t),
                           lambda: jvp(lambda a, c: a + gate * c, (x, y), (x_t, x_t)), _rows_bytes(size, 7)),
        "gelu": (lambda: ops.gelu_jvp(x, x_t), lambda: jvp(F.gelu, (x,), (x_t,)), _rows_bytes(size, 4)),
        "silu": (lambda: ops.silu_jvp(x, x_t), lambda: jvp(F.silu, (x,), (x_t,)), _rows_bytes(size, 4)),
        "linear": (lambda: ops.linear_jvp(x, x_t, weight, b),
                   lambda: jvp(lambda a: F.linear(a, weight, b), (x,), (x_t,)), None),
    }


LAYER_OPS = ["layer_norm", "rms_norm", "modulate", "gated_residual", "gelu", "silu", "linear"]


@pytest.mark.parametrize("op", LAYER_OPS)
def test_layer_op(benchmark, record, smoke, device, op):
    size = _size(smoke)
    fused, baseline, moved = _layer_cases(size, device)[op]
    flops = 4.0 * size["rows"] * size["features"] ** 2 if op == "linear" else None   # two GEMMs (y, ẏ)
    benchmark.group = "layer ops (with tangent)"
    benchmark.extra_info.update(shape=[size["rows"], size["features"]], dtype=str(size["dtype"]))
    record(benchmark, fused, device, baseline=baseline, flops=flops, bytes_moved=moved)


def test_time_embedding(benchmark, record, smoke, device):
    size = _size(smoke)
    t = torch.rand(size["rows"], device=device)
    s, t_t = t * 0.5, torch.ones_like(t)

    def fused():
        return ops.time_embedding_jvp(t, s, size["features"], t_t)

    def reference():
        with flowkern.use_backend("torch"):
            return ops.time_embedding_jvp(t, s, size["features"], t_t)

    benchmark.group = "layer ops (with tangent)"
    record(benchmark, fused, device, baseline=reference)


# ------------------------------------------------------------------------------------------------ attention

def _qkv(size, device):
    shape = (1, size["heads"], size["seq"], size["head_dim"])
    return [_randn(size, device, *shape) for _ in range(6)]


def test_attention_forward(benchmark, record, smoke, device):
    size = _size(smoke)
    q, k, v = _qkv(size, device)[:3]
    flops = attention_jvp_flops(1, size["heads"], size["seq"], size["seq"], size["head_dim"]) / 3   # 2 of 6 GEMMs
    benchmark.group = "attention"
    record(benchmark, lambda: flowkern.attention(q, k, v), device,
           baseline=lambda: F.scaled_dot_product_attention(q, k, v), flops=flops)


def test_jvp_attention(benchmark, record, smoke, device):
    size = _size(smoke)
    args = _qkv(size, device)
    benchmark.group = "attention"
    record(benchmark, lambda: flowkern.jvp_attention(*args), device, baseline=lambda: math_sdpa_jvp(*args),
           flops=attention_jvp_flops(1, size["heads"], size["seq"], size["seq"], size["head_dim"]))


# ----------------------------------------------------------------------------------- flow maps and densities

def test_flow_map_jump(benchmark, record, smoke, device):
    size = _size(smoke)
    x, u = _randn(size, device, size["rows"], size["features"]), _randn(size, device, size["rows"], size["features"])
    t = torch.rand(size["rows"], device=device)
    s = t * 0.5
    benchmark.group = "flow maps and densities"
    record(benchmark, lambda: flowkern.flow_map.jump(x, u, t, s), device,
           baseline=lambda: x + ((s - t)[:, None] * u.float()).to(x.dtype), bytes_moved=_rows_bytes(size, 3))


def _mlp(size, device, seed=0, divergence_head=False):
    torch.manual_seed(seed)
    return flowkern.nn.MLPFlowMap(2, hidden=size["hidden"], depth=2, time_dim=16,
                                  divergence_head=divergence_head).to(device)


def _reference(fn):
    def run():
        with flowkern.use_backend("torch"):
            return fn()

    return run


@pytest.mark.parametrize("case", ["divergence", "ode_log_likelihood", "flow_map_log_likelihood"])
def test_density(benchmark, record, smoke, device, case):
    size = _size(smoke)
    model = _mlp(size, device)
    x = torch.randn(size["batch"], 2, device=device)
    with torch.no_grad():
        if case == "divergence":
            def velocity(z):
                t = torch.full((z.shape[0],), 0.5, device=z.device)
                return model(z, t, t)

            def fn():
                return flowkern.divergence(velocity, x, probes=4, seed=0)
        elif case == "ode_log_likelihood":
            def fn():
                return flowkern.ode_log_likelihood(lambda z, tt: model(z, tt, tt), x, steps=4)
        else:
            joint = flowkern.flow_map.GaussianFlowMap(joint=True)

            def fn():
                return flowkern.flow_map_log_likelihood(joint, x, steps=4)
        benchmark.group = "flow maps and densities"
        record(benchmark, fn, device, baseline=_reference(fn))


# ------------------------------------------------------------------------------------------ training steps

def _method(name, size, device):
    from flowkern.methods import get_method

    cls = get_method(name)
    model = _mlp(size, device, divergence_head=getattr(cls, "divergence_head", False))
    teacher = _mlp(size, device, seed=1)
    kwargs = {"fm": {}, "pd": dict(teacher=teacher, total_steps=1000), "cd": dict(teacher=teacher, sigma_data=0.5),
              "ct": dict(sigma_data=0.5, total_steps=1000), "ctm": dict(teacher=teacher, sigma_data=0.5),
              "meanflow": {}, "sct": dict(sigma_data=0.5), "scd": dict(teacher=teacher, sigma_data=0.5),
              "shortcut": {}, "lsd": {}, "esd": {}, "psd": {}, "f2d2": dict(teacher=teacher)}[name]
    return cls(model, **kwargs)


@pytest.mark.parametrize("method", method_names())
def test_training_step(benchmark, record, smoke, device, method):
    """One optimiser step of the engine (loss, backward, optimiser, EMA) on an MLP flow map and 2-D data."""
    from flowkern.data import get_dataset
    from flowkern.train import TrainConfig, Trainer

    size = _size(smoke)
    config = TrainConfig(steps=10**6, batch=size["batch"], warmup=1, ema_decays=(0.99,), eval_ema=0.99, bf16=False)
    trainer = Trainer(_method(method, size, device), get_dataset("8gaussians").sample, config, progress=False,
                      device=device)
    benchmark.group = "training step (MLP flow map, 2-D data)"
    benchmark.extra_info.update(method=method, batch=size["batch"])
    record(benchmark, trainer.train_step, device, baseline=_reference(trainer.train_step))


def test_training_step_ot_pairing(benchmark, record, smoke, device):
    """A shortcut-model step with minibatch-OT noise on image-sized rows (3·32·32 features; 64 with --smoke): the
    pairing solved one step ahead by the engine's worker thread against the same step solving it inside the step."""
    from flowkern.methods.shortcut import Shortcut
    from flowkern.train import TrainConfig, Trainer
    from flowkern.train.batches import Batches

    size = _size(smoke)
    dim = 64 if smoke else 3 * 32 * 32

    def rows(n, generator):
        return torch.randn(n, dim, generator=generator)

    def trainer(ahead: bool) -> Trainer:
        torch.manual_seed(0)
        model = flowkern.nn.MLPFlowMap(dim, hidden=size["hidden"], depth=2, time_dim=16)
        config = TrainConfig(steps=10**6, batch=size["batch"], warmup=1, ema_decays=(0.99,), eval_ema=0.99,
                             bf16=False)
        t = Trainer(Shortcut(model, coupling="ot"), rows, config, progress=False, device=device)
        t.batches = Batches(rows, config.batch, rank=0, world=1, device=t.device, seed=0,
                            pairing=t.method.noise_pairing(), ahead=ahead)
        return t

    benchmark.group = "training step (MLP flow map, image-sized rows, OT pairing)"
    benchmark.extra_info.update(method="shortcut", batch=size["batch"], features=dim, coupling_block=256)
    record(benchmark, trainer(True).train_step, device, baseline=trainer(False).train_step)
