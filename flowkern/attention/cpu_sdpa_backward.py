"""On the CPU, the backward of O for a call SDPA could serve is SDPA's own CPU flash backward.

On the PyTorch backend, a pass that carries a forward-mode tangent runs the fused op (the reference forward gives O,
Ȯ and the row statistics (m, 1/l) in one walk over the keys). Its backward of O is the same maths as the backward of
an ordinary SDPA grad pass. Where SDPA reads the call the same way, it goes to PyTorch's CPU flash-attention backward,
`aten._scaled_dot_product_flash_attention_for_cpu_backward`. That backward recomputes P once per key block in native
code, where the reference walks the keys twice in Python. It reads the saved O and LSE = m + log l, which is exact
wherever m is finite.

Where it serves: no mask; one key/value head per query head; causal only top-left on square scores; Ev = E;
float32/float64 on the CPU. These are the conditions of the forward's hand-off to stock SDPA (`api._stock_sdpa_serves`)
plus Ev = E. The gradients are then those of SDPA's default CPU path for the same call. The one difference from the
reference: Δ = rowsum(dO ⊙ O), not Σ P dP. So with huge logits (|scale| ≫ 1), the vanishing dq and dk carry rounding,
as they do in SDPA's flash backward. Masked calls (padding, huge finite fills) keep the reference backward, which
is exact there.
"""
from __future__ import annotations

import torch

from flowkern.attention.spec import MASK_NONE, AttentionSpec

_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def serves(spec: AttentionSpec, q: torch.Tensor) -> bool:
    """SDPA's CPU flash backward computes this call's backward of O with the reference's meaning."""
    return (_CPU_FLASH_BACKWARD is not None and spec.backend == "torch" and q.device.type == "cpu"
            and spec.mask_kind == MASK_NONE and spec.q_heads == spec.kv_heads and spec.head_dim == spec.head_dim_v
            and (not spec.is_causal or (spec.seq_q == spec.seq_k and spec.causal_offset == 0))
            and q.dtype in (torch.float32, torch.float64))


def attention_bwd(q, k, v, o, stats, do, spec: AttentionSpec):
    """dQ, dK, dV of O from the saved O and row statistics [B, H, Nq, 2] = (m, 1/l)."""
    logsumexp = (stats[..., 0] - torch.log(stats[..., 1])).to(q.dtype).contiguous()
    return _CPU_FLASH_BACKWARD(do, q, k, v, o, logsumexp, 0.0, spec.is_causal, scale=spec.scale)
