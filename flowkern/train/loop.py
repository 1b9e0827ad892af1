"""The training loop shared by every method (`Trainer`); it owns every optimiser (docs/training.md).

One step: data (and, for a method that pairs its noise with the data, that noise: both drawn and paired one step
ahead by a worker thread, `flowkern.train.batches`) → method.loss(net, x0, step[, noise]) (bf16 autocast on CUDA;
the method keeps time and loss in float32) → for each network (the model, then each of
`method.auxiliary_networks()`) its loss term's gradient with respect to its own parameters only → gradient
all-reduce (DDP) → clip → NaN/Inf guard → optimiser step (the model: AdamW/RAdam; an auxiliary: Adam with its own
lr, betas and weight decay; every one on the run's warm-up / decay schedule) → EMA → method.on_step_end(step). Each phase runs inside an NVTX range (flowkern.train.data/loss/backward/optimizer/ema).

The NaN/Inf guard decides on the device: the step's verdict is a tensor that the fused optimisers, the EMA and
the skip counters take as it is, so a step costs no host synchronisation. The host reads the device only every
`log_every` steps (the metrics line, the per-step losses since the last one, the skip counters): a run of
`max_consecutive_skips` skipped steps then ends it (`TrainingDiverged`).

`fit` saves a checkpoint every `checkpoint_every` steps and every `checkpoint_minutes` minutes (when it has an
out_dir) and at the end. On SIGINT or SIGTERM it finishes the step in progress, saves and raises
`TrainingInterrupted`; a second SIGINT stops at once.

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
from flowkern.train import checkpoint, distributed, fsdp, metrics_log
from flowkern.train.batches import Batches
from flowkern.train.signals import stop_requests
from flowkern.train.stops import RankTimeout, TrainingDiverged, TrainingInterrupted
from flowkern.train.config import TrainConfig, lr_factor
from flowkern.train.ema import EMA


MODEL = "model"   # the key of the main network's loss term, optimiser and scheduler


def _fused_kwargs(cls, device: torch.device) -> dict:
    """Adam and AdamW run fused where torch has the kernel (CPU, CUDA): they then take the NaN/Inf guard's verdict as
    a device tensor (`found_inf`) and skip the update on the device. RAdam has no fused kernel; on CUDA it keeps
    its step counts on the device (capturable)."""
    if cls in (torch.optim.Adam, torch.optim.AdamW) and device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"capturable": True} if device.type == "cuda" else {}


def _build_optimizer(params, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    cls = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[config.optimizer]
    kwargs = {"decoupled_weight_decay": True} if config.optimizer == "radam" else {}
    return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **kwargs,
               **_fused_kwargs(cls, device))


@torch.no_grad()
def _guarded_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (a float tensor on the device, 1.0 = skip), decided on the device: a fused
    optimizer skips its own kernel; any other steps and then takes back every parameter and state tensor where
    `skip` is set (state created by this step goes back to zeros, its initial value)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    keep = skip.bool()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
              if p in optimizer.state else {} for p in params]
    optimizer.step()
    for p, old, state in zip(params, before, states):
        p.copy_(torch.where(keep.to(p.device), old, p))
        for k, v in optimizer.state[p].items():
            if isinstance(v, torch.Tensor):
                prev = state.get(k, torch.zeros_like(v))
                v.copy_(torch.where(keep.to(v.device), prev, v))


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


def _copied_on(tree, device: torch.device):
    """`tree` (an optimiser state dict) with each tensor the optimiser would keep as it is cloned: those on
    `device`, and scalars (the step counts, which stay on the host); the others are copied when moved there."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.clone() if t.device == device or t.dim() == 0 else t, tree)


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
        tensorboard: also write every logged scalar as TensorBoard events to out_dir/tensorboard (needs the
            `tensorboard` package).
    """

    def __init__(self, method: Method, data, config: TrainConfig, *, out_dir=None, device=None, extra=None,
                 progress: bool = True, tensorboard: bool = False):
        if not isinstance(method, Method):
            raise TypeError(f"method must be a flowkern.methods.Method, got {type(method).__name__}")
        if not callable(data):
            raise TypeError(f"data must be callable data(n, generator), got {type(data).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if tensorboard:
            metrics_log.require_tensorboard()
        self.extra = dict(extra or {})
        clash = sorted(set(self.extra) & {"format", "checksum", *checkpoint.ENGINE_KEYS, "losses"})
        if clash and clash != ["method_kwargs"]:
            raise ValueError(f"extra must not set the engine's checkpoint keys {clash}")
        self.rank, self.world, self.device = distributed.setup(device, timeout=config.ddp_timeout)
        self.config, self.data = config, data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and self.rank == 0
        self.tensorboard = tensorboard
        rng.seed_all(config.seed + 1000 * self.rank)
        self.batches = Batches(data, config.batch, rank=self.rank, world=self.world, device=self.device,
                               seed=config.seed, pairing=method.noise_pairing())
        self.method = method.to(self.device)
        self.net = method.model
        self._template = None    # under FSDP: a whole copy of the model, for eval_model
        if config.fsdp:
            if not distributed.is_distributed():
                raise ValueError("fsdp shards the model across processes: launch with torchrun and WORLD_SIZE > 1")
            if not fsdp.available():
                raise ValueError(f"fsdp needs torch.distributed.fsdp.fully_shard (FSDP2), which torch "
                                 f"{torch.__version__} lacks")
            self._template = fsdp.shard(method)
        elif distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(method.model, device_ids=ids)
        self.auxiliaries = _auxiliary_networks(method)
        aux_ids = {id(p) for a in self.auxiliaries.values() for p in a.module.parameters()}
        self.param_groups = {MODEL: [p for p in method.parameters() if p.requires_grad and id(p) not in aux_ids]}
        if not self.param_groups[MODEL]:
            raise ValueError("method has no trainable parameters")
        self.optimizers = {MODEL: _build_optimizer(self.param_groups[MODEL], config, self.device)}
        self.schedulers = {MODEL: torch.optim.lr_scheduler.LambdaLR(
            self.optimizers[MODEL], lambda s: lr_factor(s, config) * method.lr_scale(s))}
        for name, aux in self.auxiliaries.items():
            params = [p for p in aux.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"auxiliary network {name!r} has no trainable parameters")
            self.param_groups[name] = params
            betas = tuple(getattr(aux, "betas", (0.9, 0.999)))
            self.optimizers[name] = torch.optim.Adam(params, lr=aux.lr, betas=betas,
                                                     weight_decay=getattr(aux, "weight_decay", 0.0),
                                                     **_fused_kwargs(torch.optim.Adam, self.device))
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name],
                                                                      lambda s: lr_factor(s, config))
        self.ema = EMA(method.model, config.ema_decays)
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast is for CUDA training; set bf16=False (or None) on the CPU")
        self.step_count = 0
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        # skip counters on the device: in total, the current run of consecutive skips, the longest run so far
        self._skipped, self._skip_run, self._longest_skip_run = zero.clone(), zero.clone(), zero.clone()
        self._losses: list[float] = []
        self._pending: list[torch.Tensor] = []     # per-step losses not yet read back from the device
        self.coordinator = distributed.Coordinator(self.rank, self.world)
        self.step_hooks: list = []   # called with each step's record (e.g. the --profile trace's step)

    @property
    def data_generator(self) -> torch.Generator:
        """The data stream's generator (the same on every rank; a batch drawn ahead has already advanced it)."""
        return self.batches.data_generator

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

    @property
    def skipped(self) -> int:
        """Steps skipped by the NaN/Inf guard so far (reads the device)."""
        return int(self._skipped)

    @property
    def losses(self) -> list[float]:
        """The model's loss of every step so far (NaN or Inf on a skipped one; reads the device)."""
        if self._pending:
            self._losses.extend(torch.stack(self._pending).tolist())
            self._pending.clear()
        return self._losses

    # -- one step ------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _backward(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each term's gradient w.r.t. its network's parameters only; returns {network: grad norm before clipping}
        (the all-reduced gradient's, so every rank sees the same)."""
        names = list(terms)
        for i, name in enumerate(names):
            if self.config.fsdp and name == MODEL:
                # FSDP2's gradients accumulate in the whole parameters it gathers, not in the sharded leaves that
                # `inputs=` would name: backward in full, then drop what reached the auxiliary networks
                torch.autograd.backward(terms[name], retain_graph=i < len(names) - 1)
                for aux in names[1:]:
                    for p in self.param_groups[aux]:
                        p.grad = None
            else:
                torch.autograd.backward(terms[name], inputs=self.param_groups[name],
                                        retain_graph=i < len(names) - 1)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        norms = {}
        for name in names:
            params = self.param_groups[name]
            module = self.auxiliaries[name].module if name != MODEL else None
            if module is not None and not isinstance(module, nn.parallel.DistributedDataParallel):
                _mean_gradients_over_ranks(params)
            norms[name] = fsdp.local(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return norms

    def _step(self) -> dict:
        """One optimiser step of every network, or a skipped one, decided on the device; returns the step's record
        with device tensors (read back by `_read`)."""
        step = self.step_count
        self.method.train()
        with nvtx_range("flowkern.train.data"):
            x0, noise = self.batches.next()
        with nvtx_range("flowkern.train.loss"), self._autocast():
            paired = {} if noise is None else {"noise": noise}
            losses, info = self.method.loss(self.net, x0, step, **paired)
        terms = _loss_terms(self.method, losses, [MODEL, *self.auxiliaries])
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.coordinator.heartbeat(step)
        with nvtx_range("flowkern.train.backward"):
            norms = self._backward(terms)
            if self._template is not None:
                fsdp.reshard(self.method)
        with nvtx_range("flowkern.train.optimizer"):
            means = {name: distributed.mean_over_ranks(loss.detach()) for name, loss in terms.items()}
            # gradients are all-reduced, so every rank takes the same decision; one bad term skips the whole step
            checks = [torch.isfinite(means[n]) & torch.isfinite(norms[n]).to(means[n].device) for n in terms]
            applied = torch.stack(checks).all().to(self.device)
            skip = (~applied).to(torch.float32)
            for name in terms:
                _guarded_step(self.optimizers[name], skip)
            for scheduler in self.schedulers.values():
                scheduler.step()
        with nvtx_range("flowkern.train.ema"):
            self.ema.update(applied)
        missed = (~applied).to(torch.int64)
        self._skipped += missed
        self._skip_run.mul_(missed).add_(missed)
        torch.maximum(self._longest_skip_run, self._skip_run, out=self._longest_skip_run)
        self.method.on_step_end(step)
        self.step_count += 1
        self._pending.append(means[MODEL].float())
        record = {"step": self.step_count, "loss": means[MODEL], "grad_norm": norms[MODEL],
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped": self._skipped}
        for name in self.auxiliaries:
            if name in terms:
                record.update({f"{name}_loss": means[name], f"{name}_grad_norm": norms[name]})
        record.update(info)
        return record

    @staticmethod
    def _read(record: dict) -> dict:
        """The record with every tensor read back as a number."""
        return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}

    def train_step(self) -> dict:
        """One optimiser step of every network (or a skipped one); returns the step's log record (numbers)."""
        record = self._read(self._step())
        self.losses   # read the step's loss back too
        return record

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> list[float]:
        """Train until `steps` (default config.steps) steps are done in total; returns the per-step losses.

        TrainingInterrupted after SIGINT/SIGTERM (the step finished, the checkpoint saved when there is an
        out_dir), TrainingDiverged after `max_consecutive_skips` skipped steps in a row (nothing saved: the last
        checkpoint is kept), RankTimeout when a DDP rank stopped answering."""
        total = self.config.steps if steps is None else steps
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step_count, disable=not self.progress, dynamic_ncols=True,
                   desc=type(self.method).__name__)
        log = self._open_log()
        t0, s0 = time.perf_counter(), self.step_count
        last_save = time.monotonic()
        every, minutes = self.config.checkpoint_every, self.config.checkpoint_minutes
        try:
            with stop_requests() as stop:
                while self.step_count < total:
                    record = self._guarded(self._step)
                    for hook in self.step_hooks:
                        hook(record)
                    bar.update(1)
                    if self.step_count % self.config.log_every == 0 or self.step_count == total:
                        record = self._read(record)
                        record["steps_per_s"] = (self.step_count - s0) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.1f}",
                                        skipped=record["skipped"])
                        if log is not None:
                            log.write(record)
                        self.losses   # read back the losses since the last line
                        self._check_divergence()
                    if stop.signum is not None:
                        self.coordinator.request("stop", self.step_count)
                    if minutes and self.out_dir is not None and time.monotonic() - last_save > 60 * minutes:
                        self.coordinator.request("save", self.step_count)
                        last_save = time.monotonic()
                    due = self.coordinator.due(self.step_count)
                    if "stop" in due:
                        self._check_divergence()
                        raise self._interrupted(stop.signum)
                    timed = "save" in due
                    if self.out_dir is not None and self.step_count < total and (
                            timed or every and self.step_count % every == 0):
                        self.save()
                        last_save = time.monotonic()
                self._check_divergence()
                if self.out_dir is not None:
                    self.save()                  # a signal now waits for the final checkpoint
                if stop.signum is not None:
                    raise self._interrupted(stop.signum, saved=self.out_dir is not None)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.losses

    def _guarded(self, fn):
        """fn(), turning a collective that timed out under DDP into RankTimeout naming the silent rank(s)."""
        try:
            return fn()
        except RuntimeError as err:
            silent = self.coordinator.silent_ranks()
            if not silent:
                raise
            who = ", ".join(f"rank {r} (last at step {s + 1})" for r, s in sorted(silent.items()))
            raise RankTimeout(f"rank {self.rank}: {who} stopped answering; the collective of step "
                              f"{self.step_count + 1} gave up after {self.config.ddp_timeout:g} s (ddp_timeout): "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err

    def _check_divergence(self) -> None:
        limit = self.config.max_consecutive_skips
        if limit and int(self._longest_skip_run) >= limit:
            raise TrainingDiverged(
                f"stopped at step {self.step_count}: {int(self._longest_skip_run)} consecutive steps skipped "
                f"(non-finite loss or gradient; {self.skipped} skipped in all); the run has diverged: lower the "
                f"learning rate or clip gradients harder" + (f"; the last checkpoint in {self.out_dir} is kept"
                                                             if self.out_dir is not None else ""))

    def _interrupted(self, signum, saved: bool = False) -> TrainingInterrupted:
        import signal

        signum = signum or signal.SIGTERM    # another rank received the signal
        path = self.out_dir / "checkpoint.pt" if saved else self.save() if self.out_dir is not None else None
        where = f"; checkpoint saved to {path or self.out_dir / 'checkpoint.pt'}" if self.out_dir else \
            " (no out_dir: nothing saved)"
        return TrainingInterrupted(f"{signal.Signals(signum).name}: stopped after step {self.step_count}{where}",
                                   signum, self.step_count, path)

    def _open_log(self):
        """metrics.jsonl (and the TensorBoard events) of this run, cut back to the current step (rank 0 only)."""
        if self.out_dir is None or self.rank != 0:
            return None
        return metrics_log.MetricsLog(self.out_dir, self.step_count, tensorboard=self.tensorboard)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        states = distributed.gather_objects({**rng.get_state(), **self.batches.state_dict()})
        kwargs = self.method.hyperparameters() if hasattr(self.method, "hyperparameters") else \
            self.extra.get("method_kwargs", {})
        full = fsdp.full_state if self.config.fsdp else (lambda x: x)    # sharded tensors gathered: full weights
        return {**self.extra, "method": self.method.name, "method_kwargs": kwargs,
                "method_state": full(self.method.state_dict()), "ema": full(self.ema.state_dict()),
                "optimizers": {k: full(o.state_dict()) for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "step": self.step_count, "skipped": self.skipped, "skip_run": int(self._skip_run),
                "losses": list(self.losses), "rng": states, "config": self.config.to_dict()}

    def save(self, path=None) -> Path | None:
        """Write the checkpoint (rank 0; default out_dir/checkpoint.pt). checkpoint.CheckpointWriteError if it cannot
        be written (the previous checkpoint is kept)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / "checkpoint.pt"
        state = self.state_dict()   # every rank joins the RNG gather
        out = checkpoint.save(path, state) if self.rank == 0 else None
        distributed.barrier()
        return out

    def load(self, path_or_state) -> None:
        """Resume exactly: weights, EMA, every optimiser and scheduler, step, every RNG (this rank's). A state dict
        given in memory is left as it was: the optimisers get copies of its tensors on this run's device (torch's
        `Optimizer.load_state_dict` keeps those as they are and would train them in place)."""
        if isinstance(path_or_state, dict):
            state = checkpoint.require(path_or_state, checkpoint.ENGINE_KEYS)
        else:
            state = checkpoint.load(path_or_state)
        if state.get("method") != self.method.name:
            raise checkpoint.CheckpointError(f"checkpoint was written by method {state.get('method')!r}, "
                                             f"not {self.method.name!r}")
        method_state, ema_state = state["method_state"], state["ema"]
        if self.config.fsdp:   # a checkpoint holds full tensors: shard them as this run's
            method_state = fsdp.sharded_state_dict(self.method, method_state)
            ema_state = {**ema_state, "shadow": {
                k: [fsdp.shard_like(v, ref) for v, ref in zip(vals, self.ema.shadow.get(float(k), vals))]
                for k, vals in ema_state["shadow"].items()}}
        try:
            self.method.load_state_dict(method_state)
            self.ema.load_state_dict(ema_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise checkpoint.CheckpointError(f"checkpoint does not fit this run's networks: "
                                             f"{str(err).strip().splitlines()[0]}") from None
        for group in ("optimizers", "schedulers"):
            missing = sorted(set(getattr(self, group)) - set(state[group]))
            if missing:
                raise checkpoint.CheckpointError(f"checkpoint has no {group[:-1]} state for {missing}")
            for name, obj in getattr(self, group).items():
                if group == "optimizers":
                    own = _copied_on(state[group][name], self.device)
                    if self.config.fsdp:
                        fsdp.load_optimizer_state(obj, own)
                    else:
                        obj.load_state_dict(own)
                else:
                    obj.load_state_dict(state[group][name])
        self.step_count = state["step"]
        self._skipped.fill_(int(state["skipped"]))
        self._skip_run.fill_(int(state.get("skip_run", 0)))
        self._longest_skip_run.copy_(self._skip_run)
        self._losses, self._pending = list(state.get("losses", [])), []
        states = state["rng"]
        reseed = self.config.seed + self.step_count
        if len(states) == self.world:
            mine = states[self.rank]
            rng.set_state(mine)
            self.batches.load_state_dict(mine, reseed=reseed)
        else:   # another world size: keep the data stream, reseed the rest deterministically
            self.batches.load_state_dict({"data": states[0]["data"]}, reseed=reseed)
            rng.seed_all(self.config.seed + 1000 * self.rank + self.step_count)

    def eval_model(self) -> nn.Module:
        """A frozen copy of the model with the `config.eval_ema` weights (the raw weights when it is None). Under
        FSDP a whole copy gathered from the shards: a collective, every rank calls it."""
        if self._template is None:
            return self.ema.averaged(self.config.eval_ema)
        decay = self.config.eval_ema
        params = self.ema.shadow[decay] if decay is not None else list(self.method.model.parameters())
        return fsdp.eval_copy(self._template, [fsdp.local(p.detach()) for p in params], self.device)
