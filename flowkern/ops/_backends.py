"""The backend modules of an op family: `<family>.reference` (PyTorch) and `<family>.triton_launch` (Triton host
launchers, same signatures), the latter imported on first use (Triton is optional and decides interpreter vs
compiled mode when its kernels are imported)."""
from __future__ import annotations

import importlib


class BackendModules(dict):
    """{"torch": reference, "triton": triton_launch} of one family; the Triton module is imported on first lookup."""

    def __init__(self, package: str, reference):
        super().__init__(torch=reference)
        self.package = package

    def __missing__(self, backend: str):
        if backend != "triton":
            raise KeyError(backend)
        module = self[backend] = importlib.import_module(f"{self.package}.triton_launch")
        return module
