"""Host launchers of the fused-op Triton kernels: allocate outputs, compute grids, launch. No maths here.

Same signatures as flowkern/ops/torch_launch.py. Row ops take contiguous [rows, D] tensors and [n_groups, D]
parameters; one program per row with the whole row in one BLOCK_D = next_pow2(D) block.
"""
from __future__ import annotations

import torch
import triton

ACTIVATION_BLOCK = 1024
BWD_PROGRAMS = 1024  # target grid size of the row backward kernels (partial sums per program)


def _kernels(name: str):
    # Imported on first use: importing Triton kernels decides interpreter vs compiled mode for the process.
    import importlib

    return importlib.import_module(f"flowkern.kernels.{name}")


def _row_meta(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK_D": block, "num_warps": min(16, max(1, block // 256))}


def _stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer for an argument the kernel will not read (its flag is off)."""
    return fallback if t is None else t


def norm_fwd(x, w, b, x_t, w_t, b_t, *, is_rms: bool, one_plus: bool, group: int, eps: float):
    rows, n_cols = x.shape
    y = torch.empty_like(x)
    y_t = torch.empty_like(x) if x_t is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    _kernels("norms").norm_fwd_kernel[(rows,)](
        x, _or(x_t, x), _or(w, x), _or(b, x), _or(w_t, x), _or(b_t, x), y, _or(y_t, y), mean, rstd,
        x.stride(0), _stride(x_t), _stride(w), _stride(b), _stride(w_t), _stride(b_t), y.stride(0), _stride(y_t),
        n_cols, group, eps,
        IS_RMS=is_rms, HAS_W=w is not None, HAS_B=b is not None, ONE_PLUS=one_plus, HAS_TANGENT=x_t is not None,
        HAS_WT=w_t is not None, HAS_BT=b_t is not None, **_row_meta(n_cols),
    )
    return y, y_t, mean, rstd


def _chunks(n_groups: int, group: int) -> tuple[int, int]:
    """(rows_per_prog, n_chunks) splitting each group of rows so the backward grid has ~BWD_PROGRAMS programs."""
    rows_per_prog = triton.cdiv(group, max(1, min(group, BWD_PROGRAMS // n_groups)))
    return rows_per_prog, triton.cdiv(group, rows_per_prog)


def norm_bwd(x, w, dy, mean, rstd, *, is_rms: bool, one_plus: bool, group: int, need_dx: bool, need_dw: bool,
             need_db: bool):
    rows, n_cols = x.shape
    n_groups = rows // group
    rows_per_prog, n_chunks = _chunks(n_groups, group)
    dx = torch.empty_like(x) if need_dx else None
    part = (n_groups, n_chunks, n_cols)
    dw_part = torch.empty(part, dtype=torch.float32, device=x.device) if need_dw else None
    db_part = torch.empty(part, dtype=torch.float32, device=x.device) if need_db else None
    _kernels("norms").norm_bwd_kernel[(n_groups, n_chunks)](
        x, _or(w, x), dy, mean, rstd, _or(dx, x), _or(dw_part, mean), _or(db_part, mean),
        x.stride(0), _stride(w), dy.stride(0), _stride(dx), n_cols, group, rows_per_prog, n_chunks,
        IS_RMS=is_rms, HAS_W=w is not None, ONE_PLUS=one_plus, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        **_row_meta(n_cols),
    )
    return dx, _sum_chunks(dw_part), _sum_chunks(db_part)


def _sum_chunks(part: torch.Tensor | None) -> torch.Tensor | None:
    """[n_groups, n_chunks, D] float32 partials -> [n_groups, D]."""
    return None if part is None else part.sum(1)


def activation(x, v, *, kind: str, write_y: bool = True):
    kern = _kernels("activations")
    act = {"silu": kern.ACT_SILU, "gelu": kern.ACT_GELU, "gelu_tanh": kern.ACT_GELU_TANH}[kind]
    y = torch.empty_like(x) if write_y else None
    yv = torch.empty_like(v) if v is not None else None
    n = x.numel()
    if n == 0:
        return y, yv
    kern.activation_kernel[(triton.cdiv(n, ACTIVATION_BLOCK),)](
        x, _or(v, x), _or(y, x), _or(yv, x), n,
        ACT=act, WRITE_Y=write_y, HAS_V=v is not None, BLOCK=ACTIVATION_BLOCK, num_warps=4,
    )
    return y, yv


def gated_residual_fwd(x, g, y, x_t, g_t, y_t, *, group: int):
    rows, n_cols = x.shape
    out = torch.empty_like(x)
    out_t = torch.empty_like(x) if x_t is not None else None
    _kernels("residual").gated_residual_fwd_kernel[(rows,)](
        x, g, y, _or(x_t, x), _or(g_t, g), _or(y_t, y), out, _or(out_t, out),
        x.stride(0), g.stride(0), y.stride(0), _stride(x_t), _stride(g_t), _stride(y_t), out.stride(0),
        _stride(out_t), n_cols, group, HAS_TANGENT=x_t is not None, **_row_meta(n_cols),
    )
    return out, out_t


def gated_residual_bwd(g, y, dout, *, group: int, need_dy: bool, need_dg: bool):
    rows, n_cols = y.shape
    n_groups = rows // group
    rows_per_prog, n_chunks = _chunks(n_groups, group)
    dy = torch.empty_like(y) if need_dy else None
    dg_part = torch.empty((n_groups, n_chunks, n_cols), dtype=torch.float32, device=y.device) if need_dg else None
    _kernels("residual").gated_residual_bwd_kernel[(n_groups, n_chunks)](
        g, y, dout, _or(dy, y), _or(dg_part, dout), g.stride(0), y.stride(0), dout.stride(0), _stride(dy),
        n_cols, group, rows_per_prog, n_chunks, NEED_DY=need_dy, NEED_DG=need_dg, **_row_meta(n_cols),
    )
    return dy, _sum_chunks(dg_part)


def _block_h(half: int) -> int:
    return triton.next_power_of_2(half)


def time_embedding_fwd(t, s, t_t, s_t, freqs, *, dim: int, delta: bool):
    batch, half = t.shape[0], freqs.shape[0]
    e = torch.empty((batch, 2 * dim), dtype=torch.float32, device=t.device)
    e_t = torch.empty((batch, 2 * dim), dtype=torch.float32, device=t.device) if t_t is not None else None
    _kernels("time_embedding").time_embedding_fwd_kernel[(batch,)](
        t, s, _or(t_t, t), _or(s_t, s), freqs, e, _or(e_t, e), e.stride(0), _stride(e_t), half, dim,
        DELTA=delta, HAS_TANGENT=t_t is not None, BLOCK_H=_block_h(half),
    )
    return e, e_t


def time_embedding_bwd(t, s, freqs, de, *, dim: int, delta: bool):
    batch, half = t.shape[0], freqs.shape[0]
    dt = torch.empty(batch, dtype=torch.float32, device=t.device)
    ds = torch.empty(batch, dtype=torch.float32, device=t.device)
    _kernels("time_embedding").time_embedding_bwd_kernel[(batch,)](
        t, s, freqs, de, dt, ds, de.stride(0), half, dim, DELTA=delta, BLOCK_H=_block_h(half),
    )
    return dt, ds
