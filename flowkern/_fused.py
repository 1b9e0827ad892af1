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
    tangent_input_grads(inputs, tangents, aux, y_t, dy_t, needs)
                                                 reverse-over-forward, the mixed term ∂⟨ḡ, ẏ(x, ẋ)⟩/∂x of each input
                                                 (default: autograd through the PyTorch reference's tangent)
    tangent_backward(inputs, tangents, aux, y_t, dy, dy_t, needs)
                                                 the whole backward of (y, ẏ): gradients of the inputs and of the
                                                 tangents (default: `backward` twice plus `tangent_input_grads`)
`FusedFunction` turns that into an autograd.Function with forward, setup_context, backward, jvp and vmap, and:
* `apply_dual(op, *inputs)` (the drop-in forms): unpacks the forward-AD tangents of the inputs
  (`torch.autograd.forward_ad.unpack_dual`, which also sees `torch.func.jvp`'s), passes them explicitly, and has
  `jvp` serve the tangent the fused forward already computed, so a JVP costs one pass over memory.
* `apply_explicit(op, inputs, tangents)` (the `*_jvp` forms): returns (y, y_t), both differentiable.

Differentiable tangents (reverse over forward). The tangent ẏ = J(x)·ẋ is linear in the tangents ẋ, so for a
cotangent ḡ of ẏ
    ∂⟨ḡ, ẏ⟩/∂ẋ = J(x)ᵀ·ḡ                  the op's own `backward` with dy = ḡ (its kernels, nothing new)
    ∂⟨ḡ, ẏ⟩/∂x = ∂⟨ḡ, J(x)·ẋ⟩/∂x          the mixed second-order term, `tangent_input_grads`
When grad mode is on and an input or a tangent requires grad, the served tangent goes through `_TangentFunction`
(it saves the inputs, the tangents and aux) and the explicit form saves its tangents; under `torch.no_grad()` (what
`flowkern.jvp` runs) nothing is recorded and nothing extra saved. Higher orders (a tangent of the tangent, double
backward) raise `NotImplementedError`: the backward launches its kernels through `call_unwrapped`, which is recorded
when a backward builds a graph (create_graph, or an outer `torch.func.grad`) and raises when differentiated.

PyTorch traps (docs/ops.md): a tangent served from ctx must be an output marked non-differentiable, and every
non-differentiable output must be marked in ONE `ctx.mark_non_differentiable` call. Kernels launched from
backward/jvp go through `flowkern._autograd.call_unwrapped` (torch.func wraps those tensors).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._autograd import HIGHER_ORDER, FastFunction, call_unwrapped, forward_levels, requires_grad
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

    def on_torch(self) -> "FusedOp":
        """The same op on the PyTorch backend (whose forward is a differentiable composite)."""
        import dataclasses

        return dataclasses.replace(self, backend="torch")

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        """∂⟨ḡ, ẏ⟩/∂x for each input x with needs[i] (None elsewhere): the mixed term of reverse over forward.

        Default: autograd through the PyTorch reference's tangent, recomputed in the inputs' dtypes (an op with a
        closed form or a kernel for it overrides this)."""
        ref = self.on_torch()
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() if need else x for x, need in zip(inputs, needs)]
            y_t = _as_tuple(self, ref.tangent(leaves, tangents))
            pairs = [(o, g) for o, g in zip(y_t, _as_tuple(self, dy_t))
                     if o is not None and g is not None and o.requires_grad]
            wrt = [x for x, need in zip(leaves, needs) if need]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                         if pairs else [None] * len(wrt))
        return tuple(next(grads) if need else None for need in needs)

    def tangent_backward(self, inputs, tangents, aux, y_t, dy, dy_t, needs):
        """Gradients of (inputs, tangents) for cotangents dy of y and dy_t of ẏ (either may be None); `needs` has
        one flag per input, then one per tangent."""
        n = self.n_inputs
        need_in, need_tan = tuple(needs[:n]), tuple(needs[n:])
        grads = [None] * (2 * n)
        if _present(dy) and any(need_in):
            grads[:n] = self.backward(inputs, aux, dy, need_in)
        if _present(dy_t) and any(need_tan):
            grads[n:] = self.backward(inputs, aux, dy_t, need_tan)
        if _present(dy_t) and any(need_in):
            grads[:n] = [_add(a, b) for a, b in zip(grads[:n], self.tangent_input_grads(
                inputs, tangents, aux, y_t, dy_t, need_in))]
        return tuple(g if need else None for g, need in zip(grads, needs))


