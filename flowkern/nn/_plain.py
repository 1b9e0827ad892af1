"""The modules' fast paths: skip what the Module already guarantees, and run plain PyTorch where nothing is fused.

* `inputs_ok`: the inputs a layer is about to pass to its op meet what the op would validate (x [..., features],
  every tensor of x's floating dtype and device). Then the layer calls the op's `*_prevalidated` form (dispatch
  only); otherwise the public op runs and its validation reports the problem.
* `network_pass`: a whole network's forward (`MLPFlowMap`, `DiT`) decides ONCE whether every layer inside may run
  as native ops (the conditions of `runs_plain`, autocast off, x in the parameters' dtype); the layers then skip
  their own checks (`in_plain_pass`), so a plain forward or grad pass costs what the `torch.nn` twin costs.
* `runs_plain`: on the PyTorch backend, with no forward-AD tangent on the input or the parameters (an ordinary
  forward or grad pass) and x already in its accumulation dtype, the fused op would run the same native ops; the
  layer calls them directly and autograd differentiates them. A tangent (`torch.func.jvp`, `forward_ad`), the
  Triton backend or a low-precision input goes through the op.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._autograd import no_tangent_possible
from flowkern._dispatch import select_backend

_PLAIN_DTYPES = (torch.float32, torch.float64)  # inputs already in their accumulation dtype


def inputs_ok(x, *params, features: int | None = None) -> bool:
    """x a floating tensor [..., features] (when given), every given parameter of its dtype and device."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
        return False
    if features is not None and x.shape[-1] != features:
        return False
    dtype, device = x.dtype, x.device
    for p in params:
        if p is not None and not (isinstance(p, torch.Tensor) and p.dtype == dtype and p.device == device):
            return False
    return True


def runs_plain(x: torch.Tensor, *params) -> bool:
    """True when the layer may run as native PyTorch ops (see the module docstring); inputs already `inputs_ok`."""
    if x.dtype not in _PLAIN_DTYPES:
        return False
    if not no_tangent_possible():
        for t in (x, *params):
            if t is not None and fwAD.unpack_dual(t).tangent is not None:
                return False
    return select_backend("flowkern.nn", x.device, x.dtype) == "torch"


def per_row_ok(p: torch.Tensor, x: torch.Tensor, *, shared_ok: bool) -> bool:
    """p is a row parameter of x: x's shape, [B, D] (per sample) or [D] (shared_ok)."""
    d = x.shape[-1]
    return p.shape == x.shape or (x.dim() >= 2 and p.shape == (x.shape[0], d)) or (shared_ok and p.shape == (d,))


_pass = threading.local()


def in_plain_pass() -> bool:
    """Inside a `network_pass` that runs as native ops end to end."""
    return getattr(_pass, "plain", False)


@contextlib.contextmanager
def network_pass(x: torch.Tensor, params_dtype: torch.dtype):
    """The forward of a whole network on x (already validated by the network): see the module docstring."""
    plain = (x.dtype in _PLAIN_DTYPES and x.dtype == params_dtype and no_tangent_possible()
             and not torch.is_autocast_enabled(x.device.type)
             and select_backend("flowkern.nn", x.device, x.dtype) == "torch")
    previous = getattr(_pass, "plain", False)
    _pass.plain = plain
    try:
        yield
    finally:
        _pass.plain = previous
