"""PNG plots of a run (matplotlib, Agg backend): samples at several step counts beside the data; the loss curve."""
from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, x: torch.Tensor, title: str, lim: float):
    x = x.float().cpu()
    if x.shape[-1] == 2:
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    else:   # flattened square images (digits): a 6×6 grid
        side = round(x.shape[-1] ** 0.5)
        imgs = x[:36].reshape(-1, side, side).clamp(-1, 1)
        imgs = torch.cat([imgs, torch.full((36 - len(imgs), side, side), -1.0)])
        grid = imgs.reshape(6, 6, side, side).permute(0, 2, 1, 3).reshape(6 * side, 6 * side)
        ax.imshow(grid, cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(samples: dict, data: torch.Tensor, path, *, title: str = "", lim: float = 4.5) -> Path:
    """One panel per step count (`samples` = {steps: [N, ...]}) and a last panel with `data`; saved to `path`."""
    plt = _plt()
    panels = [(f"{k} step{'s' if k > 1 else ''}", x) for k, x in samples.items()] + [("data", data)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (name, x) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        _draw(ax, x, name, lim)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(losses, path, *, title: str = "training loss") -> Path:
    """The per-step loss (log scale when positive) with a moving average over ~1% of the run."""
    plt = _plt()
    y = torch.as_tensor(list(losses), dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(y.numpy(), lw=0.5, alpha=0.4, label="loss")
    w = max(1, len(y) // 100)
    if len(y) >= w > 1:
        smooth = torch.nn.functional.avg_pool1d(y.view(1, 1, -1), w, stride=1).view(-1)
        ax.plot(range(w - 1, len(y)), smooth.numpy(), lw=1.2, label=f"mean of {w}")
        ax.legend(fontsize=8)
    if len(y) and bool((y[torch.isfinite(y)] > 0).all()):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