def _present(dy) -> bool:
    """A cotangent (a tensor, or a tuple with at least one tensor) was given."""
    return any(g is not None for g in dy) if isinstance(dy, tuple) else dy is not None


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b.to(a.dtype)


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
        k, n = op.n_outputs, op.n_inputs
        ys, yts, aux = output[:k], output[k:2 * k], output[2 * k:]
        saved = op.saved_inputs(tuple(args[:n]))
        backward_aux = (*aux, *(ys if op.saves_outputs else ()))
        ctx.set_materialize_grads(False)
        ctx.op = op
        ctx.n_aux = len(backward_aux)
        ctx.n_forward_aux = len(aux)
        has_tangent_out = any(t is not None for t in yts)
        ctx.has_tangent_output = has_tangent_out and not serve_tangent  # the explicit form's differentiable y_t
        # the explicit form's backward through y_t also reads the tangents and y_t (recorded only under grad mode)
        explicit = (*args[n:], *yts) if ctx.has_tangent_output else ()
        ctx.save_for_backward(*saved, *backward_aux, *explicit)
        ctx.save_for_forward(*saved)
        # served by jvp(): computed in the same kernel pass as y, with what a backward through it reads
        ctx.fused_tangent = yts if serve_tangent and has_tangent_out else None
        ctx.fused_aux = backward_aux if ctx.fused_tangent is not None else None
        # one call: each mark_non_differentiable call replaces the previous one
        served = yts if ctx.fused_tangent is not None else ()
        ctx.mark_non_differentiable(*(t for t in (*aux, *served) if t is not None))

    @staticmethod
    def backward(ctx, *grads):
        op = ctx.op
        k, n = op.n_outputs, op.n_inputs
        nothing = (None, None) + (None,) * (2 * n)
        if all(g is None for g in grads[:2 * k]):
            return nothing
        saved = ctx.saved_tensors
        if all(g is None for g in grads[k:2 * k]):  # y alone: the op's backward
            needs = tuple(ctx.needs_input_grad[2:2 + n])
            grads = call_unwrapped(_op_backward, op.name, op, needs, *grads[:k], *saved[:n + ctx.n_aux])
            grads = tuple(g if need else None for g, need in zip(grads, needs))
            return (None, None, *grads) + (None,) * n
        needs = tuple(ctx.needs_input_grad[2:2 + 2 * n])
        grads = call_unwrapped(_op_tangent_backward, op.name, op, needs, ctx.n_aux, *grads[:2 * k], *saved)
        return (None, None, *grads)

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
        y_t, aux = ctx.fused_tangent, ctx.fused_aux
        ctx.fused_tangent = ctx.fused_aux = None
        inputs = ctx.saved_tensors
        tangents = dargs[:n]
        rest = (None,) * (k + ctx.n_forward_aux)
        differentiable = torch.is_grad_enabled() and any(requires_grad(t) for t in (*inputs, *tangents))
        if y_t is None:  # tangents arrived through forward AD only: one fused pass for them
            if all(t is None for t in tangents):
                return (None,) * k + rest
            if differentiable:  # the backward through the tangent reads the forward's aux too
                out = call_unwrapped(_op_forward, op.name, op, len(inputs), *inputs, *tangents)
                y_t, aux = out[k:2 * k], out[2 * k:]
                aux = (*aux, *(out[:k] if op.saves_outputs else ()))
            else:
                y_t = _as_tuple(op, call_unwrapped(_op_tangent, op.name, op, len(inputs), *inputs, *tangents))
        if differentiable:
            y_t = _TangentFunction.apply(op, len(aux), *inputs, *tangents, *aux, *y_t)
        return tuple(y_t) + rest

    @staticmethod
    def vmap(info, in_dims, op: FusedOp, serve_tangent: bool, *args):
        """torch.func.vmap: the op's `fold_batch` rule folds the vmapped dim into the batch; one call; unfold."""
        size = info.batch_size
        folded_op, folded, batch = op.fold_batch(size, in_dims[2:], args)
        out = FusedFunction.apply(folded_op, serve_tangent, *folded)
        return (tuple(None if o is None else o.reshape(size, batch, *o.shape[1:]) for o in out),
                tuple(None if o is None else 0 for o in out))


