"""The 8×8 handwritten digits that ship with scikit-learn (1797 images, no download), pixels scaled to [−1, 1].

Training draws (with replacement) from the first 1500 images, `held_out` returns the last 297 (disjoint)."""
from __future__ import annotations

import torch

from flowkern.data.base import Dataset

N_TRAIN = 1500


def _load() -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # optional dependency
        raise ImportError("the 'digits' dataset needs scikit-learn (an optional dependency): "
                          "pip install scikit-learn") from err
    images = torch.from_numpy(load_digits().data).float()   # [1797, 64], values 0..16
    return images / 8.0 - 1.0


class Digits(Dataset):
    name = "digits"
    dim = 64
    shape = (64,)

    def __init__(self):
        self.images = _load()

    def sample(self, n, generator=None):
        n = self._check_n(n)
        idx = torch.randint(0, N_TRAIN, (n,), generator=generator)
        return self.images[idx].clone()

    def held_out(self, n=None, seed=12345):
        """The held-out split (the last 297 images); `n` ≤ 297 takes the first n."""
        test = self.images[N_TRAIN:]
        return test if n is None else test[: min(self._check_n(n), len(test))].clone()
