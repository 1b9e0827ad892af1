"""`flowkern.divergence`: div fn(x) = tr(∂fn/∂x) per sample, by Hutchinson, Hutch++ or exactly, in forward mode
(docs/estimators.md)."""
from __future__ import annotations

import torch

from flowkern._dispatch import select_backend
from flowkern._nvtx import nvtx_range
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_int, check_tensor
from flowkern.divergence import probes as _probes

METHODS = ("hutchinson", "hutch++", "exact")
BATCHING = ("auto", "vmap", "stack")
_STREAM_HUTCHINSON, _STREAM_SKETCH, _STREAM_RESIDUAL = 0, 1, 2


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_output(out, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"divergence: fn must return a tensor shaped like x {tuple(x.shape)}, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"divergence: fn(x) must have the shape of x, {tuple(x.shape)}, got {tuple(out.shape)} "
                         "(the divergence of a map R^D -> R^D per sample)")


def _jvp_vmap(fn, x, args, tangents):
    def one(t):
        return torch.func.jvp(lambda x_: fn(x_, *args), (x,), (t,))

    out, jt = torch.func.vmap(one, randomness="same")(tangents)
    return out[0], jt


def _jvp_stack(fn, x, args, tangents):
    k, b = tangents.shape[0], x.shape[0]

    def rep(a):  # per-sample tensor arguments (first dim = batch) follow the stacked batch
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == b:
            return a.unsqueeze(0).expand(k, *a.shape).reshape(k * b, *a.shape[1:])
        return a

    xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    rargs = [rep(a) for a in args]
    out, jt = torch.func.jvp(lambda x_: fn(x_, *rargs), (xs,), (tangents.reshape(k * b, *x.shape[1:]),))
    _check_output(out, xs)
    return out[:b], jt.reshape(k, *x.shape)


def batched_jvp(fn, x: torch.Tensor, args: tuple, tangents: torch.Tensor, batching: str = "auto"):
    """(fn(x, *args), [J·t_k for each k]) for tangents [K, *x.shape] in one batched forward-mode pass.

    ``vmap``: `torch.func.vmap` over `torch.func.jvp` with x unbatched, so the primal runs once and only the tangent
    half is batched (cost about 1 + K forwards). ``stack``: x repeated K times along the batch (2K forwards' work;
    works with any autograd.Function that has a jvp rule but no vmap rule; tensor arguments whose first dim is the
    batch are repeated alongside). ``auto``: vmap, falling back to stack if vmap refuses fn.
    """
    if tangents.shape[0] == 1:  # one tangent: a plain JVP, no batching machinery
        out, jt = torch.func.jvp(lambda x_: fn(x_, *args), (x,), (tangents[0],))
        _check_output(out, x)
        return out, jt.unsqueeze(0)
    if batching in ("auto", "vmap"):
        try:
            out, jt = _jvp_vmap(fn, x, args, tangents)
        except Exception:
            if batching == "vmap":
                raise
        else:
            _check_output(out, x)
            return out, jt
    return _jvp_stack(fn, x, args, tangents)


