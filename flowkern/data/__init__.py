"""Embedded training data (no downloads): 2-D toys with exact densities where they exist, and 8×8 digits.

    get_dataset("checkerboard" | "8gaussians" | "rings" | "moons" | "digits") -> Dataset
    dataset.sample(n, generator) -> [n, *shape] float32;  dataset.held_out(n, seed);  dataset.log_prob(x)
"""
from __future__ import annotations

from flowkern.data.base import Dataset
from flowkern.data.toys import Checkerboard, EightGaussians, Moons, Rings

_DATASETS = {cls.name: cls for cls in (Checkerboard, EightGaussians, Rings, Moons)}
DATASET_NAMES = (*_DATASETS, "digits")


def get_dataset(name: str) -> Dataset:
    """The dataset called `name` (ValueError listing the known names otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name == "digits":
        from flowkern.data.digits import Digits

        return Digits()
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return _DATASETS[name]()


__all__ = ["DATASET_NAMES", "Checkerboard", "Dataset", "EightGaussians", "Moons", "Rings", "get_dataset"]
