"""Few-step sample quality of a trained model against held-out data (SW₂, histogram KL, NLL where available)."""
from __future__ import annotations

import torch

from flowkern._validate import check_int
from flowkern.metrics import histogram_kl, sliced_wasserstein2

STEPS = (1, 2, 4, 8)


def kl_range(dataset) -> tuple[float, float, int]:
    """(low, high, bins) of the histogram grid: [−4.5, 4.5]², 32² bins for 2-D toys; [−1, 1], 16 bins per pixel."""
    return (-4.5, 4.5, 32) if dataset.dim == 2 else (-1.0, 1.0, 16)


def fixed_noise(dataset, n: int, seed: int = 0, device=None) -> torch.Tensor:
    return torch.randn(n, *dataset.shape, generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def draw(sampler, model, dataset, steps, *, n: int = 10_000, seed: int = 0) -> dict[int, torch.Tensor]:
    """{k: sampler(model, noise, k)} for each step count k in `steps`, from the same fixed noise (CPU tensors)."""
    device = next(model.parameters()).device
    noise = fixed_noise(dataset, check_int("n", n, minimum=1), seed, device)
    out = {}
    for k in steps:
        out[check_int("steps", k, minimum=1)] = sampler(model, noise, k).float().cpu()
    return out


def score(samples: dict[int, torch.Tensor], dataset, reference: torch.Tensor) -> dict[int, dict[str, float]]:
    """{k: {"sw2": SW₂(samples_k, reference), "kl": KL(reference ‖ samples_k)}} on the dataset's fixed grid."""
    low, high, bins = kl_range(dataset)
    flat = reference.reshape(len(reference), -1)
    return {k: {"sw2": sliced_wasserstein2(x.reshape(len(x), -1), flat),
                "kl": histogram_kl(flat, x.reshape(len(x), -1), low=low, high=high, bins=bins)}
            for k, x in samples.items()}


@torch.no_grad()
def ode_nll(velocity, reference: torch.Tensor, *, n: int = 1000, steps: int = 64) -> float:
    """Mean −log p₀ (nats) of up to n held-out points under the PF-ODE of `velocity(x, t)` (RK4, exact
    divergence), via `flowkern.ode_log_likelihood`."""
    from flowkern.likelihood import ode_log_likelihood

    x = reference[:n]
    return -ode_log_likelihood(velocity, x, steps=steps, solver="rk4", divergence="exact").mean().item()


def format_table(rows: list[tuple[str, dict[int, dict[str, float]]]], steps=STEPS) -> str:
    """A text table: one row per (label, scores), SW₂ and KL per step count."""
    head = f"{'model':<24}" + "".join(f"{f'SW2@{k}':>10}" for k in steps) + "".join(f"{f'KL@{k}':>9}" for k in steps)
    lines = [head, "-" * len(head)]
    for label, scores in rows:
        sw = "".join(f"{scores[k]['sw2']:10.4f}" if k in scores else f"{'':>10}" for k in steps)
        kl = "".join(f"{scores[k]['kl']:9.4f}" if k in scores else f"{'':>9}" for k in steps)
        lines.append(f"{label:<24}{sw}{kl}")
    return "\n".join(lines)
