"""Host side of Hutchinson probes: generation and the fused probe·(J·probe) reduction on each backend.

* ``triton`` / ``cuda``: counter-based Philox probes (see `kernels/divergence.py`; `csrc/hutchinson.cu` is the same
  map, so the two backends give the same Rademacher probes bit for bit and Gaussian probes equal up to the last
  bits of the device's log/sin/cos). The reduction regenerates each probe instead of reading it back.
* ``torch``: probes from a `torch.Generator` seeded by (seed, stream); the reduction is a plain dot product.

Every backend is deterministic for a given (seed, stream); across backends the probes are identically distributed
(and, for triton vs cuda Rademacher, identical). Layout everywhere: [K, B, D] (probe, sample, flattened element).
"""
from __future__ import annotations

import torch

RADEMACHER, GAUSSIAN = 0, 1
DISTRIBUTIONS = {"rademacher": RADEMACHER, "gaussian": GAUSSIAN}

_TILE = 4096  # elements per program: ROWS rows × CB counters × 4 lanes
_MAX_CB = 512


def _kernels():
    from flowkern.kernels import divergence as hutchinson

    return hutchinson


def _tiling(n_rows: int, n_elem: int):
    """(ROWS, CB, grid) for a [n_rows, n_elem] problem: CB counters (4 elements each) per row, enough rows per
    program to fill about _TILE elements (many rows when samples are small, one row and many chunks when large)."""
    import triton

    cb = max(2, min(_MAX_CB, triton.next_power_of_2(triton.cdiv(n_elem, 4))))
    rows = max(1, min(triton.next_power_of_2(n_rows), _TILE // (4 * cb)))
    return rows, cb, (triton.cdiv(n_rows, rows), triton.cdiv(triton.cdiv(n_elem, 4), cb))


def _torch_generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + stream * 0x85EBCA77 + 1) % (2 ** 63))
    return g


def generate(backend: str, probes: int, batch: int, dim: int, *, seed: int, stream: int, distribution: str,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [probes, batch, dim] probe tensor of (seed, stream) on `backend`, in `dtype`."""
    dist = DISTRIBUTIONS[distribution]
    if backend == "torch":
        g = _torch_generator(seed, stream, device)
        shape = (probes, batch, dim)
        if dist == RADEMACHER:
            return (torch.randint(0, 2, shape, generator=g, device=device, dtype=torch.int8) * 2 - 1).to(dtype)
        return torch.randn(shape, generator=g, device=device, dtype=dtype)
    out = torch.empty((probes, batch, dim), dtype=dtype, device=device)
    if backend == "cuda":
        from flowkern import _cuda_ext

        _cuda_ext.load().hutchinson_probes_(out, seed, stream, dist)
        return out
    rows, cb, grid = _tiling(probes * batch, dim)
    _kernels().hutchinson_probes_kernel[grid](out, dim, probes * batch, batch, seed, stream, DIST=dist, ROWS=rows,
                                              CB=cb)
    return out


def _reduce_raw(backend: str, jz: torch.Tensor, seed: int, stream: int, dist: int) -> torch.Tensor:
    """[K, B] float32: Σ_i z[k, b, i]·jz[k, b, i] with z regenerated from (seed, stream) (triton / cuda)."""
    probes, batch, dim = jz.shape
    jz = jz.contiguous()
    if backend == "cuda":
        from flowkern import _cuda_ext

        return _cuda_ext.load().hutchinson_reduce(jz, seed, stream, dist)
    rows, cb, grid = _tiling(probes * batch, dim)
    n_chunks = grid[1]
    partial = torch.empty((probes * batch, n_chunks), dtype=torch.float32, device=jz.device)
    _kernels().hutchinson_reduce_kernel[grid](jz, partial, dim, probes * batch, batch, n_chunks, seed, stream,
                                              DIST=dist, ROWS=rows, CB=cb)
    return partial.sum(1).view(probes, batch)


class ProbeReduce(torch.autograd.Function):
    """est[k, b] = z_kbᵀ·jz[k, b] with z regenerated from (seed, stream); backward regenerates z again."""

    @staticmethod
    def forward(jz, backend, seed, stream, dist):
        return _reduce_raw(backend, jz, seed, stream, dist)

    @staticmethod
    def setup_context(ctx, inputs, output):
        jz, backend, seed, stream, dist = inputs
        ctx.meta = (backend, seed, stream, dist, jz.shape, jz.dtype)

    @staticmethod
    def backward(ctx, grad):
        backend, seed, stream, dist, shape, dtype = ctx.meta
        name = "rademacher" if dist == RADEMACHER else "gaussian"
        z = generate(backend, *shape, seed=seed, stream=stream, distribution=name, dtype=torch.float32,
                     device=grad.device)
        return (z * grad[..., None]).to(dtype), None, None, None, None


def reduce(backend: str, jz: torch.Tensor, probes: torch.Tensor | None, *, seed: int, stream: int,
           distribution: str) -> torch.Tensor:
    """Per-probe estimates [K, B] (float32, float64 for float64 inputs) of z_kbᵀ(J z_kb).

    `probes` is the tensor from `generate` on the torch backend (a Generator cannot be rewound cheaply) and is
    ignored (may be None) on triton/cuda, which regenerate it."""
    if backend == "torch":
        acc = torch.float64 if jz.dtype == torch.float64 else torch.float32
        return (probes.to(acc) * jz.to(acc)).sum(-1)
    return ProbeReduce.apply(jz, backend, seed, stream, DISTRIBUTIONS[distribution])
