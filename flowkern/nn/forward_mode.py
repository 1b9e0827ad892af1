"""`jvp(model, primals, tangents)`: the no-grad forward-mode pass every few-step method needs, DDP- and
dropout-safe.

MeanFlow, sCM, AYF and Lagrangian/Eulerian flow maps take (u, du/dτ) along a direction — one JVP — and use it as a
stop-gradient target, then differentiate u in a SEPARATE ordinary pass. Pattern (docs/methods.md, docs/conventions.md):

    with torch.no_grad(): u, du = torch.func.jvp(model, primals, tangents)   # the fused kernels serve du
    loss(model(*primals), sg(target(u, du))).backward()                     # grad pass (through DDP if wrapped)

Three traps this function closes:
* `torch.func.jvp` cannot trace a `DistributedDataParallel` wrapper. The JVP pass has no gradient, so it needs no
  all-reduce: it runs on the wrapped `model.module`. The grad pass must go through the DDP wrapper (calling
  `.module` there would silently skip the gradient all-reduce).
* Dropout must draw the same masks in both passes: with preserve_rng_state=True (default) the CPU and CUDA RNG
  states are restored after the JVP pass, so the next forward of the model draws the same masks — provided nothing
  else draws random numbers in between (draw noise and times before the JVP call).
* The pass runs on `torch.autograd.forward_ad` duals (a fused op's tangent is the same either way, and a dual pass
  costs a fraction of `torch.func.jvp`'s host time per custom Function); `torch.func.jvp` serves calls made inside a
  torch.func transform.
* Times stay float32: nothing here casts the primals; the flowkern networks embed times in float32 whatever the
  autocast. A float16/bfloat16 tangent for a float32 time is refused (tangents must match their primals).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._validate import check_bool


def unwrap_ddp(model):
    """`model.module` for a DistributedDataParallel wrapper (nothing to synchronise without gradients), else
    `model`."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _as_tuple(name: str, value) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tensor or a tuple of tensors, got {type(value).__name__}")
    return tuple(value)


def _check_pairs(primals: tuple, tangents: tuple) -> None:
    if len(primals) != len(tangents):
        raise ValueError(f"tangents must have one entry per primal: {len(primals)} primals, {len(tangents)} tangents")
    if not primals:
        raise ValueError("primals must hold at least one tensor")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"primals[{i}] must be a floating torch.Tensor (pass labels and other non-differentiated "
                            f"inputs through kwargs), got {type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tangents[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != p.dtype:
            raise TypeError(f"tangents[{i}] has dtype {t.dtype} but primals[{i}] has {p.dtype}; they must match "
                            "(times and their tangents stay float32)")
        if t.shape != p.shape:
            raise ValueError(f"tangents[{i}] must have the shape of primals[{i}], {tuple(p.shape)}, got {tuple(t.shape)}")
        if t.device != p.device:
            raise ValueError(f"tangents[{i}] is on {t.device} but primals[{i}] is on {p.device}")


def jvp(model, primals, tangents, *, kwargs: dict | None = None, preserve_rng_state: bool = True):
    """(out, out_t) = (f(p), ∂f/∂p · ṗ) with f = model(*primals, **kwargs), in a no-grad forward-mode pass.

    model: a callable (an nn.Module, or a DistributedDataParallel wrapper, whose `.module` is used: this pass needs
    no gradient sync). primals, tangents: tensors or tuples of tensors, tangent i of primal i's shape, dtype and
    device (e.g. (x, t, s) and (v, 1, 0) for MeanFlow's du/dt). kwargs: non-differentiated inputs (class labels).
    Outputs follow the model: a tensor, or a tuple (u, D) with a tuple of tangents. Both are computed under
    `torch.no_grad()` (the tangents of flowkern's fused ops are stop-gradient by design) and carry no graph.

    preserve_rng_state: restore the CPU (and the primals' CUDA devices') RNG state after the pass, so the grad
    pass that follows draws the same dropout masks. Follow it with the grad pass through the (DDP-wrapped) model:

        >>> u, du_dt = flowkern.jvp(ddp_model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        >>> target = v - (t - r)[:, None] * du_dt                    # MeanFlow, stop-gradient
        >>> loss = (ddp_model(z, t, r) - target).square().mean()     # same dropout masks, gradients all-reduced
        >>> loss.backward()
    """
    primals = _as_tuple("primals", primals)
    tangents = _as_tuple("tangents", tangents)
    _check_pairs(primals, tangents)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    check_bool("preserve_rng_state", preserve_rng_state)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    fn = unwrap_ddp(model)
    devices = sorted({p.device.index or 0 for p in primals if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=preserve_rng_state), torch.no_grad():
        if _duals_available(primals, tangents):
            out, out_t = _dual_jvp(fn, primals, tangents, kwargs)
        else:
            out, out_t = torch.func.jvp(lambda *p: fn(*p, **kwargs), primals, tangents)
    # detached: under torch.func.jvp a custom Function's output can report requires_grad (with no graph) when a
    # parameter requires grad; the results of this pass are constants of the loss either way
    return _detach(out), _detach(out_t)


def _duals_available(primals, tangents) -> bool:
    """Forward-AD duals can hold these tensors: none is a torch.func wrapper (a call inside a torch.func transform)."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    return not any(is_functorch_wrapped_tensor(t) for t in (*primals, *tangents))


def _dual_jvp(fn, primals, tangents, kwargs):
    """(f(p), ∂f/∂p·ṗ) on forward-AD duals; an output without a tangent (independent of p) gets zeros."""
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)), **kwargs)
        return _split_duals(out)


def _split_duals(tree):
    if isinstance(tree, torch.Tensor):
        primal, tangent = fwAD.unpack_dual(tree)
        return primal, (torch.zeros_like(primal) if tangent is None else tangent)
    if isinstance(tree, (tuple, list)):
        pairs = [_split_duals(t) for t in tree]
        return type(tree)(p for p, _ in pairs), type(tree)(t for _, t in pairs)
    raise TypeError(f"model outputs must be tensors or tuples of tensors, got {type(tree).__name__}")


def _detach(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (tuple, list)):
        return type(tree)(_detach(t) for t in tree)
    return tree
