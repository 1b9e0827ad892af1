"""Flow-map algorithms built on the fused `jump`: batched multi-time `evaluate`, the few-step samplers `sample` and
`sample_many`, and the `semigroup_target` of self-distillation.

Convention (docs/conventions.md): t = 0 is data, t = 1 is noise, Φ(x, t, s) = x + (s − t)·u(x, t, s). A *model* is
any callable ``model(x, t, s)`` with x: [R, ...] and t, s: float32 tensors of shape [R] (float64 when x is float64),
returning u shaped like x, or a pair (u, D) with D: [R] for joint (state, log-density) flow maps,
D(x, t, s) = −(1/(s − t))·∫_t^s div v dτ, so that ℓ_s = ℓ_t + (s − t)·D.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from flowkern._nvtx import nvtx_range
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_int, check_tensor, check_time_values, check_times
from flowkern.flow_map.jump import _backend, _check_logp, _check_state, _jump, _needs_autograd, _time_dtype


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, s), got {type(model).__name__}")


def _check_max_batch(max_batch) -> int | None:
    return None if max_batch is None else check_int("max_batch", max_batch, minimum=1)


def _unpack(out, x: torch.Tensor):
    """A model's output -> (u, D or None), checked and cast: u to the dtype of x, D to [R]."""
    rows = x.shape[0]
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"model must return u or a pair (u, D), got a {type(out).__name__} of {len(out)}")
        u, d = out
    else:
        u, d = out, None
    if not isinstance(u, torch.Tensor) or u.shape != x.shape:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"model must return u shaped like its input x {tuple(x.shape)}, got {got}")
    if u.dtype != x.dtype:
        u = u.to(x.dtype)
    if d is not None:
        if not isinstance(d, torch.Tensor) or d.shape not in ((rows,), (rows, 1)):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"model's D (log-density rate) must have shape [R] = [{rows}], got {got}")
        d = d.reshape(rows)
    return u, d


def _call_model(model, x, t, s, max_batch: int | None):
    """One model call over the rows of x (chunks of at most `max_batch` rows) -> (u, D or None)."""
    rows = x.shape[0]
    if max_batch is None or rows <= max_batch:
        return _unpack(model(x, t, s), x)
    us, ds = [], []
    for i in range(0, rows, max_batch):
        j = min(rows, i + max_batch)
        u, d = _unpack(model(x[i:j], t[i:j], s[i:j]), x[i:j])
        us.append(u)
        ds.append(d)
    if any(d is None for d in ds) and not all(d is None for d in ds):
        raise ValueError("model returned (u, D) for some chunks and u alone for others")
    return torch.cat(us), (None if ds[0] is None else torch.cat(ds))


def standard_normal_logp(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) = −‖x‖²/2 − (d/2)·log 2π per sample of x [B, ...] (d elements each): the log-density at
    t = 1, [B] in float32 (float64 for float64 x)."""
    flat = x.reshape(x.shape[0], -1).to(accumulation_dtype(x.dtype))
    return -0.5 * (flat * flat).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _zero_logp(rows: int, x: torch.Tensor) -> torch.Tensor:
    """ℓ = 0 for `rows` rows: the log-densities then come out as Δℓ."""
    return torch.zeros(rows, dtype=accumulation_dtype(x.dtype), device=x.device)


def _require_joint(d, logp) -> None:
    if d is None and logp is not None:
        raise ValueError("logp was given but the model returned u alone: log-densities need a (u, D) model")


def _step(x, u, t, s, logp, d, backend: str, inplace: bool):
    """One fused jump -> (Φ, ℓ' or None): the state alone when logp is None, else the joint (state, ℓ) jump."""
    if logp is None:
        return _jump(x, u, t, s, None, None, backend, inplace), None
    if d is None:
        raise TypeError("likelihood=True needs a joint model returning a pair (u, D); the model returned u alone")
    return _jump(x, u, t, s, logp, d.to(logp.dtype), backend, inplace)


# ----------------------------------------------------------------------------------------------------- evaluate


def _check_pair_times(name: str, value, batch: int, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, value, ndim=2)
    if value.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B, K] with B = {batch}, got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; they must be on one device")
    value = value.to(_time_dtype(x))
    check_time_values(name, value)
    return value


