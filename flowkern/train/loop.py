"""The training loop shared by every method (`Trainer`); it owns every optimiser (docs/training.md).

One step: data → method.loss(net, x0, step) (bf16 autocast on CUDA; the method keeps time and loss in float32) →
for each network (the model, then each of `method.auxiliary_networks()`) its loss term's gradient with respect to
its own parameters only → gradient all-reduce (DDP) → clip → NaN/Inf guard → optimiser step (the model: AdamW/RAdam;
an auxiliary: Adam with its own lr, betas and weight decay; every one on the run's warm-up / decay schedule) → EMA →
method.on_step_end(step). Each phase runs inside an NVTX range (flowkern.train.data/loss/backward/optimizer/ema).

Under DDP (`torchrun`, see `distributed.setup`) the method's model is wrapped once and the wrapper is the `net`
given to `method.loss` for the gradient pass, so its gradients are all-reduced in the backward pass; an auxiliary
network not wrapped in DDP has its gradients averaged over the ranks explicitly. No-grad passes (teacher, EMA
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
from flowkern import _rng as rng
from flowkern.train import checkpoint, distributed
from flowkern.train.config import TrainConfig, lr_factor
from flowkern.train.ema import EMA


MODEL = "model"   # the key of the main network's loss term, optimiser and scheduler


def _build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    cls = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[config.optimizer]
    kwargs = {"decoupled_weight_decay": True} if config.optimizer == "radam" else {}
    return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **kwargs)


def _auxiliary_networks(method: Method) -> dict:
    """`method.auxiliary_networks()` (none for a method without the hook), checked."""
    aux = dict(getattr(method, "auxiliary_networks", dict)())
    for name, entry in aux.items():
        if name == MODEL or not isinstance(name, str):
            raise ValueError(f"auxiliary network names must be strings other than {MODEL!r}, got {name!r}")
        for attr in ("module", "lr"):
            if not hasattr(entry, attr):
                raise TypeError(f"auxiliary network {name!r} must have .module and .lr (flowkern.methods.base."
                                f"Auxiliary), got {type(entry).__name__}")
        if not isinstance(entry.module, nn.Module):
            raise TypeError(f"auxiliary network {name!r}: module must be a torch.nn.Module")
    return aux


def _loss_terms(method: Method, losses, names) -> dict[str, torch.Tensor]:
    """{network: float32 scalar loss} from what `method.loss` returned (a Tensor is the model's term)."""
    if isinstance(losses, torch.Tensor):
        losses = {MODEL: losses}
    if not isinstance(losses, dict) or MODEL not in losses:
        raise TypeError(f"{type(method).__name__}.loss must return a scalar tensor or a dict with a {MODEL!r} "
                        f"term, got {losses!r}")
    unknown = sorted(set(losses) - set(names))
    if unknown:
        raise ValueError(f"{type(method).__name__}.loss returned terms {unknown} for no network; networks: {names}")
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"{type(method).__name__}.loss term {name!r} must be a scalar tensor, got {loss!r}")
    return {name: losses[name].float() for name in names if name in losses}


