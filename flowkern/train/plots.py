"""PNG plots of a run (matplotlib, Agg backend), written atomically.

`plot_samples`: one panel per sample set (the model at each step count, the teacher's 1 and 100 Euler steps when
there is one; each titled with its SW₂ to held-out data when known) and a last panel with the data. 2-D points are
scatter plots; flattened square images (digits) a 6×6 grid with a gap between the images. `plot_loss`: every loss
term of the run against the step (the model's per-step loss with a moving average, the logged terms of auxiliary
networks and methods), labelled axes."""
from __future__ import annotations

from pathlib import Path

import torch

from flowkern.train.atomic import write_atomically

GRID, GAP, GAP_VALUE = 6, 2, -0.7   # digits: 6×6 images, 2 px apart on a light grey (−1 is white, 1 black)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(x: torch.Tensor, n: int = GRID, gap: int = GAP) -> torch.Tensor:
    """The first n² flattened square images of `x` as one [n·side + (n+1)·gap]² picture, `gap` pixels of
    `GAP_VALUE` around and between them (missing images blank)."""
    side = round(x.shape[-1] ** 0.5)
    imgs = x[:n * n].float().reshape(-1, side, side).clamp(-1, 1)
    imgs = torch.cat([imgs, torch.full((n * n - len(imgs), side, side), -1.0)])
    cell = side + gap
    grid = torch.full((n * cell + gap, n * cell + gap), GAP_VALUE)
    for i, img in enumerate(imgs):
        r, c = divmod(i, n)
        grid[gap + r * cell:gap + r * cell + side, gap + c * cell:gap + c * cell + side] = img
    return grid


def _draw(ax, x: torch.Tensor, title: str, lim: float):
    x = x.float().cpu()
    if x.shape[-1] == 2:
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    else:
        ax.imshow(image_grid(x), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path, plt) -> Path:
    try:
        return write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110), what="plot")
    finally:
        plt.close(fig)


def steps_label(k: int) -> str:
    return f"{k} step{'s' if k > 1 else ''}"


def panel_title(name: str, k: int, sw2: float | None = None) -> str:
    return f"{name}{' · ' if name else ''}{steps_label(k)}" + (f"\nSW2 {sw2:.4f}" if sw2 is not None else "")


def plot_panels(rows: list[list[tuple[str, torch.Tensor]]], data: torch.Tensor, path, *, title: str = "",
                lim: float = 4.5) -> Path:
    """One row of panels per entry of `rows` ([(panel title, samples), ...]); the data panel ends the first row."""
    plt = _plt()
    rows = [list(r) for r in rows if r]
    rows[0] = rows[0] + [("data (held out)", data)]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.5 * cols, 3.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            if c < len(row):
                _draw(axes[r][c], row[c][1], row[c][0], lim)
            else:
                axes[r][c].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_samples(samples: dict, data: torch.Tensor, path, *, title: str = "", scores: dict | None = None,
                 lim: float = 4.5) -> Path:
    """One panel per step count (`samples` = {steps: [N, ...]}, titled with scores[k]["sw2"] when given) and a
    last panel with `data`."""
    scores = scores or {}
    panels = [(panel_title("", k, scores.get(k, {}).get("sw2")), x) for k, x in samples.items()]
    return plot_panels([panels], data, path, title=title, lim=lim)


def plot_report(result: dict, path, *, title: str = "", limit: int = 4000) -> Path:
    """samples.png of a quality report (`flowkern.train.evaluate.quality`): a row per model (the model at each
    step count, the teacher at 1 and 100 steps), each panel titled with its SW₂, and the held-out data."""
    rows = []
    for label, scores in result["rows"]:
        drawn = result["drawn"][label]
        rows.append([(panel_title(label, k, scores[k]["sw2"]), drawn[k][:limit]) for k in drawn])
    return plot_panels(rows, result["reference"][:limit], path, title=title)


def plot_loss(losses, path, *, title: str = "training loss", records=()) -> Path:
    """The model's per-step loss (log scale when every term is positive) with a moving average over ~1% of the
    run, and every other ``*loss`` scalar of the logged `records` (metrics.jsonl lines) at its logged steps."""
    plt = _plt()
    y = torch.as_tensor(list(losses), dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = torch.arange(1, len(y) + 1)
    ax.plot(steps.numpy(), y.numpy(), lw=0.5, alpha=0.4, label="loss (model, every step)")
    w = max(1, len(y) // 100)
    if len(y) >= w > 1:
        smooth = torch.nn.functional.avg_pool1d(y.view(1, 1, -1), w, stride=1).view(-1)
        ax.plot(steps[w - 1:].numpy(), smooth.numpy(), lw=1.2, label=f"loss, mean of {w}")
    values = [y[torch.isfinite(y)]]
    terms = sorted({k for r in records for k in r if k.endswith("loss") and k != "loss"})
    for key in terms:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=1.0, marker=".", ms=2, label=key)
            t = torch.tensor(ys, dtype=torch.float64)
            values.append(t[torch.isfinite(t)])
    finite = torch.cat(values)
    if len(finite) and bool((finite > 0).all()):
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)
