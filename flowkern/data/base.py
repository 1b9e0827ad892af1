"""The dataset interface: deterministic sampling from a generator, optional exact log-density."""
from __future__ import annotations

from typing import ClassVar

import torch

from flowkern._validate import check_int, check_tensor


class Dataset:
    """An embedded distribution over `shape`-shaped float32 points.

    `sample(n, generator)` draws n points [n, *shape] (deterministic for a given `torch.Generator` state; training
    data); `held_out(n, seed)` draws evaluation data (fresh draws from a separate seed for toys, a disjoint split for
    finite datasets); `log_prob(x)` is the exact log-density where one exists (`has_density`).
    """

    name: ClassVar[str]
    dim: ClassVar[int]
    shape: ClassVar[tuple[int, ...]]

    @staticmethod
    def _check_n(n) -> int:
        return check_int("n", n, minimum=1)

    def _check_x(self, x) -> torch.Tensor:
        check_tensor("x", x)
        if tuple(x.shape[1:]) != tuple(self.shape) or x.dim() != len(self.shape) + 1:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def held_out(self, n: int, seed: int = 12345) -> torch.Tensor:
        """Evaluation data, independent of the training stream."""
        return self.sample(n, torch.Generator().manual_seed(check_int("seed", seed)))

    def data_std(self, n: int = 20_000) -> float:
        """The data's standard deviation over all coordinates, from n training-stream draws of a fixed seed (EDM's
        σ_data: the consistency methods' boundary preconditioning)."""
        return float(self.sample(self._check_n(n), torch.Generator().manual_seed(0)).double().std())

    @property
    def has_density(self) -> bool:
        return type(self).log_prob is not Dataset.log_prob

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"dataset {self.name!r} has no closed-form density")
