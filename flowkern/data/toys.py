"""2-D toy distributions, sampled deterministically from a `torch.Generator` (no downloads).

* checkerboard: uniform on the 8 "black" unit-2 squares of a 4×4 board on [−4, 4]² (cells (i, j) with i + j even),
  density 1/32 on them: the NLL of a perfect model is log 32 = 3.4657 nats.
* 8gaussians: an equal mixture of N(c_k, σ²I), c_k = R·(cos(πk/4), sin(πk/4)), R = 2√2, σ = 0.5/√2 (the FFJORD
  toy scaled by 1/√2); closed-form log-density.
* rings: four concentric rings, radii 1, 2, 3, 4 (points ∝ radius), radial noise N(0, 0.08²); no closed form.
* moons: two interleaving half circles scaled ×2 and centred, Gaussian noise 0.1; no closed form.
"""
from __future__ import annotations

import math

import torch

from flowkern.data.base import Dataset


class Checkerboard(Dataset):
    name = "checkerboard"
    dim = 2
    shape = (2,)

    def sample(self, n, generator=None):
        n = self._check_n(n)
        cell = torch.randint(0, 8, (n,), generator=generator)
        row = cell // 2                                     # 0..3
        col = 2 * (cell % 2) + (row % 2)                    # keeps row + col even
        u = torch.rand(n, 2, generator=generator)
        x = torch.stack([col, row], -1).float() * 2 - 4 + 2 * u
        return x

    def log_prob(self, x):
        x = self._check_x(x)
        inside = (x.abs() <= 4).all(-1)
        cell = torch.floor((x + 4) / 2).clamp(0, 3).long()
        black = (cell.sum(-1) % 2) == 0
        out = torch.full(x.shape[:1], -math.log(32.0), dtype=torch.float32, device=x.device)
        return out.masked_fill(~(inside & black), -math.inf)


class EightGaussians(Dataset):
    name = "8gaussians"
    dim = 2
    shape = (2,)
    radius = 2 * math.sqrt(2)
    std = 0.5 / math.sqrt(2)

    def centers(self, device=None):
        angle = torch.arange(8, dtype=torch.float32, device=device) * (math.pi / 4)
        return self.radius * torch.stack([angle.cos(), angle.sin()], -1)

    def sample(self, n, generator=None):
        n = self._check_n(n)
        k = torch.randint(0, 8, (n,), generator=generator)
        return self.centers()[k] + self.std * torch.randn(n, 2, generator=generator)

    def log_prob(self, x):
        """log p(x) = logsumexp_k [log N(x; c_k, σ²I)] − log 8."""
        x = self._check_x(x).float()
        d2 = ((x[:, None, :] - self.centers(x.device)[None]) ** 2).sum(-1)
        log_n = -0.5 * d2 / self.std ** 2 - math.log(2 * math.pi * self.std ** 2)
        return torch.logsumexp(log_n, -1) - math.log(8.0)


class Rings(Dataset):
    name = "rings"
    dim = 2
    shape = (2,)

    def sample(self, n, generator=None):
        n = self._check_n(n)
        radii = torch.tensor([1.0, 2.0, 3.0, 4.0])
        k = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=generator)
        angle = 2 * math.pi * torch.rand(n, generator=generator)
        r = radii[k] + 0.08 * torch.randn(n, generator=generator)
        return torch.stack([r * angle.cos(), r * angle.sin()], -1)


class Moons(Dataset):
    name = "moons"
    dim = 2
    shape = (2,)

    def sample(self, n, generator=None):
        n = self._check_n(n)
        which = torch.randint(0, 2, (n,), generator=generator)
        angle = math.pi * torch.rand(n, generator=generator)
        upper = torch.stack([angle.cos(), angle.sin()], -1)
        lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], -1)
        x = torch.where(which[:, None] == 0, upper, lower)
        x = x + 0.1 * torch.randn(n, 2, generator=generator)
        return 2 * (x - torch.tensor([0.5, 0.25]))