class _TangentFunction(FastFunction):
    """apply(op, n_aux, *inputs, *tangents, *aux, *y_t) -> y_t: a served tangent as a differentiable function of the
    op's inputs and tangents (its backward is `op.tangent_backward` with no cotangent of y)."""

    @staticmethod
    def forward(op: FusedOp, n_aux: int, *args):
        return tuple(_alias(t) for t in args[2 * op.n_inputs + n_aux:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, n_aux, *args = inputs
        ctx.set_materialize_grads(False)
        ctx.op = op
        ctx.n_aux = n_aux
        ctx.save_for_backward(*args[:2 * op.n_inputs + n_aux], *output)

    @staticmethod
    def backward(ctx, *grads_t):
        op = ctx.op
        n, k = op.n_inputs, op.n_outputs
        rest = (None,) * (ctx.n_aux + k)
        if all(g is None for g in grads_t):
            return (None, None) + (None,) * (2 * n) + rest
        saved = ctx.saved_tensors
        inputs, tangents, aux, y_t = (saved[:n], saved[n:2 * n], saved[2 * n:2 * n + ctx.n_aux],
                                      saved[2 * n + ctx.n_aux:])
        needs = tuple(ctx.needs_input_grad[2:2 + 2 * n])
        grads = call_unwrapped(_op_tangent_backward, op.name, op, needs, ctx.n_aux, *(None,) * k, *grads_t,
                               *inputs, *aux, *tangents, *y_t)
        return (None, None, *grads) + rest

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(HIGHER_ORDER.format(op=ctx.op.name, what="a tangent of its tangent output"))


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    """A new tensor over t's memory (not a view, no copy)."""
    if t is None:
        return None
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _op_backward(op: FusedOp, needs, *args):
    k, n = op.n_outputs, op.n_inputs
    dy, saved = args[:k], args[k:]
    grads = op.backward(saved[:n], saved[n:], dy[0] if k == 1 else dy, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _op_tangent_backward(op: FusedOp, needs, n_aux: int, *args):
    """args: dy (k), dy_t (k), inputs (n), aux (n_aux), tangents (n), y_t (k)."""
    k, n = op.n_outputs, op.n_inputs
    dy, dy_t, args = args[:k], args[k:2 * k], args[2 * k:]
    inputs, aux, tangents, y_t = args[:n], args[n:n + n_aux], args[n + n_aux:2 * n + n_aux], args[2 * n + n_aux:]
    one = (lambda t: t[0]) if k == 1 else (lambda t: tuple(t))
    grads = op.tangent_backward(inputs, tangents, aux, one(y_t), one(dy), one(dy_t), needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _op_forward(op: FusedOp, n_inputs: int, *args):
    y, y_t, aux = op.forward(args[:n_inputs], args[n_inputs:])
    return (*_as_tuple(op, y), *_as_tuple(op, y_t), *aux)


def _op_tangent(op: FusedOp, n_inputs: int, *args):
    return op.tangent(args[:n_inputs], args[n_inputs:])


def _primal_outputs(op: FusedOp, out):
    return out[0] if op.n_outputs == 1 else out[:op.n_outputs]


@torch.compiler.disable  # a graph break: Dynamo would silently drop the custom jvp (docs/ops.md)
def apply_dual(op: FusedOp, *inputs):
    """y = op(inputs); under forward AD (`forward_ad` or `torch.func.jvp`) its tangent is the fused one."""
    tangents = [fwAD.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None for x in inputs]
    has_tangent = any(t is not None for t in tangents)
    if has_tangent and forward_levels() > 1:  # the op would serve a first-order tangent only: never silently zero
        raise NotImplementedError(HIGHER_ORDER.format(op=op.name, what="a tangent of its tangent (nested forward-mode "
                                                                       "transforms)"))
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

