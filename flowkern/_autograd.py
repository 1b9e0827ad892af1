"""Autograd plumbing shared by every fused op (attention, the layer ops, flow-map jumps, the probe reduction).

* `FastFunction`: a `torch.autograd.Function` whose `apply` skips PyTorch's per-call signature binding
  (`inspect.signature(forward).bind`, about half of an `apply`'s host cost when `setup_context` is defined) unless
  a torch.func transform is active, where PyTorch's own path (`custom_function_call`) is needed. flowkern's
  Functions take positional arguments only and no defaults, so the binding changes nothing.

* `call_unwrapped(fn, *args)`: run `fn` (a kernel launcher) on plain tensors. Inside torch.func transforms an
  autograd.Function's backward and jvp receive tensors wrapped by functorch, whose memory a Triton kernel cannot
  read; functorch unwraps the inputs of a Function level by level before its forward runs and rewraps its outputs,
  so launching through one makes kernels work under `torch.func.grad`/`jvp`. The call has no derivative of its own:
  differentiating it (double backward) raises. A backward pass run while dual tensors are alive (the MeanFlow pattern
  with `forward_ad`, `loss.backward()` inside `dual_level()`) sees dual saved tensors: without create_graph the dual
  parts are dropped (nothing can read a tangent of the gradients then); with create_graph (forward-over-reverse,
  e.g. `torch.func.jvp(torch.func.grad(f))`, a Hessian-vector product) it raises.
* `guard_tangent(tangent, primals, message)`: a tangent served by a fused forward is stop-gradient. When autograd
  could differentiate it (grad mode on and a primal requiring grad, as in `torch.func.grad` over `torch.func.jvp`),
  this returns a copy whose backward raises `message` when a gradient reaches it, instead of letting the gradient
  through the tangent come out silently zero (a fused op that merely takes the tangent as an input passes none).
"""
from __future__ import annotations

import torch
import torch._functorch.utils
import torch.autograd.forward_ad as fwAD

HIGHER_ORDER = "{op}: {what} is not supported (first-order derivatives only)"

_functions_active = torch._C._are_functorch_transforms_active


def no_tangent_possible() -> bool:
    """No `forward_ad.dual_level` is open and no torch.func transform is active: no tensor can carry a forward-mode
    tangent, so per-tensor `unpack_dual` checks can be skipped (the plain-pass fast paths)."""
    return getattr(fwAD, "_current_level", 0) < 0 and not _functions_active()
_unwrap_dead = torch._functorch.utils.unwrap_dead_wrappers


class FastFunction(torch.autograd.Function):
    """An autograd.Function whose `apply` binds no signature outside torch.func (see the module docstring)."""

    @classmethod
    def apply(cls, *args):
        if _functions_active():
            return super().apply(*args)
        # torch._C._FunctionBase.apply, as torch.autograd.Function.apply calls it after binding the arguments
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead(args))


def _requires_grad(t) -> bool:
    """requires_grad of a tensor, seen through torch.func's wrappers (which report False themselves)."""
    if not isinstance(t, torch.Tensor):
        return False
    try:
        from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

        while is_functorch_wrapped_tensor(t):
            if t.requires_grad:
                return True
            t = get_unwrapped(t)
    except (ImportError, RuntimeError):  # pragma: no cover - private API moved: use the wrapper's own flag
        pass
    return t.requires_grad


class _CallUnwrapped(FastFunction):
    @staticmethod
    def forward(fn, op, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(HIGHER_ORDER.format(op=ctx.op, what="differentiating its backward or tangent"))

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(HIGHER_ORDER.format(op=ctx.op, what="forward mode over its backward"))

    @staticmethod
    def vmap(info, in_dims, fn, op, *args):
        raise NotImplementedError(f"{op}: torch.func.vmap over its backward (per-sample gradients) is not supported; "
                                  "vmap over its forward and forward mode works")


def call_unwrapped(fn, op: str, *args):
    """fn(*args) with every tensor argument unwrapped from torch.func's wrappers (see the module docstring)."""
    if any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args):
        if torch.is_grad_enabled():
            raise NotImplementedError(HIGHER_ORDER.format(
                op=op, what="forward-over-reverse (a tangent of its gradients, e.g. a Hessian-vector product)"))
        args = tuple(fwAD.unpack_dual(a).primal if isinstance(a, torch.Tensor) else a for a in args)
    return _CallUnwrapped.apply(fn, op, *args)


class _GuardedTangent(FastFunction):
    @staticmethod
    def forward(tangent, message, *primals):
        return tangent.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]
        ctx.n_primals = len(inputs) - 2
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        # the engine also visits this node with no gradient (a fused op downstream takes the tangent as an input
        # and returns None for it): only a real gradient through the tangent is an error
        if grad is not None:
            raise RuntimeError(ctx.message)
        return (None, None) + (None,) * ctx.n_primals


def guard_tangent(tangent: torch.Tensor, primals, message: str) -> torch.Tensor:
    """`tangent`, made to raise `message` if a backward pass ever reaches it (see the module docstring)."""
    if not torch.is_grad_enabled() or not any(_requires_grad(p) for p in primals):
        return tangent
    return _GuardedTangent.apply(tangent, message, *[p for p in primals if isinstance(p, torch.Tensor)])
