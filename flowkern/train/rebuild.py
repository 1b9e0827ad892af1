"""Networks and methods rebuilt from what a `flowkern train` checkpoint stores (docs/training.md)."""
from __future__ import annotations

import torch

from flowkern.train import checkpoint

RUN_KEYS = (*checkpoint.ENGINE_KEYS, "arch", "data")


def network(arch: dict) -> torch.nn.Module:
    """The MLPFlowMap of an architecture dict {dim, hidden, depth, time_dim, dropout[, divergence_head]}."""
    from flowkern.nn import MLPFlowMap

    return MLPFlowMap(arch["dim"], hidden=arch["hidden"], depth=arch["depth"], time_dim=arch["time_dim"],
                      dropout=arch.get("dropout", 0.0), divergence_head=arch.get("divergence_head", False))


def build_method(cls, model: torch.nn.Module, kwargs: dict, teacher: torch.nn.Module | None = None):
    """``cls(model, [teacher=teacher,] **kwargs)`` (the teacher only for a method that takes one)."""
    if teacher is not None:
        return cls(model, teacher=teacher, **kwargs)
    return cls(model, **kwargs)


def restore(state: dict):
    """(method, eval_model) rebuilt from a `flowkern train` checkpoint; eval_model carries the eval EMA weights.
    CheckpointError naming what a foreign checkpoint lacks."""
    from flowkern.methods import get_method
    from flowkern.train.config import TrainConfig
    from flowkern.train.ema import EMA

    checkpoint.require(state, RUN_KEYS)
    try:
        cls = get_method(state["method"])
    except (ValueError, ImportError) as err:
        raise checkpoint.CheckpointError(f"checkpoint of method {state['method']!r}: {err}") from None
    teacher = network(state["teacher_arch"]) if state.get("teacher_arch") else None
    method = build_method(cls, network(state["arch"]), state["method_kwargs"], teacher)
    method.load_state_dict(state["method_state"])
    config = TrainConfig.from_dict(state["config"])
    ema = EMA(method.model, config.ema_decays)
    ema.load_state_dict(state["ema"])
    return method, ema.averaged(config.eval_ema)
