"""Patchify / unpatchify (reshapes only: a strided conv == unfold + linear) and DiT's fixed 2-D sin-cos positions."""
from __future__ import annotations

import torch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)·(W/p), C·p·p], row-major over the patch grid; each row is (c, i, j) flattened, the
    order of a Conv2d(C, D, p, stride=p) weight viewed as [D, C·p·p]."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, (H/p)·(W/p), C·p·p] -> [B, C, H, W]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """DiT/MAE fixed positions [grid_h·grid_w, dim] (float64): half the features encode the row, half the column,
    each as [sin(pos·ω), cos(pos·ω)], ω_k = 10000^(−k/(dim/4)). dim must be a multiple of 4."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")

    def embed(pos):
        a = pos.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1)  # MAE order: w-part first (grid = meshgrid(w, h))