def evaluate(model: Callable, x, t, s, *, logp=None, max_batch=None, return_u=False):
    """Φ(x, t_k, s_k) at K time pairs per sample, from ONE batched model call (docs/conventions.md).

    Each sample is repeated K times along the batch (row b·K + k holds (x_b, t[b, k], s[b, k])), the model runs
    once on the B·K rows (in chunks of at most `max_batch` rows when given, to bound memory), and one fused jump
    gives Φ = x + (s − t)·u. Embedding each distinct (t, s) once is the model's business: it receives the
    flattened times.

    Args:
        model: ``model(x, t, s)`` -> u, or (u, D) for a joint log-density flow map (see the module docstring).
        x: [B, ...]; t, s: [B, K] tensors in [0, 1] (K = 1 allowed; t = s gives Φ = x).
        logp: optional [B] log-densities at t, for (u, D) models (default 0: the result is then Δℓ).
        max_batch: most rows per model call (None: all B·K rows at once).
        return_u: also return u, [B, K, ...].
    Returns:
        Φ [B, K, ...]; for (u, D) models (Φ, ℓ) with ℓ = logp + (s − t)·D of shape [B, K]; with `return_u`, u is
        appended (a tuple). Differentiable (reverse and forward mode) through the model and the jump.
    """
    op = "flowkern.flow_map.evaluate"
    _check_model(model)
    _check_state("x", x)
    batch = x.shape[0]
    t = _check_pair_times("t", t, batch, x)
    s = _check_pair_times("s", s, batch, x)
    if s.shape != t.shape:
        raise ValueError(f"t and s must have one shape [B, K], got t {tuple(t.shape)} and s {tuple(s.shape)}")
    if logp is not None:
        _check_logp("logp", logp, batch, x)
    max_batch = _check_max_batch(max_batch)
    check_bool("return_u", return_u)
    k = t.shape[1]
    with nvtx_range(op):
        xr = x.unsqueeze(1).expand(batch, k, *x.shape[1:]).reshape(batch * k, *x.shape[1:])
        tf, sf = t.reshape(batch * k), s.reshape(batch * k)
        u, d = _call_model(model, xr, tf, sf, max_batch)
        _require_joint(d, logp)
        lp = None
        if d is not None:
            lp = _zero_logp(batch * k, x) if logp is None else logp.unsqueeze(1).expand(batch, k).reshape(batch * k)
        phi, lp = _step(xr, u, tf, sf, lp, d, _backend(op, x, lp), inplace=False)
        result = (phi.view(batch, k, *x.shape[1:]),)
        if lp is not None:
            result = result + (lp.view(batch, k),)
        if return_u:
            result = result + (u.view(batch, k, *x.shape[1:]),)
        return result[0] if len(result) == 1 else result


# ----------------------------------------------------------------------------------------------------- samplers


