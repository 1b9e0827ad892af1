"""The fused flow-map jump op: Φ(x, t, s) = x + (s − t)·u and the joint log-density update ℓ + (s − t)·D.

Convention: t = 0 is data, t = 1 is noise, and a flow map is parameterised by its average velocity,
Φ(x, t, s) = x + (s − t)·u(x, t, s) (docs/conventions.md). The samplers that call it live in
`flowkern.flow_map.sampling`.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._dispatch import select_backend
from flowkern._fused import apply_dual
from flowkern._nvtx import nvtx_range
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_like, check_tensor, check_times
from flowkern.flow_map.op import LAUNCHERS, JumpOp

LOGP_DTYPES = (torch.float32, torch.float64)
JUMP = "flowkern.flow_map.jump"


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    """Times are float32 (even for float16/bfloat16 states), float64 for float64 states."""
    return accumulation_dtype(x.dtype)


def _check_state(name: str, x) -> torch.Tensor:
    check_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, shape [B, ...], got a 0-d tensor")
    return x


def _check_logp(name: str, logp, batch: int, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, logp, ndim=1, dtypes=LOGP_DTYPES)
    if logp.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(logp.shape)}")
    if logp.device != like.device:
        raise ValueError(f"{name} is on {logp.device} but x is on {like.device}; they must be on one device")
    return logp


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, F] with unit feature stride (a view when possible)."""
    v = x.reshape(x.shape[0], -1)
    if v.shape[1] > 1 and v.stride(1) != 1:
        v = v.contiguous()
    return v


def _backend(op: str, x: torch.Tensor, logp: torch.Tensor | None) -> str:
    reason = None
    if logp is not None and logp.dtype == torch.float64 and x.dtype != torch.float64:
        reason = "float64 log-densities with a low-precision state take the 'torch' backend"
    backend = select_backend(op, x.device, x.dtype, supported=("triton", "cuda", "torch"), triton_reason=reason)
    if backend == "cuda" and reason is not None:
        raise ValueError(f"{op}: backend 'cuda' cannot serve these inputs: {reason}. Backends that can: ['torch']")
    return backend


def _has_tangent(v: torch.Tensor | None) -> bool:
    return v is not None and fwAD.unpack_dual(v).tangent is not None


def _needs_autograd(*tensors) -> bool:
    return any(v is not None and ((torch.is_grad_enabled() and v.requires_grad) or _has_tangent(v))
               for v in tensors)


def _jump(x, u, t, s, logp, div, backend: str, inplace: bool):
    """Validated inputs -> Φ (and ℓ'). `inplace` writes into x (and logp): callers check nothing needs autograd."""
    if inplace:
        xv = x.view(x.shape[0], -1)
        with nvtx_range(JUMP):
            LAUNCHERS[backend].jump_fwd(xv, _rows(u), t, s, logp, div, out=(xv, logp))
        return x if logp is None else (x, logp)
    y, logp_out = apply_dual(JumpOp(JUMP, backend), _rows(x), _rows(u), t, s, logp, div)
    y = y.view(x.shape)
    return y if logp is None else (y, logp_out)


# ----------------------------------------------------------------------------------------------------- jump


def jump(x, u, t, s, *, logp=None, div=None, inplace=False):
    """One flow-map jump Φ(x, t, s) = x + (s − t)·u, and the joint log-density update ℓ + (s − t)·D, fused.

    Args:
        x: state [B, ...]: float16, bfloat16, float32 (float64 on the 'torch' backend).
        u: average velocity u(x, t, s), shaped and typed like x.
        t, s: times in [0, 1] (t = 0 data, t = 1 noise): Python numbers, 0-d tensors or [B] tensors. Cast to
            float32 (float64 for float64 x) whatever the dtype of x.
        logp, div: optional [B] float32/float64 tensors ℓ and D (both or neither): the joint update
            ℓ' = ℓ + (s − t)·D of docs/conventions.md.
        inplace: write Φ into x (and ℓ' into logp). For samplers: raises if an input requires grad or carries a
            forward-mode tangent; x must be viewable as [B, F] with unit feature stride.
    Returns:
        Φ [B, ...] in the dtype of x; with logp, the pair (Φ, ℓ').
    Maths in float32 (float64 for float64 inputs). Differentiable w.r.t. x, u, t, s, logp, div in reverse mode
    (∂Φ/∂x = I, ∂Φ/∂u = (s − t)·I, ∂Φ/∂s = u = −∂Φ/∂t) and in forward mode (`torch.func.jvp`,
    `torch.autograd.forward_ad`): Φ̇ = ẋ + (s − t)·u̇ + (ṡ − ṫ)·u.
    Backends: 'triton' (one fused kernel), 'cuda' (by name, `csrc/flow_map_jump.cu`), 'torch' (reference).
    Each call checks that the times are finite and in [0, 1] (one host sync for CUDA time tensors).

    Example:
        >>> x_next = flowkern.flow_map.jump(x, model(x, t, s), t, s)
        >>> x_next, logp_next = flowkern.flow_map.jump(x, u, t, s, logp=logp, div=d)
    """
    op = JUMP
    _check_state("x", x)
    check_like("u", u, "x", x)
    batch = x.shape[0]
    tdt = _time_dtype(x)
    t = check_times("t", t, batch, device=x.device, dtype=tdt)
    s = check_times("s", s, batch, device=x.device, dtype=tdt)
    if (logp is None) != (div is None):
        raise ValueError("logp and div go together: pass both (the joint jump ℓ + (s − t)·D) or neither")
    if logp is not None:
        _check_logp("logp", logp, batch, x)
        check_like("div", div, "logp", logp)
    check_bool("inplace", inplace)
    if inplace:
        for name, v in (("x", x), ("u", u), ("t", t), ("s", s), ("logp", logp), ("div", div)):
            if _needs_autograd(v):
                raise ValueError(f"{op}: inplace=True is for inference (samplers), but {name} requires grad or "
                                 "carries a forward-mode tangent; use inplace=False")
        try:
            xv = x.view(batch, -1)
        except RuntimeError:
            xv = None
        if xv is None or (xv.shape[1] > 1 and xv.stride(1) != 1):
            raise ValueError(f"{op}: inplace=True needs x viewable as [B, F] with unit feature stride (contiguous "
                             f"samples), got shape {tuple(x.shape)} with strides {x.stride()}")
    backend = _backend(op, x, logp)
    return _jump(x, u, t, s, logp, div, backend, inplace)


def jump_prevalidated(x, u, t, s, *, logp=None, div=None):
    """`jump` for library code whose inputs are valid by construction (a training loss's own time draws): no value
    checks, so no host sync. x, u: [B, ...] alike; t, s: [B] floating tensors on x's device (cast to the time
    dtype); logp, div: None or [B] float tensors, together. Not in place; differentiable like `jump`."""
    tdt = _time_dtype(x)
    t, s = t.to(tdt), s.to(tdt)
    return _jump(x, u, t, s, logp, div, _backend(JUMP, x, logp), False)

