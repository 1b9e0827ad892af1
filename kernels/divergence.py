"""Hutchinson trace estimation: counter-based probes and the fused probe·(J·probe) reduction.

Probe k of sample b at element i (i indexes the flattened per-sample tensor, D elements) is a pure function of
(seed, stream, b, k, i): one Philox4x32-10 call with key = (seed mod 2³², seed >> 32) and counter
(c0, c1, c2, c3) = (i >> 2, b, k, stream) gives four 32-bit words r0..r3, and element i uses lane i & 3:

* rademacher: z = +1 if the top bit of r_lane is 0, else −1.
* gaussian:   Box–Muller on the uniforms u_j = ((r_j >> 8) + ½)·2⁻²⁴ ∈ (0, 1):
              lanes 0, 1 = √(−2 ln u0)·(cos 2πu1, sin 2πu1); lanes 2, 3 = √(−2 ln u2)·(cos 2πu3, sin 2πu3).

So probes are never stored: the reduction kernel regenerates the probe it multiplies, and `flowkern.testing`
rebuilds the same words in plain PyTorch (bit-exact for Rademacher). `csrc/hutchinson.cu` implements the same map.
Tiles are [ROWS, CB, 4]: ROWS (probe, sample) rows × CB Philox counters × 4 lanes, so each counter is evaluated
once and small per-sample sizes (2-D toys) still fill a program with many rows.
Plain pointer arithmetic (no block pointers): runs on Triton 3.6 and 3.9 and in the interpreter.
"""
import triton
import triton.language as tl

RADEMACHER: tl.constexpr = tl.constexpr(0)
GAUSSIAN: tl.constexpr = tl.constexpr(1)

# Globals read inside @triton.jit must be constexpr (the compiler refuses others; the interpreter does not check).
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)
INV_2_24: tl.constexpr = tl.constexpr(5.9604644775390625e-08)  # 2⁻²⁴
HALF_INV_2_24: tl.constexpr = tl.constexpr(2.9802322387695312e-08)  # 2⁻²⁵


@triton.jit
def _uniform(r):
    """uint32 → float32 in (0, 1): ((r >> 8) + ½)·2⁻²⁴, exact in float32."""
    return (r >> 8).to(tl.float32) * INV_2_24 + HALF_INV_2_24


@triton.jit
def probe_tile(seed, stream, sample, probe, counters, DIST: tl.constexpr):
    """Probe values (float32) for the [ROWS, CB, 4] tile of elements i = 4·counters[None, :, None] + lane.

    sample, probe: [ROWS] int64 (b and k of each row); counters: [CB] int32 Philox counters c0 = i >> 2.
    """
    zero = counters[None, :].to(tl.uint32) * 0  # [1, CB]
    c0 = counters[None, :].to(tl.uint32) + sample[:, None].to(tl.uint32) * 0  # [ROWS, CB]
    c1 = sample[:, None].to(tl.uint32) + zero  # [ROWS, CB]
    c2 = probe[:, None].to(tl.uint32) + zero  # [ROWS, CB]
    c3 = (c0 * 0 + stream).to(tl.uint32)  # [ROWS, CB] (stream may be specialised to the constant 1)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)  # each [ROWS, CB] uint32
    lane = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    if DIST == 0:  # rademacher: sign from the top bit of this lane's word
        w = tl.where(lane == 0, r0[:, :, None], tl.where(lane == 1, r1[:, :, None],
                     tl.where(lane == 2, r2[:, :, None], r3[:, :, None])))  # [ROWS, CB, 4] uint32
        z = tl.where((w >> 31) == 0, 1.0, -1.0)
    else:  # gaussian: two Box–Muller pairs per counter
        ra = tl.sqrt(-2.0 * tl.log(_uniform(r0)))  # [ROWS, CB]
        rb = tl.sqrt(-2.0 * tl.log(_uniform(r2)))
        ta = TWO_PI * _uniform(r1)
        tb = TWO_PI * _uniform(r3)
        n0 = ra * tl.cos(ta)
        n1 = ra * tl.sin(ta)
        n2 = rb * tl.cos(tb)
        n3 = rb * tl.sin(tb)
        z = tl.where(lane == 0, n0[:, :, None], tl.where(lane == 1, n1[:, :, None],
                     tl.where(lane == 2, n2[:, :, None], n3[:, :, None])))  # [ROWS, CB, 4] float32
    return z.to(tl.float32)


@triton.jit
def _tile_index(n_elem, n_rows, n_batch, ROWS: tl.constexpr, CB: tl.constexpr):
    """Rows (k·B + b), their sample b and probe k, counters, flat offsets and mask of this program's tile."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    counters = tl.program_id(1) * CB + tl.arange(0, CB)  # [CB]
    idx = counters[None, :, None].to(tl.int64) * 4 + tl.arange(0, 4)[None, None, :]  # [1, CB, 4] element i
    mask = (rows[:, None, None] < n_rows) & (idx < n_elem)  # [ROWS, CB, 4]
    offs = rows[:, None, None] * n_elem + idx  # [ROWS, CB, 4]
    return rows, rows % n_batch, rows // n_batch, counters, offs, mask


@triton.jit(do_not_specialize=["seed", "stream"])  # a new seed per call must not mean a new compile
def hutchinson_probes_kernel(out_ptr, n_elem, n_rows, n_batch, seed, stream, DIST: tl.constexpr,
                             ROWS: tl.constexpr, CB: tl.constexpr):
    """out[k, b, i] = probe(seed, stream, b, k, i) for the contiguous [K, B, D] tensor `out` (D = n_elem,
    n_rows = K·B). Grid: (cdiv(K·B, ROWS), cdiv(cdiv(D, 4), CB))."""
    _, sample, probe, counters, offs, mask = _tile_index(n_elem, n_rows, n_batch, ROWS, CB)
    z = probe_tile(seed, stream, sample, probe, counters, DIST)  # [ROWS, CB, 4]
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "stream"])
def hutchinson_reduce_kernel(jz_ptr, partial_ptr, n_elem, n_rows, n_batch, n_chunks, seed, stream,
                             DIST: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr):
    """partial[k·B + b, chunk] = Σ_{i in chunk} probe(seed, stream, b, k, i)·jz[k, b, i], accumulated in float32.

    jz: contiguous [K, B, D] (J·z from the batched JVP). The probe is regenerated here, never read back.
    Grid: (cdiv(K·B, ROWS), n_chunks = cdiv(cdiv(D, 4), CB)); the host sums the partials over chunks
    (deterministic: no atomics).
    """
    rows, sample, probe, counters, offs, mask = _tile_index(n_elem, n_rows, n_batch, ROWS, CB)
    jz = tl.load(jz_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [ROWS, CB, 4]
    z = probe_tile(seed, stream, sample, probe, counters, DIST)  # [ROWS, CB, 4]
    part = tl.sum(tl.sum(tl.where(mask, z * jz, 0.0), axis=2), axis=1)  # [ROWS]
    tl.store(partial_ptr + rows * n_chunks + tl.program_id(1), part, mask=rows < n_rows)
