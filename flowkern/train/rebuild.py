"""Networks and methods rebuilt from what a `flowkern train` checkpoint stores (docs/training.md)."""
from __future__ import annotations

import math

import torch

from flowkern.methods.parameters import stored_kwargs
from flowkern.train import checkpoint

RUN_KEYS = (*checkpoint.ENGINE_KEYS, "arch", "data")


ARCHS = ("mlp", "dit")
DEFAULT_TIME_SCALE = 1000.0  # MLPFlowMap's and DiT's default: t ∈ [0, 1] embedded as DiT's timesteps
DEFAULT_TIME_MODE = "ts"     # MLPFlowMap's and DiT's default: embed (t, s)


class FlatImageFlowMap(torch.nn.Module):
    """u(x, t, s [, y]) on flattened images x [B, C·H·W] through a `flowkern.nn.DiT` on [B, C, H, W] (the embedded
    image data sets are stored flat)."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    @property
    def divergence_head(self) -> bool:
        return self.dit.divergence_head

    def forward(self, x, t, s, **kwargs):
        images = x.reshape(x.shape[0], self.dit.in_ch, *self.dit.img_size)
        out = self.dit(images, t, s, **kwargs)
        if isinstance(out, tuple):  # (u, D) of a joint flow map
            return out[0].reshape(x.shape[0], -1), out[1]
        return out.reshape(x.shape[0], -1)


def image_geometry(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(channels, side) of a data set stored flat as one square single-channel image, else None."""
    if len(shape) != 1:
        return None
    side = round(shape[0] ** 0.5)
    return (1, side) if side * side == shape[0] and side >= 2 else None


def dit_heads(hidden: int) -> int:
    """Attention heads of a DiT of width `hidden`: head dimension 32 where it divides, else one head."""
    return hidden // 32 if hidden % 32 == 0 else 1


def architecture(kind: str, train: dict, shape: tuple[int, ...], method_cls) -> dict:
    """The network's constructor arguments for `--arch kind` ("mlp" | "dit"), the run's --hidden/--depth/--time-dim/
    --dropout, data of `shape`, and the method's network time scale and time mode (`network_time_scale`, default
    1000; `network_time_mode`, default "ts").
    ValueError for a DiT on data that is not a square image, or a patch that does not divide it."""
    if kind not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {kind!r}")
    time_scale = float(getattr(method_cls, "network_time_scale", DEFAULT_TIME_SCALE))
    time_mode = getattr(method_cls, "network_time_mode", DEFAULT_TIME_MODE)
    if kind == "mlp":
        return {"arch": "mlp", "dim": math.prod(shape), "hidden": train["hidden"],
                "depth": train["depth"], "time_dim": train["time_dim"], "dropout": train["dropout"],
                "time_scale": time_scale, "time_mode": time_mode}
    geometry = image_geometry(tuple(shape))
    if geometry is None or geometry[1] % 2:
        raise ValueError(f"--arch dit needs square image data with an even side (patch 2), got samples of shape "
                         f"{tuple(shape)}; use --arch mlp")
    if train["dropout"]:
        raise ValueError("--dropout applies to --arch mlp only (flowkern.nn.DiT has no dropout)")
    in_ch, side = geometry
    return {"arch": "dit", "img_size": side, "in_ch": in_ch, "patch": 2, "hidden": train["hidden"],
            "depth": train["depth"], "heads": dit_heads(train["hidden"]), "time_dim": train["time_dim"],
            "time_scale": time_scale, "time_mode": time_mode}


def network(arch: dict) -> torch.nn.Module:
    """The network of an architecture dict: {"arch": "mlp", dim, hidden, depth, time_dim, dropout, time_scale,
    time_mode} (a dict without "arch" is an MLP, without "time_scale" at 1000, without "time_mode" in "ts") or
    {"arch": "dit", img_size, in_ch, patch, hidden, depth, heads, time_dim, time_scale, time_mode} (a DiT on the
    flattened images); either may set divergence_head."""
    from flowkern.nn import DiT, MLPFlowMap

    kind = arch.get("arch", "mlp")
    time_scale = arch.get("time_scale", DEFAULT_TIME_SCALE)
    time_mode = arch.get("time_mode", DEFAULT_TIME_MODE)
    if kind == "dit":
        return FlatImageFlowMap(DiT(arch["img_size"], arch["in_ch"], patch=arch["patch"], hidden=arch["hidden"],
                                    depth=arch["depth"], heads=arch["heads"], time_dim=arch["time_dim"],
                                    time_scale=time_scale, time_mode=time_mode,
                                    divergence_head=arch.get("divergence_head", False)))
    if kind != "mlp":
        raise checkpoint.CheckpointError(f"unknown network arch {kind!r}; known: {', '.join(ARCHS)}")
    return MLPFlowMap(arch["dim"], hidden=arch["hidden"], depth=arch["depth"], time_dim=arch["time_dim"],
                      dropout=arch.get("dropout", 0.0), time_scale=time_scale, time_mode=time_mode,
                      divergence_head=arch.get("divergence_head", False))


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
    method = build_method(cls, network(state["arch"]), stored_kwargs(cls, state["method_kwargs"]), teacher)
    method.load_state_dict(state["method_state"])
    config = TrainConfig.from_dict(state["config"])
    ema = EMA(method.model, config.ema_decays)
    ema.load_state_dict(state["ema"])
    return method, ema.averaged(config.eval_ema)
