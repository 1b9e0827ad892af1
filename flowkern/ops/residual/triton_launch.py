"""Triton host launcher of the residual family (kernels/residual.py): allocate, grid, launch. No maths.

Same signatures as `flowkern.ops.residual.reference`: contiguous [rows, D] tensors, [n_groups, D] gate.
"""
from __future__ import annotations

import torch
import triton

from flowkern._fused import kernel_module
from flowkern.ops._launch import backward_chunks, placeholder, row_meta, stride0, sum_chunks


def gated_residual_fwd(x, g, y, x_t, g_t, y_t, *, group: int):
    rows, n_cols = x.shape
    out = torch.empty_like(x)
    out_t = torch.empty_like(x) if x_t is not None else None
    kernel_module("residual").gated_residual_fwd_kernel[(rows,)](
        x, g, y, placeholder(x_t, x), placeholder(g_t, g), placeholder(y_t, y), out, placeholder(out_t, out),
        x.stride(0), g.stride(0), y.stride(0), stride0(x_t), stride0(g_t), stride0(y_t), out.stride(0),
        stride0(out_t), n_cols, group, HAS_TANGENT=x_t is not None, **row_meta(n_cols),
    )
    return out, out_t


def gated_residual_bwd(g, y, dout, *, group: int, need_dy: bool, need_dg: bool):
    rows, n_cols = y.shape
    n_groups = rows // group
    rows_per_prog, n_chunks = backward_chunks(n_groups, group)
    dy = torch.empty_like(y) if need_dy else None
    dg_part = torch.empty((n_groups, n_chunks, n_cols), dtype=torch.float32, device=y.device) if need_dg else None
    kernel_module("residual").gated_residual_bwd_kernel[(n_groups, n_chunks)](
        g, y, dout, placeholder(dy, y), placeholder(dg_part, dout), g.stride(0), y.stride(0), dout.stride(0), stride0(dy),
        n_cols, group, rows_per_prog, n_chunks, NEED_DY=need_dy, NEED_DG=need_dg, **row_meta(n_cols),
    )
    return dy, sum_chunks(dg_part)
