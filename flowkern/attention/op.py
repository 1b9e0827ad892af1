"""The fused op behind `flowkern.attention` and `flowkern.jvp_attention`, on the shared contract (`flowkern._fused`).

Inputs (q, k, v, attn_mask); outputs O (and Ȯ from the same pass when tangents are given); aux: the row
statistics (m, 1/l) [B, Hq, Nq, 2]. With S = c·QKᵀ + mask, P = softmax(S), O = PV (docs/attention.md):
* forward: one online-softmax pass; with tangents Ȯ = (P ⊙ (Ṡ − μ))V + PV̇, Ṡ = c·(Q̇Kᵀ + QK̇ᵀ), μᵢ = Σⱼ PᵢⱼṠᵢⱼ.
* backward: flash backward of O from the saved O and row statistics (P recomputed, never stored); on the CPU, SDPA's
  own CPU flash backward where it reads the call the same way (`cpu_sdpa_backward`).
* vmap: the vmapped dim is folded into the batch (one launch for all of it).
The PyTorch reference runs inside the Function too (`native_autograd_on_torch = False`): plain autograd through its
key-chunk loop would keep every chunk's P alive, the Nq×Nk memory the chunking avoids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from flowkern._fused import FusedOp, fold_vmapped
from flowkern.attention import cpu_sdpa_backward, reference, tangent_backward, tangent_triton_launch, triton_launch
from flowkern.attention.spec import AttentionSpec

_LAUNCHERS = {"torch": reference, "triton": triton_launch}
_TANGENT_BACKWARD = {"torch": tangent_backward, "triton": tangent_triton_launch}


def _zero_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device).expand_as(x)


def _fold_mask(attn_mask, dim, size: int, batch: int):
    """The mask of a vmapped call for the folded batch size·batch (broadcast dims stay broadcast)."""
    if attn_mask is None:
        return None
    mask = attn_mask.movedim(dim, 0) if dim is not None else attn_mask.unsqueeze(0)
    while mask.dim() < 5:  # [V or 1, (B), (H), Nq, Nk] -> rank 5 with broadcastable dims
        mask = mask.unsqueeze(1)
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return mask[0]  # shared by every vmapped sample and batch row: stays broadcast
    return mask.expand(size, batch, *mask.shape[2:]).reshape(size * batch, *mask.shape[2:])


@dataclass(frozen=True)
class AttentionOp(FusedOp):
    name: str
    spec: AttentionSpec
    n_inputs = 4
    saves_outputs = True
    native_autograd_on_torch = False

    @property
    def backend(self) -> str:
        return self.spec.backend

    def forward(self, inputs, tangents):
        q, k, v, attn_mask = inputs
        if tangents is None:
            o, o_t, stats = _LAUNCHERS[self.backend].attention_fwd(q, k, v, None, None, None, attn_mask, self.spec)
        else:
            q_t, k_t, v_t = (t if t is not None else _zero_like(x) for t, x in zip(tangents[:3], (q, k, v)))
            o, o_t, stats = _LAUNCHERS[self.backend].attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, self.spec)
        return o, o_t, (stats,)

    def backward(self, inputs, aux, dy, needs):
        q, k, v, attn_mask = inputs
        stats, o = aux
        if cpu_sdpa_backward.serves(self.spec, q):
            return (*cpu_sdpa_backward.attention_bwd(q, k, v, o, stats, dy.contiguous(), self.spec), None)
        return (*_LAUNCHERS[self.backend].attention_bwd(q, k, v, o, stats, dy.contiguous(), attn_mask, self.spec),
                None)

    def tangent_backward(self, inputs, tangents, aux, y_t, dy, dy_t, needs):
        """Reverse over forward: the gradients of (O, Ȯ) w.r.t. q, k, v and their tangents in one pass over the
        keys (flowkern/attention/tangent_backward.py), never an Nq×Nk matrix."""
        if dy_t is None:
            return super().tangent_backward(inputs, tangents, aux, y_t, dy, dy_t, needs)
        q, k, v, attn_mask = inputs
        stats, o = aux
        q_t, k_t, v_t = (t if t is not None else _zero_like(x) for t, x in zip(tangents[:3], (q, k, v)))
        o_t = y_t if y_t is not None else _zero_like(o)
        grads = _TANGENT_BACKWARD[self.backend].attention_tangent_bwd(
            q, k, v, q_t, k_t, v_t, o, o_t, stats, None if dy is None else dy.contiguous(), dy_t.contiguous(),
            attn_mask, self.spec)
        grads = (*grads[:3], None, *grads[3:], None)
        return tuple(g if need else None for g, need in zip(grads, needs))

    def fold_batch(self, size, in_dims, args):
        batch = self.spec.batch
        folded = [fold_vmapped(x, d, size) for x, d in zip(args, in_dims)]
        folded[3] = _fold_mask(args[3], in_dims[3], size, batch)
        op = dataclasses.replace(self, spec=dataclasses.replace(self.spec, batch=size * batch))
        return op, folded, batch