def uniform_schedule(steps: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """[steps + 1] times 1 = t_0 > t_1 > ... > t_steps = 0, evenly spaced (exact for power-of-two `steps`)."""
    steps = check_int("steps", steps, minimum=1)
    sched = torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps
    return sched.to(dtype)


def _check_schedule(name: str, sched, batch: int, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, sched)
    if sched.dim() not in (1, 2) or sched.shape[-1] < 2 or (sched.dim() == 2 and sched.shape[0] != batch):
        raise ValueError(f"{name} must have shape [N + 1] or [B, N + 1] (B = {batch}, N >= 1 steps), "
                         f"got {tuple(sched.shape)}")
    if sched.device != x.device:
        raise ValueError(f"{name} is on {sched.device} but noise is on {x.device}; they must be on one device")
    sched = sched.to(_time_dtype(x))
    check_time_values(name, sched)
    if not bool((sched[..., 1:] < sched[..., :-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing (sampling runs from noise, t = 1, to data, t = 0)")
    return sched


def _initial_logp(likelihood: bool, logp, noise: torch.Tensor):
    check_bool("likelihood", likelihood)
    if not likelihood:
        if logp is not None:
            raise ValueError("logp (the log-density of the noise) is only used with likelihood=True")
        return None
    if logp is None:
        return standard_normal_logp(noise)
    return _check_logp("logp", logp, noise.shape[0], noise)


def _sample_rounds(model, noise, schedules: list[torch.Tensor], logp0, max_batch, backend: str):
    """All schedules together: round r advances every schedule with a step r in one model call.

    The state holds the schedules back to back, longest first, so the schedules still running are always a prefix
    of the rows: round r calls the model once on that prefix and jumps it (in place when nothing needs autograd).
    """
    batch = noise.shape[0]
    steps = [sch.shape[-1] - 1 for sch in schedules]
    order = sorted(range(len(schedules)), key=lambda k: -steps[k])  # stable: ties keep the caller's order
    state = torch.cat([noise] * len(order))
    lstate = None if logp0 is None else torch.cat([logp0] * len(order))
    for r in range(steps[order[0]]):
        active = [k for k in order if steps[k] > r]
        rows = len(active) * batch
        t = torch.cat([schedules[k][..., r].expand(batch) for k in active])
        s = torch.cat([schedules[k][..., r + 1].expand(batch) for k in active])
        x = state[:rows]
        with nvtx_range(f"flowkern.flow_map.sample.round{r + 1}"):
            u, d = _call_model(model, x, t, s, max_batch)
            lrows = None if lstate is None else lstate[:rows]
            inplace = not _needs_autograd(state, u, lstate, None if lstate is None else d)
            new, lnew = _step(x, u, t, s, lrows, d, backend, inplace)
            if not inplace:
                state = torch.cat([new, state[rows:]])
                if lstate is not None:
                    lstate = torch.cat([lnew, lstate[rows:]])
    results = [None] * len(schedules)
    for pos, k in enumerate(order):
        xk = state[pos * batch:(pos + 1) * batch]
        results[k] = xk if lstate is None else (xk, lstate[pos * batch:(pos + 1) * batch])
    return results


def _run_schedules(op: str, model, x, schedules: list[torch.Tensor], logp, max_batch):
    """The sampler loop for checked inputs: jumps x (and ℓ = logp, if given) along every schedule; see
    `_sample_rounds`. The schedules may run either way in time (`flowkern.likelihood` runs data to noise)."""
    backend = _backend(op, x, logp)
    with nvtx_range(op):
        return _sample_rounds(model, x, schedules, logp, max_batch, backend)


def sample(model: Callable, noise, *, steps=None, schedule=None, likelihood=False, logp=None, max_batch=None):
    """Few-step sampling with a flow map: from t = 1 (noise) to t = 0 (data) in N jumps x ← Φ(x, t_i, t_{i+1}).

    Args:
        model: ``model(x, t, s)`` -> u, or (u, D) (see the module docstring).
        noise: [B, ...] states at t = 1.
        steps: N, for the evenly spaced schedule 1, 1 − 1/N, ..., 0 (`uniform_schedule`); or
        schedule: a strictly decreasing [N + 1] (or per-sample [B, N + 1]) tensor of times in [0, 1].
        likelihood: accumulate the joint log-density ℓ ← ℓ + (t_{i+1} − t_i)·D along the jumps (needs a (u, D)
            model): few-step log p₀ of the sample (F2D2).
        logp: the log-density of `noise` for likelihood=True (default log N(noise; 0, I), `standard_normal_logp`).
        max_batch: most rows per model call.
    Returns:
        x₀ [B, ...] in the dtype of `noise`; with likelihood=True, (x₀, log p₀) with log p₀ [B] float32.
    Each step is one model call and one fused jump (in place when nothing needs autograd). `sample_many` runs
    several step counts together and returns, on the 'torch' backend, bit for bit what this function returns
    (for a model whose rows do not depend on the batch they sit in).
    """
    op = "flowkern.flow_map.sample"
    _check_model(model)
    _check_state("noise", noise)
    if (steps is None) == (schedule is None):
        raise ValueError("pass exactly one of steps (an int) or schedule (a tensor of times from 1 to 0)")
    if steps is not None:
        schedule = uniform_schedule(steps, device=noise.device, dtype=_time_dtype(noise))
    schedule = _check_schedule("schedule", schedule, noise.shape[0], noise)
    logp0 = _initial_logp(likelihood, logp, noise)
    max_batch = _check_max_batch(max_batch)
    return _run_schedules(op, model, noise, [schedule], logp0, max_batch)[0]


def sample_many(model: Callable, noise, steps=None, *, schedules=None, likelihood=False, logp=None,
                max_batch=None):
    """Several samplers from the same noise at once: ``sample_many(model, noise, steps=(1, 2, 4, 8))``.

    Round r advances, in ONE batched model call, every schedule that has a step r (docs/conventions.md): schedules of
    1, 2, 4 and 8 steps take 8 model calls instead of 1 + 2 + 4 + 8 = 15 (the same 15·B rows of work, in fewer,
    larger calls). Round 1 starts all schedules from the same noise at t = 1.

    Args:
        model, noise, likelihood, logp, max_batch: as in `sample`.
        steps: step counts (default (1, 2, 4, 8)), each with the evenly spaced schedule; or
        schedules: a sequence of schedules as in `sample`.
    Returns:
        A list, in the order of `steps` (or `schedules`), of what `sample` returns for each: x₀ or (x₀, log p₀).
        On the 'torch' backend each entry equals `sample(model, noise, steps=n)` bit for bit when the model's
        rows do not depend on the batch they sit in (elementwise maths; a GEMM library may pick batch-size
        dependent kernels, which breaks that for some models).
    """
    op = "flowkern.flow_map.sample_many"
    _check_model(model)
    _check_state("noise", noise)
    if steps is not None and schedules is not None:
        raise ValueError("pass steps (step counts) or schedules (time tensors), not both")
    if schedules is None:
        steps = (1, 2, 4, 8) if steps is None else steps
        if isinstance(steps, numbers.Integral) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise TypeError(f"steps must be a non-empty sequence of ints, got {steps!r}")
        schedules = [uniform_schedule(check_int(f"steps[{i}]", n, minimum=1), device=noise.device,
                                      dtype=_time_dtype(noise)) for i, n in enumerate(steps)]
    elif not isinstance(schedules, Sequence) or isinstance(schedules, torch.Tensor) or len(schedules) == 0:
        raise TypeError("schedules must be a non-empty sequence of time tensors")
    schedules = [_check_schedule(f"schedules[{i}]", sch, noise.shape[0], noise) for i, sch in enumerate(schedules)]
    logp0 = _initial_logp(likelihood, logp, noise)
    max_batch = _check_max_batch(max_batch)
    return _run_schedules(op, model, noise, schedules, logp0, max_batch)


# ----------------------------------------------------------------------------------------------------- semigroup


def semigroup_target(model: Callable, x, t, r=None, s=None, *, logp=None, max_batch=None):
    """(Φ(Φ(x, t, r), r, s), Φ(x, t, s)): the two sides of the semigroup condition, in two model calls.

    The two calls that share the input x — u(x, t, r) and u(x, t, s) — run as ONE batched call of 2B rows; the
    second half Φ(·, r, s) depends on the first and is a second call (docs/conventions.md).

    Special case, the two-half-step target of shortcut models and F2D2: r = None takes the midpoint
    r = (t + s)/2, so the first output is two half-steps of size (s − t)/2 (the shortcut target, with
    u_target = (Φ(Φ(x, t, r), r, s) − x)/(s − t)), the second the one big step being trained.

    Args:
        model: ``model(x, t, s)`` -> u, or (u, D).
        x: [B, ...]; t, r, s: times in [0, 1] (numbers, 0-d or [B] tensors; r may be None: the midpoint).
        logp: optional [B] log-density at t for (u, D) models (default 0, so the log-densities are Δℓ).
        max_batch: most rows per model call.
    Returns:
        (two_step, direct), each [B, ...]; for (u, D) models each is a pair (Φ, ℓ). Not detached: wrap the call
        in ``torch.no_grad()`` for a stop-gradient target.
    """
    op = "flowkern.flow_map.semigroup_target"
    _check_model(model)
    _check_state("x", x)
    if s is None:
        raise TypeError("semigroup_target needs the end time s")
    batch = x.shape[0]
    tdt = _time_dtype(x)
    t = check_times("t", t, batch, device=x.device, dtype=tdt)
    s = check_times("s", s, batch, device=x.device, dtype=tdt)
    r = (t + s) * 0.5 if r is None else check_times("r", r, batch, device=x.device, dtype=tdt)
    if logp is not None:
        _check_logp("logp", logp, batch, x)
    max_batch = _check_max_batch(max_batch)
    with nvtx_range(op):
        both_x = torch.cat([x, x])
        both_t = torch.cat([t, t])
        both_s = torch.cat([r, s])
        u, d = _call_model(model, both_x, both_t, both_s, max_batch)
        _require_joint(d, logp)
        lp = None if d is None else (_zero_logp(batch, x) if logp is None else logp)
        backend = _backend(op, x, lp)
        first, first_lp = _step(both_x, u, both_t, both_s, None if lp is None else torch.cat([lp, lp]), d, backend,
                                inplace=False)
        x_r, direct = first[:batch], first[batch:]
        u2, d2 = _call_model(model, x_r, r, s, max_batch)
        if (d is None) != (d2 is None):
            raise ValueError("model returned (u, D) for one of its two calls and u alone for the other")
        two, two_lp = _step(x_r, u2, r, s, None if lp is None else first_lp[:batch], d2, backend, inplace=False)
        if lp is None:
            return two, direct
        return (two, two_lp), (direct, first_lp[batch:])