def divergence(fn, x, *args, method="hutchinson", probes=1, distribution="rademacher", seed=None,
               return_output=False, batching="auto", chunk_size=None):
    """Per-sample divergence div fn(x) = tr(∂fn(x)_b/∂x_b), from forward-mode products only.

    Methods:
        ``hutchinson`` (default): (1/K)·Σ_k z_kᵀ(J z_k) with K = `probes` probes, unbiased. The probes come from a
            counter-based RNG keyed by (seed, sample, probe, element) inside a Triton (or CUDA) kernel, live only as
            the tangent of ONE batched JVP (primal once, K tangents: about 1 + K forwards, no activations kept), and
            the reduction z·(Jz) is a fused kernel that regenerates z instead of reading it. Variance per probe,
            S = (J + Jᵀ)/2: 2Σ_{i≠j} S_ij² (rademacher), 2‖S‖²_F (gaussian).
        ``hutch++``: Meyer et al. 2021, unbiased; K ≥ 3 products split in thirds: Q = orth(J·S) from K/3 sketch
            probes, tr(QᵀJQ) exactly, Hutchinson on (I − QQᵀ)J(I − QQᵀ) with the rest. Three JVP batches (two passes).
        ``exact``: the D basis-vector JVPs, batched `chunk_size` (default 64) at a time: for small D.

    Args:
        fn: callable, fn(x, *args) -> tensor shaped like x; sample b of the output depends on sample b of x only
            (the estimate is the trace of the per-sample Jacobian block). Any PyTorch ops (forward-mode AD).
        x: [B, ...] float16/bfloat16/float32/float64; D = x[0].numel().
        args: passed through to fn unchanged (closed over; under ``batching="stack"`` tensors whose first dim is
            B are repeated with x).
        probes: K ≥ 1 (≥ 3 for hutch++).
        distribution: ``"rademacher"`` (lower variance, recommended) or ``"gaussian"``.
        seed: int in [0, 2⁶³) or None (drawn from torch's default generator, so `torch.manual_seed` fixes it).
            Deterministic for a given seed on a given backend; identically distributed across backends (Triton
            and CUDA share the Philox map: identical Rademacher probes).
        return_output: also return fn(x, *args) (from the same pass).
        batching: ``"auto"`` | ``"vmap"`` | ``"stack"``, see `batched_jvp`.
        chunk_size: basis vectors per pass for ``exact``.
    Returns:
        div [B] in float32 (float64 for float64 x), and fn(x) when `return_output`. Differentiable with respect to
        fn's parameters when grad mode is on (the Triton reduction has a backward that regenerates the probes).

    Example:
        >>> div = flowkern.divergence(lambda x, t: net(x, t), x, t, probes=4, seed=0)
    """
    if not callable(fn):
        raise TypeError(f"divergence: fn must be callable, got {type(fn).__name__}")
    check_tensor("x", x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"divergence: x must be [B, ...] with B ≥ 1 and a non-empty sample, got {tuple(x.shape)}")
    _check_choice("method", method, METHODS)
    _check_choice("distribution", distribution, tuple(_probes.DISTRIBUTIONS))
    _check_choice("batching", batching, BATCHING)
    probes = check_int("probes", probes, minimum=3 if method == "hutch++" else 1)
    check_bool("return_output", return_output)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2 ** 63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)

    batch, dim = x.shape[0], x[0].numel()
    backend = select_backend("flowkern.divergence", x.device, x.dtype, supported=("triton", "cuda", "torch"))
    with nvtx_range("flowkern.divergence"):
        if method == "exact":
            out, div = _exact(fn, x, args, batch, dim, chunk_size or 64, batching)
        elif method == "hutchinson":
            out, div = _hutchinson(fn, x, args, batch, dim, probes, distribution, seed, backend, batching)
        else:
            out, div = _hutchpp(fn, x, args, batch, dim, probes, distribution, seed, backend, batching)
    return (div, out) if return_output else div


def _hutchinson(fn, x, args, batch, dim, k, distribution, seed, backend, batching):
    z = _probes.generate(backend, k, batch, dim, seed=seed, stream=_STREAM_HUTCHINSON, distribution=distribution,
                         dtype=x.dtype, device=x.device)
    out, jz = batched_jvp(fn, x, args, z.view(k, *x.shape), batching)
    kept = z if backend == "torch" else None  # triton/cuda regenerate the probes in the reduction
    del z
    est = _probes.reduce(backend, jz.reshape(k, batch, dim), kept, seed=seed, stream=_STREAM_HUTCHINSON,
                         distribution=distribution)
    return out, est.mean(0)


def _exact(fn, x, args, batch, dim, chunk, batching):
    total = torch.zeros(batch, dtype=accumulation_dtype(x.dtype), device=x.device)
    out = None
    for start in range(0, dim, chunk):
        n = min(chunk, dim - start)
        idx = torch.arange(n, device=x.device)
        basis = torch.zeros((n, batch, dim), dtype=x.dtype, device=x.device)
        basis[idx, :, start + idx] = 1
        out_c, jt = batched_jvp(fn, x, args, basis.view(n, *x.shape), batching)
        out = out_c if out is None else out
        total = total + jt.reshape(n, batch, dim)[idx, :, start + idx].to(total.dtype).sum(0)
    return out, total


def _hutchpp(fn, x, args, batch, dim, k, distribution, seed, backend, batching):
    acc = accumulation_dtype(x.dtype)
    m = min(k // 3, dim)
    n_g = k - 2 * m
    sketch = _probes.generate(backend, m, batch, dim, seed=seed, stream=_STREAM_SKETCH, distribution=distribution,
                              dtype=x.dtype, device=x.device)
    out, y = batched_jvp(fn, x, args, sketch.view(m, *x.shape), batching)
    q = torch.linalg.qr(y.reshape(m, batch, dim).permute(1, 2, 0).to(acc)).Q  # [B, D, m], orthonormal columns
    g = _probes.generate(backend, n_g, batch, dim, seed=seed, stream=_STREAM_RESIDUAL, distribution=distribution,
                         dtype=acc, device=x.device)  # [n_g, B, D]
    g = g - torch.einsum("bdm,bmj->jbd", q, torch.einsum("bdm,jbd->bmj", q, g))  # (I − QQᵀ)g
    tangents = torch.cat([q.permute(2, 0, 1), g], 0).to(x.dtype)  # [m + n_g, B, D]
    _, jt = batched_jvp(fn, x, args, tangents.view(m + n_g, *x.shape), batching)
    quad = (tangents.to(acc) * jt.reshape(m + n_g, batch, dim).to(acc)).sum(-1)  # [m + n_g, B]
    return out, quad[:m].sum(0) + quad[m:].mean(0)
