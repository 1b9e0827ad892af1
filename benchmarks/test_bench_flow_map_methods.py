"""One training step of the flow-map methods (shortcut, psd, lsd, f2d2) on flowkern's MLPFlowMap against the same
step on its plain torch.nn twin (tests/nn_reference.py), and F2D2's fused Hutchinson probe against looped VJPs.

    pytest benchmarks/test_bench_flow_map_methods.py --benchmark-columns=median,iqr

Each case measures its baseline in the same run: `extra_info` holds step_ms of both, their ratio and, on a GPU, the
peak memory of both. The baseline is the same method (same times, targets and loss) with the network replaced by
its plain twin and, for f2d2, the teacher's divergence by one autograd VJP per stored probe. Batched time pairs
(`flowkern.flow_map.evaluate` against K separate calls) are in test_bench_flow_map.py.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from nn_reference import PlainMLPFlowMap

import flowkern.methods.f2d2 as f2d2_module
from flowkern import use_backend
from flowkern.methods import get_method
from flowkern.nn import MLPFlowMap

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKEND = "triton" if HAS_CUDA else "torch"
# (batch, dim, hidden, depth): a flattened-image-sized MLP on GPU, the toys' network on CPU
SHAPE = (1024, 3072, 1024, 4) if HAS_CUDA else (256, 2, 128, 3)


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _networks(joint: bool):
    batch, dim, hidden, depth = SHAPE
    torch.manual_seed(0)
    ours = MLPFlowMap(dim, hidden=hidden, depth=depth, divergence_head=joint).to(DEVICE)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    twin = PlainMLPFlowMap(dim, hidden=hidden, depth=depth, divergence_head=joint).to(DEVICE)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def looped_vjp_divergence(teacher, x, t, *, method="hutchinson", probes=1):
    """The usual way: stored Rademacher probes, one forward with graph, one VJP per probe."""
    z = (torch.randint(0, 2, (probes, *x.shape), device=x.device) * 2 - 1).to(x.dtype)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        v = teacher(x, t, t)
        est = [(torch.autograd.grad(v, x, z[k], retain_graph=k < probes - 1)[0] * z[k]).flatten(1).sum(1)
               for k in range(probes)]
    return v.detach(), torch.stack(est).mean(0)


def _step_ms(method, x0, reps: int = 5) -> tuple[float, float | None]:
    """(median ms of loss + backward, peak MiB above the resident state on a GPU)."""
    def step():
        method.model.zero_grad(set_to_none=True)
        loss, _ = method.loss(method.model, x0, 0)
        loss.backward()
        _sync()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return statistics.median(times), peak


@pytest.mark.parametrize("name", ["shortcut", "psd", "lsd", "f2d2"])
def test_training_step(benchmark, name, monkeypatch):
    cls = get_method(name)
    joint = getattr(cls, "divergence_head", False)
    ours, twin = _networks(joint)
    kwargs = {}
    if cls.needs_teacher:
        teacher, teacher_twin = _networks(False)
        kwargs = {"warm_start": False}
    x0 = torch.randn(SHAPE[0], SHAPE[1], device=DEVICE)
    with use_backend(BACKEND):
        fused = cls(ours, **({"teacher": teacher} if cls.needs_teacher else {}), **kwargs)
        ours_ms, ours_peak = _step_ms(fused, x0)
        plain = cls(twin, **({"teacher": teacher_twin} if cls.needs_teacher else {}), **kwargs)
        if cls.needs_teacher:
            monkeypatch.setattr(f2d2_module, "teacher_velocity_and_divergence", looped_vjp_divergence)
        plain_ms, plain_peak = _step_ms(plain, x0)
        monkeypatch.undo()
        benchmark.extra_info.update({
            "shape_B_D_hidden_depth": list(SHAPE), "backend": BACKEND,
            "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
            "step_ms": ours_ms, "baseline_step_ms": plain_ms, "speedup_vs_baseline": plain_ms / ours_ms,
            "peak_mib": ours_peak, "baseline_peak_mib": plain_peak,
        })
        benchmark.pedantic(lambda: _step_ms(fused, x0, reps=1), rounds=3, iterations=1, warmup_rounds=0)