def _mean_gradients_over_ranks(params) -> None:
    """p.grad ← mean over the ranks of p.grad, in one all-reduce (for networks outside the DDP wrapper)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not distributed.is_distributed():
        return
    flat = distributed.mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


class Trainer:
    """Trains `method` on batches drawn by `data(n, generator)` (e.g. a `flowkern.data.Dataset`'s `sample`).

    Args:
        method: a `flowkern.methods.Method` (moved to the device). The model's optimiser takes every trainable
            parameter of the method outside its auxiliary networks; each of `method.auxiliary_networks()` (if the
            method has the hook) gets an Adam of its own. The EMA tracks `method.model`.
        data: ``data(n, generator) -> [n, ...]`` float tensor on the CPU, deterministic for a generator state.
        config: `TrainConfig`.
        out_dir: where `metrics.jsonl` and `checkpoint.pt` go (None: nothing is written).
        device: default: the LOCAL_RANK GPU under CUDA, else the CPU.
        extra: metadata stored at the top level of every checkpoint (e.g. the network's constructor arguments,
            the dataset name; its keys must differ from the engine's).
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
        self.extra = dict(extra or {})
        clash = sorted(set(self.extra) & {"format", *checkpoint.ENGINE_KEYS, "losses"})
        if clash and clash != ["method_kwargs"]:
            raise ValueError(f"extra must not set the engine's checkpoint keys {clash}")
        self.rank, self.world, self.device = distributed.setup(device)
        self.config, self.data = config, data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and self.rank == 0
        rng.seed_all(config.seed + 1000 * self.rank)
        self.data_generator = torch.Generator().manual_seed(config.seed)   # the same stream on every rank
        self.method = method.to(self.device)
        self.net = method.model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(method.model, device_ids=ids)
        self.auxiliaries = _auxiliary_networks(method)
        aux_ids = {id(p) for a in self.auxiliaries.values() for p in a.module.parameters()}
        self.param_groups = {MODEL: [p for p in method.parameters() if p.requires_grad and id(p) not in aux_ids]}
        if not self.param_groups[MODEL]:
            raise ValueError("method has no trainable parameters")
        self.optimizers = {MODEL: _build_optimizer(self.param_groups[MODEL], config)}
        self.schedulers = {MODEL: torch.optim.lr_scheduler.LambdaLR(
            self.optimizers[MODEL], lambda s: lr_factor(s, config) * method.lr_scale(s))}
        for name, aux in self.auxiliaries.items():
            params = [p for p in aux.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"auxiliary network {name!r} has no trainable parameters")
            self.param_groups[name] = params
            betas = tuple(getattr(aux, "betas", (0.9, 0.999)))
            self.optimizers[name] = torch.optim.Adam(params, lr=aux.lr, betas=betas,
                                                     weight_decay=getattr(aux, "weight_decay", 0.0))
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name],
                                                                      lambda s: lr_factor(s, config))
        self.ema = EMA(method.model, config.ema_decays)
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast is for CUDA training; set bf16=False (or None) on the CPU")
        self.step_count, self.skipped = 0, 0
        self.losses: list[float] = []
        self.step_hooks: list = []   # called with each step's record (e.g. the --profile trace's step)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The model optimiser's parameters."""
        return self.param_groups[MODEL]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The model's optimiser."""
        return self.optimizers[MODEL]

    @property
    def scheduler(self):
        return self.schedulers[MODEL]

    # -- one step ------------------------------------------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        b = self.config.batch
        x = self.data(b * self.world, self.data_generator)
        return x[self.rank * b:(self.rank + 1) * b].to(self.device, non_blocking=True)

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _backward(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each term's gradient w.r.t. its network's parameters only; returns {network: grad norm before clipping}
        (the all-reduced gradient's, so every rank sees the same)."""
        names = list(terms)
        for i, name in enumerate(names):
            torch.autograd.backward(terms[name], inputs=self.param_groups[name], retain_graph=i < len(names) - 1)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        norms = {}
        for name in names:
            params = self.param_groups[name]
            module = self.auxiliaries[name].module if name != MODEL else None
            if module is not None and not isinstance(module, nn.parallel.DistributedDataParallel):
                _mean_gradients_over_ranks(params)
            norms[name] = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norms

    def train_step(self) -> dict:
        """One optimiser step of every network (or a skipped one); returns the step's log record."""
        step = self.step_count
        self.method.train()
        with nvtx_range("flowkern.train.data"):
            x0 = self._batch()
        with nvtx_range("flowkern.train.loss"), self._autocast():
            losses, info = self.method.loss(self.net, x0, step)
        terms = _loss_terms(self.method, losses, [MODEL, *self.auxiliaries])
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        with nvtx_range("flowkern.train.backward"):
            norms = self._backward(terms)
        with nvtx_range("flowkern.train.optimizer"):
            means = {name: distributed.mean_over_ranks(loss.detach()) for name, loss in terms.items()}
            # gradients are all-reduced, so every rank takes the same decision; one bad term skips the whole step
            finite = all(bool(torch.isfinite(means[n]) & torch.isfinite(norms[n])) for n in terms)
            if finite:
                for name in terms:
                    self.optimizers[name].step()
            else:
                self.skipped += 1
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
            for scheduler in self.schedulers.values():
                scheduler.step()
        if finite:
            with nvtx_range("flowkern.train.ema"):
                self.ema.update()
        self.method.on_step_end(step)
        self.step_count += 1
        record = {"step": self.step_count, "loss": means[MODEL].item(), "grad_norm": norms[MODEL].item(),
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped": self.skipped}
        for name in self.auxiliaries:
            if name in terms:
                record.update({f"{name}_loss": means[name].item(), f"{name}_grad_norm": norms[name].item()})
        record.update({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
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
                for hook in self.step_hooks:
                    hook(record)
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
        kwargs = self.method.hyperparameters() if hasattr(self.method, "hyperparameters") else \
            self.extra.get("method_kwargs", {})
        return {**self.extra, "method": self.method.name, "method_kwargs": kwargs,
                "method_state": self.method.state_dict(), "ema": self.ema.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "step": self.step_count, "skipped": self.skipped, "losses": list(self.losses), "rng": states,
                "config": self.config.to_dict()}

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
        """Resume exactly: weights, EMA, every optimiser and scheduler, step, every RNG (this rank's)."""
        if isinstance(path_or_state, dict):
            state = checkpoint.require(path_or_state, checkpoint.ENGINE_KEYS)
        else:
            state = checkpoint.load(path_or_state)
        if state.get("method") != self.method.name:
            raise checkpoint.CheckpointError(f"checkpoint was written by method {state.get('method')!r}, "
                                             f"not {self.method.name!r}")
        self.method.load_state_dict(state["method_state"])
        self.ema.load_state_dict(state["ema"])
        for group in ("optimizers", "schedulers"):
            missing = sorted(set(getattr(self, group)) - set(state[group]))
            if missing:
                raise checkpoint.CheckpointError(f"checkpoint has no {group[:-1]} state for {missing}")
            for name, obj in getattr(self, group).items():
                obj.load_state_dict(state[group][name])
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
