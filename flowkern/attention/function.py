"""The autograd.Functions behind `flowkern.attention` and `flowkern.jvp_attention`.

`FusedAttention.apply(q, k, v, q_t, k_t, v_t, attn_mask, spec, serve_tangent)` returns (O, Ȯ, LSE); with tangents
None, Ȯ is None and the kernel is the plain flash forward.
* backward: flash backward of O from the saved LSE. Ȯ is a stop-gradient output: a gradient reaching it raises.
* jvp, `serve_tangent=True` (the drop-in entry point, which unpacked the forward-AD tangents of q, k, v and passed
  them explicitly): the tangent of O is the Ȯ the fused forward already computed, no second pass. Ȯ is then marked
  non-differentiable (the entry point drops it; PyTorch also asserts when a differentiable output is reused as a
  tangent). Otherwise (tangents reaching the op only through forward AD) jvp runs one fused pass for them.

Under torch.func transforms, backward and jvp receive tensors wrapped by functorch, which a Triton kernel cannot
read: they launch kernels through `flowkern._autograd.call_unwrapped`. A served tangent that autograd could
differentiate goes through `guard_tangent`, so a gradient through it raises instead of coming out zero.
"""
from __future__ import annotations

import dataclasses

import torch

from flowkern._autograd import call_unwrapped, guard_tangent
from flowkern.attention import torch_launch, triton_launch
from flowkern.attention.spec import AttentionSpec

_LAUNCHERS = {"torch": torch_launch, "triton": triton_launch}

STOP_GRAD_MESSAGE = (
    "flowkern attention: the tangent (out_t of jvp_attention, or the tangent of flowkern.attention under forward AD) "
    "is stop-gradient (every few-step method stop-grads its JVP target); backpropagating through it is not supported. "
    "Detach it, or compute the JVP under torch.no_grad(), before using it in a loss that is differentiated.")
OP = "flowkern attention"


def launcher(spec: AttentionSpec):
    return _LAUNCHERS[spec.backend]


def _backward_kernel(q, k, v, o, lse, do, attn_mask, spec):
    return launcher(spec).attention_bwd(q, k, v, o, lse, do.contiguous(), attn_mask, spec)


def _tangent_kernel(q, k, v, q_t, k_t, v_t, attn_mask, spec):
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
        dq, dk, dv = call_unwrapped(_backward_kernel, OP, q, k, v, o, lse, do, ctx.attn_mask, ctx.spec)
        return dq, dk, dv, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, q_t, k_t, v_t, attn_mask, spec, serve_tangent):
        """torch.func.vmap: fold the vmapped dimension into the batch, run once, unfold."""
        size = info.batch_size

        def fold(x, dim, n_batch):
            if x is None:
                return None
            x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(size, *x.shape)
            return x.reshape(size * n_batch, *x.shape[2:])

        q, k, v, q_t, k_t, v_t = (fold(x, d, spec.batch) for x, d in zip((q, k, v, q_t, k_t, v_t), in_dims[:6]))
        if attn_mask is not None:
            mask_dim = in_dims[6]
            mask = attn_mask.movedim(mask_dim, 0) if mask_dim is not None else attn_mask.unsqueeze(0)
            while mask.dim() < 5:  # [V or 1, (B), (H), Nq, Nk] -> rank 5 with broadcastable dims
                mask = mask.unsqueeze(1)
            if mask.shape[0] == 1 and mask.shape[1] == 1:
                attn_mask = mask[0]  # shared by every vmapped sample and batch row: stays broadcast
            else:
                attn_mask = mask.expand(size, spec.batch, *mask.shape[2:]).reshape(size * spec.batch, *mask.shape[2:])
        folded = dataclasses.replace(spec, batch=size * spec.batch)
        o, o_t, lse = FusedAttention.apply(q, k, v, q_t, k_t, v_t, attn_mask, folded, serve_tangent)
        def unfold(x):
            return None if x is None else x.reshape(size, spec.batch, *x.shape[1:])

        return (unfold(o), unfold(o_t), unfold(lse)), (0, None if o_t is None else 0, 0)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dq_t, dk_t, dv_t, _dmask, _dspec, _dserve):
        if any(t is not None for t in (dq_t, dk_t, dv_t)):
            raise NotImplementedError(f"{OP}: forward mode through the tangent inputs (second order) is not supported")
        o_t = ctx.fused_tangent
        ctx.fused_tangent = None
        q, k, v = ctx.saved_tensors
        if o_t is None:  # tangents arrived through forward AD only: one fused pass for them
            tangents = [t if t is not None else torch.zeros((), dtype=x.dtype, device=x.device).expand_as(x)
                        for t, x in zip((dq, dk, dv), (q, k, v))]
            o_t = call_unwrapped(_tangent_kernel, OP, q, k, v, *tangents, ctx.attn_mask, ctx.spec)
        return guard_tangent(o_t, (q, k, v, dq, dk, dv), STOP_GRAD_MESSAGE), None, None
