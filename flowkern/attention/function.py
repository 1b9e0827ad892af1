"""The autograd.Functions behind `flowkern.attention` and `flowkern.jvp_attention`.

`FusedAttention.apply(q, k, v, q_t, k_t, v_t, attn_mask, spec, serve_tangent)` returns (O, Ȯ, LSE); with tangents
None, Ȯ is None and the kernel is the plain flash forward.
* backward: flash backward of O from the saved LSE. Ȯ is a stop-gradient output: a gradient reaching it raises.
* jvp, `serve_tangent=True` (the drop-in entry point, which unpacked the forward-AD tangents of q, k, v and passed
  them explicitly): the tangent of O is the Ȯ the fused forward already computed, no second pass. Ȯ is then marked
  non-differentiable (the entry point drops it; PyTorch also asserts when a differentiable output is reused as a
  tangent). Otherwise (tangents reaching the op only through forward AD) jvp runs one fused pass for them.

Under torch.func transforms, backward and jvp receive tensors wrapped by functorch, which a Triton kernel cannot
read. So they launch kernels through two small Functions (`_BackwardKernel`, `_TangentKernel`): functorch unwraps
the inputs of a Function level by level before its forward runs, and rewraps the outputs.
"""
from __future__ import annotations

import torch

from flowkern.attention import torch_launch, triton_launch
from flowkern.attention.spec import AttentionSpec

_LAUNCHERS = {"torch": torch_launch, "triton": triton_launch}

STOP_GRAD_MESSAGE = (
    "flowkern.jvp_attention: the tangent output `out_t` is stop-gradient (every few-step method stop-grads its JVP "
    "target); backpropagating through it is not supported. Detach it (`out_t.detach()`) before using it in a loss "
    "that is differentiated.")
HIGHER_ORDER_MESSAGE = ("flowkern attention supports first-order derivatives (a gradient of the output, a tangent "
                        "of the output); {what} is not supported")


def launcher(spec: AttentionSpec):
    return _LAUNCHERS[spec.backend]


class _KernelCall(torch.autograd.Function):
    """Base of the kernel-launching Functions: no derivatives of their own."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(HIGHER_ORDER_MESSAGE.format(what="differentiating the backward or the tangent"))

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(HIGHER_ORDER_MESSAGE.format(what="forward mode over the backward or the tangent"))


class _BackwardKernel(_KernelCall):
    @staticmethod
    def forward(q, k, v, o, lse, do, attn_mask, spec):
        return launcher(spec).attention_bwd(q, k, v, o, lse, do.contiguous(), attn_mask, spec)


class _TangentKernel(_KernelCall):
    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, attn_mask, spec):
        return launcher(spec).attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec)[1]


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec, serve_tangent: bool):
        return launcher(spec).attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, attn_mask, spec, serve_tangent = inputs
        o, o_t, lse = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.attn_mask = attn_mask
        ctx.spec = spec
        # served by jvp(): computed in the same kernel pass as o
        ctx.fused_tangent = o_t if serve_tangent else None
        # one call: each mark_non_differentiable call replaces the previous one
        ctx.mark_non_differentiable(*((lse, o_t) if ctx.fused_tangent is not None else (lse,)))

    @staticmethod
    def backward(ctx, do, do_t, _dlse):
        if do_t is not None:
            raise RuntimeError(STOP_GRAD_MESSAGE)
        if do is None:
            return (None,) * 9
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _BackwardKernel.apply(q, k, v, o, lse, do, ctx.attn_mask, ctx.spec)
        return dq, dk, dv, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, dq_t, dk_t, dv_t, _dmask, _dspec, _dserve):
        if any(t is not None for t in (dq_t, dk_t, dv_t)):
            raise NotImplementedError(HIGHER_ORDER_MESSAGE.format(what="forward mode through the tangent inputs"))
        o_t = ctx.fused_tangent
        ctx.fused_tangent = None
        if o_t is None:  # tangents arrived through forward AD only: one fused pass for them
            q, k, v = ctx.saved_tensors
            tangents = [t if t is not None else torch.zeros((), dtype=x.dtype, device=x.device).expand_as(x)
                        for t, x in zip((dq, dk, dv), (q, k, v))]
            o_t = _TangentKernel.apply(q, k, v, *tangents, ctx.attn_mask, ctx.spec)
        return o_t, None, None
