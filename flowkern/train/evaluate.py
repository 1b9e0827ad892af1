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
    """{k: sampler(model, noise, k)} for each step count k in `steps`, from the same fixed noise (CPU tensors).
    A stochastic sampler (multistep consistency sampling) draws its noise from the global RNG seeded by (seed, k),
    forked, so the result is reproducible and the caller's RNG state is untouched."""
    device = next(model.parameters()).device
    noise = fixed_noise(dataset, check_int("n", n, minimum=1), seed, device)
    out = {}
    for k in steps:
        k = check_int("steps", k, minimum=1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 100_003 + k)
            out[k] = sampler(model, noise, k).float().cpu()
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


# -- the quality report of a run (`flowkern train` at the end, `flowkern eval`) ----------------------------------
LONG = 100   # the many-step column: fm and the teacher at 100 Euler steps


def report_steps(method, has_teacher: bool) -> tuple[int, ...]:
    """The table's step counts: 1/2/4/8, and 100 for fm or a run with a teacher row."""
    return (*STEPS, LONG) if method.name == "fm" or has_teacher else STEPS


def nll_unavailable(method, dataset) -> str | None:
    """Why the ODE NLL cannot be computed for `method` on `dataset` (None: it can). A joint flow map (f2d2) gives
    its likelihood report on any data (bits/dim for images)."""
    if getattr(method, "divergence_head", False):
        return None
    if not hasattr(method, "velocity"):
        return f"method {method.name!r} has no velocity field (the NLL needs the probability-flow ODE)"
    if dataset.dim != 2:
        return f"the exact-divergence NLL is computed for 2-D data only, not {dataset.name!r}"
    return None


def quality(method, model, dataset, samples: int, *, teacher=None, nll: bool = False, seed: int = 0,
            progress: bool = False, steps=None) -> dict:
    """The quality report: {"rows": [(label, scores)], "drawn": {label: {k: samples}}, "reference": held-out data,
    "steps": step counts, and "nll"/"data_nll" when `nll`}. Rows: the model (EMA) at `steps` (default
    `report_steps`), the frozen fm `teacher` (Euler) at 1 and 100 steps when given."""
    from tqdm.auto import tqdm

    columns = tuple(steps) if steps is not None else report_steps(method, teacher is not None)
    own = columns if steps is not None or method.name == "fm" else STEPS
    reference = dataset.held_out(samples)
    jobs = [(f"{method.name} (EMA)", method.sample, model, own)]
    if teacher is not None:
        from flowkern.methods.flow_matching import FlowMatching

        jobs.append(("teacher fm (Euler)", FlowMatching(teacher).sample, teacher, (1, LONG)))
    total = sum(len(s) for *_, s in jobs) + (1 if nll else 0)
    bar = tqdm(total=total, disable=not progress, desc="evaluation", dynamic_ncols=True, leave=False)
    rows, drawn = [], {}
    try:
        for label, sampler, net, counts in jobs:
            out = {}
            for k in counts:
                bar.set_postfix_str(f"{label} {k} step{'s' if k > 1 else ''}")
                out.update(draw(sampler, net, dataset, (k,), n=samples, seed=seed))
                bar.update(1)
            rows.append((label, score(out, dataset, reference)))
            drawn[label] = out
        result = {"rows": rows, "drawn": drawn, "reference": reference, "steps": columns}
        if nll and getattr(method, "divergence_head", False):
            from flowkern.train.nll import method_nll_report

            bar.set_postfix_str("likelihood report")
            result.update(method_nll_report(method, model, dataset, reference, progress=False))
            bar.update(1)
        elif nll:
            bar.set_postfix_str("NLL")
            result["nll"] = ode_nll(method.velocity(model), reference)
            if dataset.has_density:
                result["data_nll"] = -dataset.log_prob(reference).mean().item()
            bar.update(1)
    finally:
        bar.close()
    return result


def format_report(result: dict) -> str:
    """The table of `quality` and its NLL line."""
    lines = [format_table(result["rows"], result["steps"])]
    if "nll_ode" in result:
        from flowkern.train.nll import format_nll

        lines.append(format_nll(result))
    if "nll" in result:
        exact = f" (exact NLL of the data: {result['data_nll']:.4f})" if "data_nll" in result else ""
        lines.append(f"NLL via the PF-ODE (RK4, 64 steps, exact divergence): {result['nll']:.4f} nats{exact}")
    return "\n".join(lines)


def report_json(result: dict, **extra) -> dict:
    """quality.json: `extra` (e.g. steps, train_seconds), the NLLs, and {label: {k: scores}}."""
    kept = {k: v for k, v in result.items() if k not in ("rows", "drawn", "reference", "steps")}   # the NLLs
    return {**extra, **kept,
            "rows": {label: scores for label, scores in result["rows"]}}
