"""The training loop shared by every method (`Trainer`).

One step: data → method.loss(net, x0, step) (bf16 autocast on CUDA; the method keeps time and loss in float32) →
backward → gradient all-reduce (DDP) → clip → NaN/Inf guard → optimiser (AdamW/RAdam, linear warm-up, optional cosine decay) → EMA →
method.on_step_end(step). Each phase runs inside an NVTX range (flowkern.train.data/loss/backward/optimizer/ema).

Under DDP (`torchrun`, see `distributed.setup`) the method's model is wrapped once and the wrapper is the `net`
given to `method.loss` for the gradient pass, so every gradient is all-reduced; no-grad passes (teacher, EMA
target, JVPs) call `method.model` directly. Each rank draws its slice of one global batch from the same data
generator, so a run on W processes with `batch` rows each sees the data of one process with W·batch rows.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from flowkern._nvtx import nvtx_range
from flowkern.methods.base import Method
from flowkern.train import checkpoint, distributed, rng
from flowkern.train.config import TrainConfig, lr_factor
from flowkern.train.ema import EMA


def _build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    cls = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[config.optimizer]
    kwargs = {"decoupled_weight_decay": True} if config.optimizer == "radam" else {}
    return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **kwargs)


class Trainer:
    """Trains `method` on batches drawn by `data(n, generator)` (e.g. a `flowkern.data.Dataset`'s `sample`).

    Args:
        method: a `flowkern.methods.Method` (moved to the device; its trainable parameters are optimised: the model
            and any auxiliary network the method owns; the EMA tracks `method.model`).
        data: ``data(n, generator) -> [n, ...]`` float tensor on the CPU, deterministic for a generator state.
        config: `TrainConfig`.
        out_dir: where `metrics.jsonl` and `checkpoint.pt` go (None: nothing is written).
        device: default: the LOCAL_RANK GPU under CUDA, else the CPU.
        extra: metadata stored in every checkpoint (e.g. the network's constructor arguments, the dataset name).
        progress: show a tqdm bar (rank 0 only).
    """

    def __init__(self, method: Method, data, config: TrainConfig, *, out_dir=None, device=None, extra=None,
                 progress: bool = True):
        if not isinstance(method, Method):
            raise TypeError(f"method must be a flowkern.methods.Method, got {type(method).__name__}")
        if not callable(data):
            raise TypeError(f"data must be callable data(n, generator), got {type(data).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.rank, self.world, self.device = distributed.setup(device)
        self.config, self.data, self.extra = config, data, dict(extra or {})
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and self.rank == 0
        rng.seed_all(config.seed + 1000 * self.rank)
        self.data_generator = torch.Generator().manual_seed(config.seed)   # the same stream on every rank
        self.method = method.to(self.device)
        self.net = method.model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(method.model, device_ids=ids)
        self.params = [p for p in method.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("method has no trainable parameters")
        self.optimizer = _build_optimizer(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config) * method.lr_scale(s))
        self.ema = EMA(method.model, config.ema_decays)
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast is for CUDA training; set bf16=False (or None) on the CPU")
        self.step_count, self.skipped = 0, 0
        self.losses: list[float] = []

    # -- one step ------------------------------------------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        b = self.config.batch
        x = self.data(b * self.world, self.data_generator)
        return x[self.rank * b:(self.rank + 1) * b].to(self.device, non_blocking=True)

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimiser step (or a skipped one); returns the step's log record."""
        step = self.step_count
        self.method.train()
        with nvtx_range("flowkern.train.data"):
            x0 = self._batch()
        with nvtx_range("flowkern.train.loss"), self._autocast():
            loss, info = self.method.loss(self.net, x0, step)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"{type(self.method).__name__}.loss must return a scalar tensor, got {loss!r}")
        loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        with nvtx_range("flowkern.train.backward"):
            loss.backward()
        with nvtx_range("flowkern.train.optimizer"):
            max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            mean_loss = distributed.mean_over_ranks(loss.detach())
            # gradients are all-reduced, so every rank takes the same decision
            finite = bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
            else:
                self.skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        if finite:
            with nvtx_range("flowkern.train.ema"):
                self.ema.update()
        self.method.on_step_end(step)
        self.step_count += 1
        record = {"step": self.step_count, "loss": mean_loss.item(), "grad_norm": grad_norm.item(),
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped": self.skipped, **info}
        self.losses.append(record["loss"])
        return record

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> list[float]:
        """Train until `steps` (default config.steps) steps are done in total; returns the per-step losses."""
        total = self.config.steps if steps is None else steps
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step_count, disable=not self.progress, dynamic_ncols=True,
                   desc=type(self.method).__name__)
        log = self._open_log()
        t0, s0 = time.perf_counter(), self.step_count
        try:
            while self.step_count < total:
                record = self.train_step()
                rate = (self.step_count - s0) / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                if self.step_count % self.config.log_every == 0 or self.step_count == total:
                    record["steps_per_s"] = rate
                    bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{rate:.1f}", skipped=self.skipped)
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                every = self.config.checkpoint_every
                if every and self.step_count % every == 0 and self.step_count < total:
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if self.out_dir is not None:
            self.save()
        return self.losses

    def _open_log(self):
        if self.out_dir is None or self.rank != 0:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return open(self.out_dir / "metrics.jsonl", "a")

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        states = distributed.gather_objects({**rng.get_state(), "data": self.data_generator.get_state()})
        return {"method": self.method.name, "method_state": self.method.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step_count, "skipped": self.skipped,
                "losses": list(self.losses), "rng": states, "config": self.config.to_dict(), "extra": self.extra}

    def save(self, path=None) -> Path | None:
        """Write the checkpoint (rank 0; default out_dir/checkpoint.pt)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / "checkpoint.pt"
        state = self.state_dict()   # every rank joins the RNG gather
        out = checkpoint.save(path, state) if self.rank == 0 else None
        distributed.barrier()
        return out

    def load(self, path_or_state) -> None:
        """Resume exactly: weights, EMA, optimiser, scheduler, step, every RNG (this rank's)."""
        state = path_or_state if isinstance(path_or_state, dict) else checkpoint.load(path_or_state)
        if state.get("method") != self.method.name:
            raise checkpoint.CheckpointError(f"checkpoint was written by method {state.get('method')!r}, "
                                             f"not {self.method.name!r}")
        self.method.load_state_dict(state["method_state"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count, self.skipped = state["step"], state["skipped"]
        self.losses = list(state.get("losses", []))
        states = state["rng"]
        if len(states) == self.world:
            mine = states[self.rank]
            rng.set_state(mine)
            self.data_generator.set_state(mine["data"])
        else:   # another world size: keep the data stream, reseed the rest deterministically
            self.data_generator.set_state(states[0]["data"])
            rng.seed_all(self.config.seed + 1000 * self.rank + self.step_count)

    def eval_model(self) -> nn.Module:
        """A frozen copy of the model with the `config.eval_ema` weights (the raw weights when it is None)."""
        return self.ema.averaged(self.config.eval_ema)
