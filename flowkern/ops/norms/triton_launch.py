"""Triton host launcher of the norms family: allocate outputs, compute grids, launch kernels/norms.py. No maths.

Same signatures as `flowkern.ops.norms.reference`: contiguous [rows, D] tensors, [n_groups, D] parameters; one
program per row with the whole row in one BLOCK_D = next_pow2(D) block.
"""
from __future__ import annotations

import torch
import triton

from flowkern._fused import kernel_module
from flowkern.ops._launch import backward_chunks, placeholder, row_meta, stride0, sum_chunks


def norm_fwd(x, w, b, x_t, w_t, b_t, *, is_rms: bool, one_plus: bool, group: int, eps: float):
    rows, n_cols = x.shape
    y = torch.empty_like(x)
    y_t = torch.empty_like(x) if x_t is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    kernel_module("norms").norm_fwd_kernel[(rows,)](
        x, placeholder(x_t, x), placeholder(w, x), placeholder(b, x), placeholder(w_t, x), placeholder(b_t, x), y, placeholder(y_t, y), mean, rstd,
        x.stride(0), stride0(x_t), stride0(w), stride0(b), stride0(w_t), stride0(b_t), y.stride(0), stride0(y_t),
        n_cols, group, eps,
        IS_RMS=is_rms, HAS_W=w is not None, HAS_B=b is not None, ONE_PLUS=one_plus, HAS_TANGENT=x_t is not None,
        HAS_WT=w_t is not None, HAS_BT=b_t is not None, **row_meta(n_cols),
    )
    return y, y_t, mean, rstd


def norm_bwd(x, w, dy, mean, rstd, *, is_rms: bool, one_plus: bool, group: int, need_dx: bool, need_dw: bool,
             need_db: bool):
    rows, n_cols = x.shape
    n_groups = rows // group
    rows_per_prog, n_chunks = backward_chunks(n_groups, group)
    dx = torch.empty_like(x) if need_dx else None
    part = (n_groups, n_chunks, n_cols)
    dw_part = torch.empty(part, dtype=torch.float32, device=x.device) if need_dw else None
    db_part = torch.empty(part, dtype=torch.float32, device=x.device) if need_db else None
    kernel_module("norms").norm_bwd_kernel[(n_groups, n_chunks)](
        x, placeholder(w, x), dy, mean, rstd, placeholder(dx, x), placeholder(dw_part, mean), placeholder(db_part, mean),
        x.stride(0), stride0(w), dy.stride(0), stride0(dx), n_cols, group, rows_per_prog, n_chunks,
        IS_RMS=is_rms, HAS_W=w is not None, ONE_PLUS=one_plus, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        **row_meta(n_cols),
    )
    return dx, sum_chunks(dw_part), sum_chunks(db_part)


def norm_tangent_input_grads(x, w, x_t, w_t, dy_t, mean, rstd, *, is_rms: bool, one_plus: bool, group: int,
                             need_dx: bool, need_dw: bool):
    rows, n_cols = x.shape
    n_groups = rows // group
    rows_per_prog, n_chunks = backward_chunks(n_groups, group)
    dx = torch.empty_like(x) if need_dx else None
    dw_part = torch.empty((n_groups, n_chunks, n_cols), dtype=torch.float32, device=x.device) if need_dw else None
    kernel_module("norms").norm_tangent_bwd_kernel[(n_groups, n_chunks)](
        x, x_t, placeholder(w, x), placeholder(w_t, x), dy_t, mean, rstd, placeholder(dx, x), placeholder(dw_part, mean),
        x.stride(0), x_t.stride(0), stride0(w), stride0(w_t), dy_t.stride(0), stride0(dx), n_cols, group,
        rows_per_prog, n_chunks, IS_RMS=is_rms, HAS_W=w is not None, ONE_PLUS=one_plus, HAS_WT=w_t is not None,
        NEED_DX=need_dx, NEED_DW=need_dw, **row_meta(n_cols),
    )
    return dx, sum_chunks(dw_part)
