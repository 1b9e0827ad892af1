"""The few-step likelihood report of `flowkern eval CKPT --nll` and `flowkern train f2d2` (docs/estimators.md).

All values are mean negative log-likelihoods in nats of held-out points x₀ (t = 0 is data, t = 1 noise):

    nll_steps[k]        −log p₀ from k jumps of the joint flow map (u, D), `flowkern.flow_map_log_likelihood`
                        (a model returning (u, D) only): log N(x₁; 0, I) − Σ_n (t_{n+1} − t_n)·D
    nll_ode             the model's own diagonal velocity u(x, t, t) through the PF-ODE (RK4, `ode_steps` steps,
                        exact divergence)
    teacher_nll_ode     the teacher's velocity the same way (methods with a teacher)
    nll_naive_steps[k]  the teacher integrated in k Euler steps with exact divergence: the naive few-step likelihood
    data_nll            −log p of the data's own density, where it has one

For image data (the 8×8 digits, 17 grey levels on [−1, 1]) the points are dequantised first (uniform noise over each
level's bin of width 1/8) and every value is also given in bits per dimension (`flowkern.bits_per_dim`), under the
same key with a "_bpd" suffix.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from flowkern.likelihood import bits_per_dim, flow_map_log_likelihood, ode_log_likelihood
from flowkern.methods._flow_map_batch import flow_map_velocity

STEPS = (1, 2, 4, 8)
ODE_STEPS = 64
# dataset name -> (levels, low, high) of its quantised pixels: bins of width (high − low)/levels around each level
IMAGE_BINS = {"digits": (17, -17 / 16, 17 / 16)}


def is_joint(model: Callable, x: torch.Tensor) -> bool:
    """Whether the model returns (u, D) (a joint flow map with a log-density rate)."""
    with torch.no_grad():
        t = torch.ones(1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        return isinstance(model(x[:1], t, t), tuple)


def dequantized(reference: torch.Tensor, dataset_name: str, seed: int = 0) -> torch.Tensor:
    """Image levels + uniform noise over their bins (unchanged for continuous data)."""
    if dataset_name not in IMAGE_BINS:
        return reference
    levels, low, high = IMAGE_BINS[dataset_name]
    width = (high - low) / levels
    noise = torch.rand(reference.shape, generator=torch.Generator().manual_seed(seed), dtype=reference.dtype)
    return reference + (noise.to(reference.device) - 0.5) * width


class _Progress:
    """One line per finished value on stderr, so a long report shows where it is."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done = enabled, total, 0

    def __call__(self, label: str, value: float, start: float) -> float:
        self.done += 1
        if self.enabled:
            print(f"  nll [{self.done}/{self.total}] {label}: {value:.4f} nats ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
        return value


@torch.no_grad()
def nll_report(model: Callable, reference: torch.Tensor, *, dataset_name: str, velocity: Callable | None = None,
               teacher_velocity: Callable | None = None, data_log_prob: Callable | None = None, steps=STEPS,
               ode_steps: int = ODE_STEPS, progress: bool = True) -> dict:
    """The report of the module docstring for the held-out points `reference` [N, ...].

    model: the trained flow map model(x, t, s) -> u or (u, D) (nll_steps only for (u, D)); velocity: its v(x, t)
    (nll_ode; None: left out, e.g. for a consistency function); teacher_velocity: the teacher's v(x, t)
    (teacher_nll_ode, nll_naive_steps); data_log_prob: the data's exact log-density (data_nll). Returns a
    JSON-ready dict.
    """
    x = dequantized(reference, dataset_name)
    joint = is_joint(model, x)
    total = (len(steps) if joint else 0) + (velocity is not None) \
        + (1 + len(steps) if teacher_velocity is not None else 0) + (data_log_prob is not None)
    report = _Progress(progress, total)
    result: dict = {}
    if joint:
        result["nll_steps"] = {}
        for k in steps:
            start = time.perf_counter()
            value = -flow_map_log_likelihood(model, x, k).mean().item()
            result["nll_steps"][str(k)] = report(f"{k}-step joint flow map", value, start)
    if velocity is not None:
        start = time.perf_counter()
        value = -ode_log_likelihood(velocity, x, steps=ode_steps, solver="rk4", divergence="exact").mean().item()
        result["nll_ode"] = report(f"model ODE (RK4, {ode_steps} steps)", value, start)
    if teacher_velocity is not None:
        start = time.perf_counter()
        value = -ode_log_likelihood(teacher_velocity, x, steps=ode_steps, solver="rk4",
                                    divergence="exact").mean().item()
        result["teacher_nll_ode"] = report(f"teacher ODE (RK4, {ode_steps} steps)", value, start)
        result["nll_naive_steps"] = {}
        for k in steps:
            start = time.perf_counter()
            value = -ode_log_likelihood(teacher_velocity, x, steps=k, solver="euler", divergence="exact").mean().item()
            result["nll_naive_steps"][str(k)] = report(f"teacher, {k} Euler steps", value, start)
    if data_log_prob is not None:
        start = time.perf_counter()
        result["data_nll"] = report("data density", -data_log_prob(reference).mean().item(), start)
    if dataset_name in IMAGE_BINS:
        result.update(_bits_per_dim(result, dataset_name, x[0].numel()))
    return result


def _bits_per_dim(result: dict, dataset_name: str, dim: int) -> dict:
    levels, low, high = IMAGE_BINS[dataset_name]

    def bpd(nll: float) -> float:
        return float(bits_per_dim(torch.tensor(-nll, dtype=torch.float64), dim, num_bins=levels, low=low, high=high))

    out = {}
    for key, value in result.items():
        out[f"{key}_bpd"] = {k: bpd(v) for k, v in value.items()} if isinstance(value, dict) else bpd(value)
    return out


def format_nll(result: dict) -> str:
    """The report as text lines (nats; bits/dim where given)."""
    def fmt(key, value):
        bpd = result.get(f"{key}_bpd")
        extra = "" if bpd is None else f" ({bpd:.3f} bits/dim)"
        return f"{value:.4f} nats{extra}"

    lines = []
    if "nll_steps" in result:
        lines.append("NLL, joint flow map:       " + "   ".join(
            f"{k} step{'s' if k != '1' else ''} {v:.4f}" for k, v in result["nll_steps"].items()))
    if "nll_naive_steps" in result:
        lines.append("NLL, teacher Euler (naive): " + "   ".join(
            f"{k} step{'s' if k != '1' else ''} {v:.4f}" for k, v in result["nll_naive_steps"].items()))
    labels = {"nll_ode": "NLL via the model's PF-ODE (RK4, exact divergence)",
              "teacher_nll_ode": "NLL via the teacher's PF-ODE (RK4, exact divergence)",
              "data_nll": "exact NLL of the data"}
    for key, label in labels.items():
        if key in result:
            lines.append(f"{label}: {fmt(key, result[key])}")
    return "\n".join(lines)


def method_nll_report(method, model, dataset, reference: torch.Tensor, *, n: int = 1000,
                      progress: bool = True) -> dict:
    """`nll_report` for a trained method on up to n held-out points: the model's ODE NLL where the method has a
    velocity (`method.velocity(model)`), the teacher's where it has one, the data's where it has a density."""
    velocity = method.velocity(model) if hasattr(method, "velocity") else None
    teacher = getattr(method, "teacher", None)
    return nll_report(model, reference[:n], dataset_name=dataset.name, velocity=velocity,
                      teacher_velocity=None if teacher is None else flow_map_velocity(teacher),
                      data_log_prob=dataset.log_prob if dataset.has_density else None, ode_steps=ODE_STEPS,
                      progress=progress)


def update_quality_json(path, result: dict) -> None:
    """Merge the likelihood keys of `result` into the run's quality.json (created if absent), atomically."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({k: v for k, v in result.items() if k != "rows"})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
