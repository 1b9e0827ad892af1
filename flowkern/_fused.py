"""The one op contract every fused op follows: ONE autograd.Function and the forward-AD entry points.

An op is a small frozen object (`FusedOp`) holding the static part of one call (backend, eps, flags, a seed, an
attention spec: never tensors) with methods working on plain tensors:
    forward(inputs, tangents) -> (y, y_t, aux)   y_t from the SAME kernel pass as y (None when tangents is None);
                                                 aux: tensors the backward needs (mean, rstd, LSE), stop-gradient.
                                                 With `n_outputs` > 1, y and y_t are tuples (entries may be None).
    backward(inputs, aux, dy, needs) -> one gradient (or None) per input; dy is a tuple when `n_outputs` > 1, and
                                        aux ends with the primal outputs when `saves_outputs` (attention's O).
    tangent(inputs, tangents) -> y_t             the tangent alone (default: forward's y_t)
    saved_inputs(inputs)                         the inputs backward/tangent read (others replaced by None)
    fold_batch(size, in_dims, args)              the vmap rule (optional): (op, args, batch) with the vmapped dim
                                                 folded into a leading batch dim of every argument and output
`FusedFunction` turns that into an autograd.Function with forward, setup_context, backward, jvp and vmap, and:
* `apply_dual(op, *inputs)` (the drop-in forms): unpacks the forward-AD tangents of the inputs
  (`torch.autograd.forward_ad.unpack_dual`, which also sees `torch.func.jvp`'s), passes them explicitly, and has
  `jvp` serve the tangent the fused forward already computed, so a JVP costs one pass over memory. That tangent
  is stop-gradient: where autograd could differentiate it, `flowkern._autograd.guard_tangent` makes a backward
  through it raise (never a silently zero gradient).
* `apply_explicit(op, inputs, tangents)` (the `*_jvp` forms): returns (y, y_t); y is differentiable, y_t is
  stop-gradient (a backward that reaches it raises).

PyTorch traps (docs/ops.md): a tangent served from ctx must be an output marked non-differentiable, and every
non-differentiable output must be marked in ONE `ctx.mark_non_differentiable` call. Kernels launched from
backward/jvp go through `flowkern._autograd.call_unwrapped` (torch.func wraps those tensors).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import once_differentiable

from flowkern._autograd import FastFunction, call_unwrapped, guard_tangent
from flowkern._nvtx import nvtx_range


class FusedOp:
    """Base of the per-call op objects (see the module docstring). Subclasses are frozen dataclasses."""

    name: str  # the public op, for messages and NVTX ranges (a dataclass field of the subclass)
    n_inputs: ClassVar[int] = 1
    n_outputs: ClassVar[int] = 1
    saves_outputs: ClassVar[bool] = False  # backward reads the primal outputs (appended to aux)
    # On the 'torch' backend without a tangent to serve, `apply_dual` runs `forward` under plain autograd (no
    # Function node). False where native autograd of the reference would cost memory (attention's key chunks).
    native_autograd_on_torch: ClassVar[bool] = True

    def forward(self, inputs, tangents):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, inputs, aux, dy, needs):  # pragma: no cover - abstract
        raise NotImplementedError

    def tangent(self, inputs, tangents):
        return self.forward(inputs, tangents)[1]

    def saved_inputs(self, inputs):
        return inputs

    def fold_batch(self, size: int, in_dims, args):
        raise NotImplementedError(f"{self.name}: torch.func.vmap over this op is not supported (no vmap rule); "
                                  "call it on the batched tensors directly")


def stop_grad_message(name: str) -> str:
    return (f"{name}: the tangent output is stop-gradient (every few-step method stop-grads its JVP target); "
            "backpropagating through it is not supported. Detach it, or compute the JVP under torch.no_grad(), "
            "before using it in a loss that is differentiated.")


def _not_a_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same memory as a tensor that is not a view (no copy).

    Outputs may be reshaped views of kernel buffers, or the two halves of one GEMM output, and autograd forbids
    in-place ops on view outputs of a custom Function. A fresh tensor over the same storage is not a view and, unlike
    `detach()`, has its own version counter (modifying y in place does not flag the y_t sharing its GEMM buffer).
    """
    if t is None or not t._is_view():
        return t
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def fold_vmapped(x: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    """[V at `dim`, B, ...] -> [V·B, ...]; an argument without a vmapped dim (`dim` None) is repeated V times."""
    if x is None:
        return None
    x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _as_tuple(op: FusedOp, y):
    if op.n_outputs == 1:
        return (y,)
    return (None,) * op.n_outputs if y is None else tuple(y)


class FusedFunction(FastFunction):
    """apply(op, serve_tangent, *inputs, *tangents) -> (*y, *y_t, *aux), one y and one y_t per primal output."""

    @staticmethod
    def forward(op: FusedOp, serve_tangent: bool, *args):
        inputs, tangents = args[:op.n_inputs], args[op.n_inputs:]
        has_tangent = any(t is not None for t in tangents)
        y, y_t, aux = op.forward(inputs, tangents if has_tangent else None)
        return tuple(_not_a_view(o) for o in (*_as_tuple(op, y), *_as_tuple(op, y_t), *aux))

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, serve_tangent, *args = inputs
        k = op.n_outputs
        ys, yts, aux = output[:k], output[k:2 * k], output[2 * k:]
        saved = op.saved_inputs(tuple(args[:op.n_inputs]))
        ctx.set_materialize_grads(False)
        ctx.op = op
        ctx.n_aux = len(aux)
        ctx.save_for_backward(*saved, *aux, *(ys if op.saves_outputs else ()))
        ctx.save_for_forward(*saved)
        has_tangent_out = any(t is not None for t in yts)
        # served by jvp(): computed in the same kernel pass as y
        ctx.fused_tangent = yts if serve_tangent and has_tangent_out else None
        ctx.has_tangent_output = has_tangent_out and not serve_tangent  # the explicit form's stop-grad y_t
        # one call: each mark_non_differentiable call replaces the previous one
        served = yts if ctx.fused_tangent is not None else ()
        ctx.mark_non_differentiable(*(t for t in (*aux, *served) if t is not None))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        op = ctx.op
        k, n = op.n_outputs, op.n_inputs
        if any(g is not None for g in grads[k:2 * k]):
            raise RuntimeError(stop_grad_message(op.name))
        nothing = (None, None) + (None,) * (2 * n)
        if all(g is None for g in grads[:k]):
            return nothing
        needs = tuple(ctx.needs_input_grad[2:2 + n])
        grads = call_unwrapped(_op_backward, op.name, op, needs, *grads[:k], *ctx.saved_tensors)
        grads = tuple(g if need else None for g, need in zip(grads, needs))
        return (None, None, *grads) + (None,) * n

    @staticmethod
    def jvp(ctx, _dop, _dserve, *dargs):
        op = ctx.op
        k, n = op.n_outputs, op.n_inputs
        if any(t is not None for t in dargs[n:]):
            raise NotImplementedError(f"{op.name}: forward-mode AD through the tangent inputs (second-order forward "
                                      "mode) is not supported")
        if ctx.has_tangent_output:
            # PyTorch cannot take a None tangent for the (differentiable) tangent output, and a zero one would be
            # silently wrong: it is the second-order term.
            raise NotImplementedError(
                f"{op.name}: the explicit (x, x_t) form was called on inputs that carry forward-mode tangents "
                "(inside torch.func.jvp or forward_ad); call the drop-in op there, whose tangent is fused")
        y_t = ctx.fused_tangent
        ctx.fused_tangent = None
        inputs = ctx.saved_tensors
        tangents = dargs[:n]
        rest = (None,) * (k + ctx.n_aux)
        if y_t is None:  # tangents arrived through forward AD only: one fused pass for them
            if all(t is None for t in tangents):
                return (None,) * k + rest
            y_t = _as_tuple(op, call_unwrapped(_op_tangent, op.name, op, len(inputs), *inputs, *tangents))
        message = stop_grad_message(op.name)
        return tuple(None if t is None else guard_tangent(t, (*inputs, *tangents), message) for t in y_t) + rest

    @staticmethod
    def vmap(info, in_dims, op: FusedOp, serve_tangent: bool, *args):
        """torch.func.vmap: the op's `fold_batch` rule folds the vmapped dim into the batch; one call; unfold."""
        size = info.batch_size
        folded_op, folded, batch = op.fold_batch(size, in_dims[2:], args)
        out = FusedFunction.apply(folded_op, serve_tangent, *folded)
        return (tuple(None if o is None else o.reshape(size, batch, *o.shape[1:]) for o in out),
                tuple(None if o is None else 0 for o in out))


def _op_backward(op: FusedOp, needs, *args):
    k, n = op.n_outputs, op.n_inputs
    dy, saved = args[:k], args[k:]
    grads = op.backward(saved[:n], saved[n:], dy[0] if k == 1 else dy, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _op_tangent(op: FusedOp, n_inputs: int, *args):
    return op.tangent(args[:n_inputs], args[n_inputs:])


def _primal_outputs(op: FusedOp, out):
    return out[0] if op.n_outputs == 1 else out[:op.n_outputs]


@torch.compiler.disable  # a graph break: Dynamo would silently drop the custom jvp (docs/ops.md)
def apply_dual(op: FusedOp, *inputs):
    """y = op(inputs); under forward AD (`forward_ad` or `torch.func.jvp`) its tangent is the fused one."""
    tangents = [fwAD.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None for x in inputs]
    has_tangent = any(t is not None for t in tangents)
    with nvtx_range(op.name):
        if op.backend == "torch" and not has_tangent and op.native_autograd_on_torch:
            # No tangent to serve and a PyTorch composite: autograd differentiates it natively (and vmap batches it),
            # with none of a custom Function's per-call overhead (~10x the maths of a small MLP layer on CPU).
            return op.forward(inputs, None)[0]
        return _primal_outputs(op, FusedFunction.apply(op, has_tangent, *inputs, *tangents))


@torch.compiler.disable
def apply_explicit(op: FusedOp, inputs, tangents):
    """(y, y_t) of op from one fused pass, with the tangents given explicitly (None = zero)."""
    with nvtx_range(op.name):
        out = FusedFunction.apply(op, False, *inputs, *tangents)
    k = op.n_outputs
    return (out[0], out[1]) if k == 1 else (out[:k], out[k:2 * k])


def primal(t):
    """The primal of a (possibly dual) tensor; anything else unchanged. For validating drop-in inputs."""
    return fwAD.unpack_dual(t).primal if isinstance(t, torch.Tensor) else t


def zeros_if_none(t, like: torch.Tensor) -> torch.Tensor:
    """A missing input tangent as an explicit zero tensor (for kernels that always read one)."""
    return torch.zeros_like(like) if t is None else t


_KERNEL_MODULES: dict = {}


def kernel_module(name: str):
    """The Triton kernel module `flowkern.kernels.<name>` (e.g. "norms", "attention.fwd"), imported on first use.

    The one lazy kernel import: importing Triton kernels decides interpreter vs compiled mode for the process, and a
    CPU-only user who never launches a kernel never imports Triton's JIT machinery."""
    mod = _KERNEL_MODULES.get(name)
    if mod is None:
        import importlib

        mod = _KERNEL_MODULES[name] = importlib.import_module(f"flowkern.kernels.{name}")
    return mod

