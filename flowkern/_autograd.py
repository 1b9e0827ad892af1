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
* `forward_levels()`: the number of nested forward-mode levels (a fused op refuses a tangent of its tangent).
* `requires_grad(t)`: whether autograd records operations on t, seen through torch.func's wrappers (decides
  whether a fused op's tangent is made differentiable, flowkern/_fused.py).
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


def forward_levels() -> int:
    """How many forward-mode levels are open: the `torch.func.jvp` transforms (each opens the one `forward_ad` level
    PyTorch allows), else 1 for an open `forward_ad.dual_level`. Two or more around a fused op means a tangent of
    its tangent is being taken (second-order forward mode)."""
    levels = int(getattr(fwAD, "_current_level", -1) >= 0)
    if _functions_active():
        from torch._C._functorch import TransformType
        from torch._functorch import pyfunctorch

        jvps = sum(i.key() == TransformType.Jvp for i in pyfunctorch.retrieve_all_functorch_interpreters())
        levels = max(levels, jvps)
    return levels


class FastFunction(torch.autograd.Function):
    """An autograd.Function whose `apply` binds no signature outside torch.func (see the module docstring)."""

    @classmethod
    def apply(cls, *args):
        if _functions_active():
            return super().apply(*args)
        # torch._C._FunctionBase.apply, as torch.autograd.Function.apply calls it after binding the arguments
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead(args))


def requires_grad(t) -> bool:
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
    if no_tangent_possible() and not torch.is_grad_enabled():
        return fn(*args)  # nothing wrapped, nothing dual, nothing recorded: the plain call (an ordinary backward)
    if any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args):
        if torch.is_grad_enabled():
            raise NotImplementedError(HIGHER_ORDER.format(
                op=op, what="forward-over-reverse (a tangent of its gradients, e.g. a Hessian-vector product)"))
        args = tuple(fwAD.unpack_dual(a).primal if isinstance(a, torch.Tensor) else a for a in args)
    return _CallUnwrapped.apply(fn, op, *args)
