"""Host-launch helpers shared by the Triton launchers of the row ops (flowkern/ops/<family>/triton_launch.py)."""
from __future__ import annotations

import torch
import triton

BWD_PROGRAMS = 1024  # target grid size of the row backward kernels (partial sums per program)


def row_meta(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK_D": block, "num_warps": min(16, max(1, block // 256))}


def stride0(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def placeholder(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer for an argument the kernel will not read (its flag is off)."""
    return fallback if t is None else t


def backward_chunks(n_groups: int, group: int) -> tuple[int, int]:
    """(rows_per_prog, n_chunks) splitting each group of rows so the backward grid has ~BWD_PROGRAMS programs."""
    rows_per_prog = triton.cdiv(group, max(1, min(group, BWD_PROGRAMS // n_groups)))
    return rows_per_prog, triton.cdiv(group, rows_per_prog)


def sum_chunks(part: torch.Tensor | None) -> torch.Tensor | None:
    """[n_groups, n_chunks, D] float32 partials -> [n_groups, D]."""
    return None if part is None else part.sum(1)
