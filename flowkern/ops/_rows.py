"""Row layout shared by the row ops (norms, adaLN modulate, gated residual): validation and reshaping.

A row op sees x as [rows, D] (rows = every leading dim flattened). A per-row parameter p (γ, β, shift, scale, gate)
becomes a contiguous [n_groups, D] tensor whose row r // group serves row r of x:
    p of shape [D]                      -> [1, D],        group = rows  (a LayerNorm γ)
    p of shape [B, D], x [B, ..., D]    -> [B, D],        group = rows // B  (per-sample adaLN conditioning)
    p of the shape of x                 -> [rows, D],     group = 1  (per token)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flowkern._dispatch import select_backend
from flowkern._validate import check_like, check_tensor

MAX_TRITON_FEATURES = 32768  # one row per program, the whole row in registers


@dataclass(frozen=True)
class RowLayout:
    rows: int
    n_cols: int


def row_layout(name: str, x: torch.Tensor) -> RowLayout:
    check_tensor(name, x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must have at least one dimension and no empty one, got shape {tuple(x.shape)}")
    return RowLayout(x.numel() // x.shape[-1], x.shape[-1])


def param_group(name: str, p: torch.Tensor, x_name: str, x: torch.Tensor, *, shared_ok: bool,
                per_sample_ok: bool) -> int:
    """Validate p against x and return its `group` (rows of x per row of p)."""
    check_like(name, p, x_name, x, shape=False)
    rows, d = x.numel() // x.shape[-1], x.shape[-1]
    if shared_ok and p.shape == (d,):
        return rows
    if p.shape == x.shape:
        return 1
    if per_sample_ok and x.dim() >= 2 and p.shape == (x.shape[0], d):
        return rows // x.shape[0]
    allowed = [f"[{d}]"] if shared_ok else []
    if per_sample_ok and x.dim() >= 2:
        allowed.append(f"[{x.shape[0]}, {d}] (per sample)")
    allowed.append(f"{list(x.shape)} (the shape of {x_name})")
    raise ValueError(f"{name} must have shape {' or '.join(allowed)}, got {tuple(p.shape)}")


def check_tangent(name: str, t, ref_name: str, ref: torch.Tensor | None) -> None:
    """A tangent (None = zero) must match its primal's shape, dtype and device."""
    if t is None:
        return
    if ref is None:
        raise ValueError(f"{name} is given but {ref_name} is None")
    check_like(name, t, ref_name, ref)


def as_rows(x: torch.Tensor | None, n_cols: int) -> torch.Tensor | None:
    """[..., D] -> contiguous [rows, D] (a view when x already is contiguous)."""
    return None if x is None else x.reshape(-1, n_cols).contiguous()


def select_row_backend(op: str, x: torch.Tensor, n_cols: int) -> str:
    """`select_backend` for a row op (rows wider than the kernels take go to the reference, warned once)."""
    reason = None
    if n_cols > MAX_TRITON_FEATURES:
        reason = f"the Triton row kernels take up to {MAX_TRITON_FEATURES} features, got {n_cols}"
    return select_backend(op, x.device, x.dtype, triton_reason=reason)


def grouped(t: torch.Tensor, group: int, acc: torch.dtype) -> torch.Tensor:
    """[rows, D] -> [n_groups, group, D] in the accumulation dtype (PyTorch backends)."""
    return t.to(acc).view(-1, group, t.shape[-1])


def per_group(p: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """[n_groups, D] -> [n_groups, 1, D] in the accumulation dtype (broadcasts over the rows of a group)."""
    return None if p is None else p.to(acc)[:, None, :]


def flat_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D] -> [rows, D] of `dtype`."""
    return t.reshape(-1, t.shape[-1]).to(dtype)
