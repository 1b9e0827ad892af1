"""Training hyper-parameters (`TrainConfig`), validated on construction."""
from __future__ import annotations

import dataclasses
import math

from flowkern._validate import check_bool, check_finite_scalar, check_int

OPTIMIZERS = ("adamw", "radam")
LR_DECAYS = ("none", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """steps: optimiser steps in total; batch: rows per process per step (the global batch is batch × world size);
    lr: peak learning rate, reached linearly over `warmup` steps; lr_decay: after the warm-up, "none" (constant) or
    "cosine" (half a cosine from lr down to lr·lr_floor at the last step); optimizer: "adamw" or "radam"; grad_clip: max
    global gradient norm (None: no clipping, the norm is still measured for the NaN guard); ema_decays: the EMA
    copies kept (e.g. (0.999, 0.9999)); eval_ema: the decay whose weights sample/evaluate (None: the raw weights);
    bf16: autocast to bfloat16 on CUDA (None: on when training on CUDA; never on CPU); log_every: steps between
    metrics-log lines (the host reads the device's losses only then); checkpoint_every: steps between checkpoints
    (0: none between); checkpoint_minutes: minutes between checkpoints (0: none by time); both only with an
    out_dir, and always at the end; max_consecutive_skips: stop the run when this many consecutive steps were
    skipped by the NaN/Inf guard (0: never; checked when a metrics line is written); ddp_timeout: seconds a DDP
    collective waits for the other ranks before the run fails naming the silent rank; fsdp: shard the model with
    FSDP2 instead of replicating it under DDP (`flowkern.train.fsdp`; needs a torchrun launch with WORLD_SIZE > 1);
    seed: seeds every RNG."""

    steps: int = 2000
    batch: int = 512
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100
    lr_decay: str = "none"
    lr_floor: float = 0.0
    grad_clip: float | None = 1.0
    ema_decays: tuple[float, ...] = (0.99, 0.999)
    eval_ema: float | None = 0.99
    bf16: bool | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    max_consecutive_skips: int = 20
    ddp_timeout: float = 300.0
    fsdp: bool = False
    seed: int = 0

    def __post_init__(self):
        check_int("steps", self.steps, minimum=1)
        check_int("batch", self.batch, minimum=1)
        check_finite_scalar("lr", self.lr, positive=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if check_finite_scalar("weight_decay", self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= check_finite_scalar("betas", b) < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        check_int("warmup", self.warmup, minimum=0)
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0 <= check_finite_scalar("lr_floor", self.lr_floor) <= 1:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor}")
        if self.grad_clip is not None and not (check_finite_scalar("grad_clip", self.grad_clip) > 0):
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        self.ema_decays = tuple(self.ema_decays)
        for d in self.ema_decays:
            if not 0 < check_finite_scalar("ema_decays", d) < 1:
                raise ValueError(f"every EMA decay must be in (0, 1), got {d}")
        if self.eval_ema is not None and self.eval_ema not in self.ema_decays:
            raise ValueError(f"eval_ema={self.eval_ema} is not one of ema_decays {self.ema_decays}")
        if self.bf16 is not None:
            check_bool("bf16", self.bf16)
        check_int("log_every", self.log_every, minimum=1)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        if check_finite_scalar("checkpoint_minutes", self.checkpoint_minutes) < 0:
            raise ValueError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        check_int("max_consecutive_skips", self.max_consecutive_skips, minimum=0)
        if not check_finite_scalar("ddp_timeout", self.ddp_timeout) > 0:
            raise ValueError(f"ddp_timeout must be > 0 seconds, got {self.ddp_timeout}")
        check_bool("fsdp", self.fsdp)
        check_int("seed", self.seed, minimum=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up: lr(step) = lr · min(1, (step + 1)/warmup) (step counts from 0; warmup 0: constant)."""
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of config.lr at optimiser step `step` (0-based): the linear warm-up, then for "cosine"
    floor + (1 − floor)·½(1 + cos(π·p)), p = (step − warmup)/(steps − warmup) the fraction of the decay phase done."""
    factor = warmup_factor(step, config.warmup)
    if config.lr_decay == "none" or step < config.warmup:
        return factor
    p = min(1.0, (step - config.warmup) / max(config.steps - config.warmup, 1))
    return factor * (config.lr_floor + (1 - config.lr_floor) * 0.5 * (1 + math.cos(math.pi * p)))
