"""`jvp(model, primals, tangents, grad=False)`: the forward-mode pass every few-step method needs, DDP- and
dropout-safe, as a no-grad pass before the grad pass (two passes) or as the grad pass itself (one pass).

MeanFlow, sCM, AYF and Lagrangian/Eulerian flow maps take (u, du/dτ) along a direction — one JVP — and use du/dτ in
a stop-gradient target for u. Two forms (docs/methods.md, docs/conventions.md):

    u, du = flowkern.jvp(model, primals, tangents)              # two passes: no grad, the fused kernels serve du,
    loss(model(*primals), sg(target(u, du))).backward()         # then the grad pass (through DDP if wrapped)

    u, du = flowkern.jvp(model, primals, tangents, grad=True)   # one pass: u differentiable, du detached
    loss(u, sg(target(u, du))).backward()

Traps this function closes:
* `torch.func.jvp` cannot trace a `DistributedDataParallel` wrapper, and calling `.module` in a grad pass would
  silently skip the gradient all-reduce. The no-grad pass needs no all-reduce and runs on `model.module`; the
  one-pass form runs the wrapper's own forward on plain primals and makes the duals inside it (module hooks), so
  DDP prepares the all-reduce as for any forward.
* Dropout must draw the same masks in both passes of the two-pass form: with preserve_rng_state=True (default) the
  CPU and CUDA RNG states are restored after the JVP pass, so the next forward of the model draws the same masks —
  provided nothing else draws random numbers in between (draw noise and times before the JVP call).
* The passes run on `torch.autograd.forward_ad` duals (a fused op's tangent is the same either way, and a dual pass
  costs a fraction of `torch.func.jvp`'s host time per custom Function); `torch.func.jvp` serves calls made inside a
  torch.func transform.
* Times stay float32: nothing here casts the primals; the flowkern networks embed times in float32 whatever the
  autocast. A float16/bfloat16 tangent for a float32 time is refused (tangents must match their primals).
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._fused import stop_gradient_tangents
from flowkern._nvtx import nvtx_range
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


def jvp(model, primals, tangents, *, kwargs: dict | None = None, preserve_rng_state: bool = True,
        grad: bool = False, tangent_grad: bool = False):
    """(out, out_t) = (f(p), ∂f/∂p · ṗ) with f = model(*primals, **kwargs).

    model: a callable (an nn.Module, or a DistributedDataParallel wrapper). primals, tangents: tensors or tuples of
    tensors, tangent i of primal i's shape, dtype and device (e.g. (x, t, s) and (v, 1, 0) for MeanFlow's du/dt).
    kwargs: non-differentiated inputs (class labels). Outputs follow the model: a tensor, or a tuple (u, D) with a
    tuple of tangents. `out_t` carries no graph unless tangent_grad=True (most few-step methods use the JVP as a
    stop-gradient target).

    grad=False (the two-pass form): a no-grad pass; `out` carries no graph either. A DDP wrapper's `.module` runs
    (this pass needs no gradient sync). preserve_rng_state: restore the CPU (and the primals' CUDA devices') RNG
    state after the pass, so the grad pass that follows draws the same dropout masks. Follow it with the grad pass
    through the (DDP-wrapped) model:

        >>> u, du_dt = flowkern.jvp(ddp_model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        >>> target = v - (t - r)[:, None] * du_dt                    # MeanFlow, stop-gradient
        >>> loss = (ddp_model(z, t, r) - target).square().mean()     # same dropout masks, gradients all-reduced
        >>> loss.backward()

    grad=True (the one-pass form): ONE forward with autograd on gives both; `out` is differentiable with respect to
    the parameters (and primals that require grad), `out_t` is detached. It runs through the model as given: a DDP
    wrapper's own forward, so the backward all-reduces the gradients. The RNG advances as that one forward draws
    (preserve_rng_state has nothing to restore for: there is no second pass):

        >>> u, du_dt = flowkern.jvp(ddp_model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), grad=True)
        >>> loss = (u - (v - (t - r)[:, None] * du_dt)).square().mean()
        >>> loss.backward()

    Same loss, gradients and dropout masks as the two-pass form, one forward fewer. flowkern's fused layers compute
    their tangent inside the kernel pass and save nothing for it; plain PyTorch ops inside a model (an embedding, a
    reshape, a user's own layer) build an autograd graph for their tangent while the pass runs (it is freed when the
    call returns, but counts in the peak memory).

    tangent_grad=True (reverse over forward, e.g. Lagrangian self-distillation's ∂_sΦ in the loss): the one-pass
    form with `out_t` differentiable too, with respect to the parameters, primals and tangents; the fused ops then
    save what the backward through their tangents reads (docs/ops.md). Implies grad=True.
    """
    primals = _as_tuple("primals", primals)
    tangents = _as_tuple("tangents", tangents)
    _check_pairs(primals, tangents)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    check_bool("preserve_rng_state", preserve_rng_state)
    check_bool("grad", grad)
    check_bool("tangent_grad", tangent_grad)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    with nvtx_range("flowkern.jvp"):
        return _run(model, primals, tangents, kwargs, preserve_rng_state, grad, tangent_grad)


def _run(model, primals, tangents, kwargs, preserve_rng_state, grad, tangent_grad):
    """The pass of `jvp` on validated arguments."""
    if grad or tangent_grad:
        # a stop-gradient target: the fused ops save nothing for a backward through their tangents
        tangent_mode = contextlib.nullcontext() if tangent_grad else stop_gradient_tangents()
        with torch.enable_grad(), tangent_mode:
            out, out_t = _one_pass(model, primals, tangents, kwargs)
        return out, (out_t if tangent_grad else _detach(out_t))
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


def _one_pass(model, primals, tangents, kwargs):
    """(out, out_t) from one forward with grad on (`jvp(grad=True)`)."""
    if not _duals_available(primals, tangents):  # inside a torch.func transform: functorch's own jvp
        fn = unwrap_ddp(model)
        return torch.func.jvp(lambda *p: fn(*p, **kwargs), primals, tangents)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return _ddp_dual_jvp(model, primals, tangents, kwargs)
    sharded = _fsdp_modules(model)
    if sharded:
        with _duals_hidden_from_fsdp(sharded):
            return _dual_jvp(model, primals, tangents, kwargs)
    return _dual_jvp(model, primals, tangents, kwargs)


def _fsdp_modules(model) -> list:
    """The FSDP2-sharded modules (`fully_shard`) in `model`, outermost first (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    if not isinstance(model, torch.nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _duals_hidden_from_fsdp(modules):
    """FSDP2's forward hooks see primals only; each sharded module's own forward sees the duals.

    FSDP2's pre-forward routes the inputs that require grad through an autograd Function without a forward-mode
    rule (to trigger its post-backward), and its post-forward registers the outputs' pre-backward hooks. Around
    each sharded module, a hook before FSDP's unpacks the dual inputs (the primals keep their graph) and one after
    it makes them dual again; the outputs likewise around its post-forward."""
    held: dict[int, list] = {}

    def _hide(module, tensors):
        pairs = [fwAD.unpack_dual(a) if isinstance(a, torch.Tensor) else (a, None) for a in tensors]
        held.setdefault(id(module), []).append([t for _, t in pairs])
        return tuple(p for p, _ in pairs)

    def _reveal(module, tensors):
        tangents = held[id(module)].pop()
        return tuple(a if t is None else fwAD.make_dual(a, t.to(a.dtype)) for a, t in zip(tensors, tangents))

    def hide_inputs(module, args, kw):
        return _hide(module, args), kw

    def reveal_inputs(module, args, kw):
        return _reveal(module, args), kw

    def hide_outputs(module, args, output):
        single = isinstance(output, torch.Tensor)
        return _hide(module, (output,) if single else output)[0] if single else type(output)(_hide(module, output))

    def reveal_outputs(module, args, output):
        single = isinstance(output, torch.Tensor)
        return _reveal(module, (output,))[0] if single else type(output)(_reveal(module, output))

    handles = []
    try:
        for m in modules:
            handles += [m.register_forward_pre_hook(hide_inputs, with_kwargs=True, prepend=True),
                        m.register_forward_pre_hook(reveal_inputs, with_kwargs=True),
                        m.register_forward_hook(hide_outputs, prepend=True),
                        m.register_forward_hook(reveal_outputs)]
        yield
    finally:
        for h in handles:
            h.remove()


def _ddp_dual_jvp(ddp, primals, tangents, kwargs):
    """The DDP wrapper's forward on plain primals, the duals made and unpacked around the wrapped module.

    DDP's forward prepares the gradient all-reduce; with `find_unused_parameters` or `static_graph` it also routes
    the outputs through an autograd Function that has no forward-mode rule. So the wrapper sees plain tensors: a
    forward pre-hook on `ddp.module` makes the primals dual, a forward hook hands back the outputs' primals (still
    differentiable) and keeps their tangents."""
    held = {}

    def make_duals(module, args, kw):
        return tuple(fwAD.make_dual(a, t) for a, t in zip(args, tangents)) + tuple(args[len(tangents):]), kw

    def split_outputs(module, args, kw, output):
        held["out"], held["out_t"] = _split_duals(output)
        return held["out"]

    with fwAD.dual_level():
        hooks = (ddp.module.register_forward_pre_hook(make_duals, with_kwargs=True, prepend=True),
                 ddp.module.register_forward_hook(split_outputs, with_kwargs=True))
        try:
            out = ddp(*primals, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return out, held["out_t"]

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
