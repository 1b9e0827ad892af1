"""Input checks shared by every public op: each failure is a ValueError/TypeError naming the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """`x` is a tensor of rank `ndim` (when given) whose dtype is one of `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    return x


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    """`x` matches `ref` in dtype and device (and shape when `shape`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on one device")
    if shape and x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_finite_scalar(name: str, value, *, positive: bool = False) -> float:
    """`value` is a finite real Python/NumPy number (not a bool, not a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_times(name: str, value, batch: int, *, device: torch.device, dtype: torch.dtype = torch.float32,
                shapes: str = "[B]", check_values: bool = True) -> torch.Tensor:
    """A time argument in [0, 1] (t = 0 data, t = 1 noise), returned as a `dtype` tensor of shape [batch].

    `value` is a finite Python number, a 0-d tensor (broadcast over the batch), or a tensor of shape [batch].
    Floating tensors keep their autograd graph and forward-mode tangents (the cast to `dtype` is differentiable).
    `check_values` checks every entry is finite and in [0, 1] (one host sync on CUDA tensors).
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (times are float32), got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}; they must be on one device")
        if value.dim() == 0:
            value = value.expand(batch)
        elif value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape {shapes} = [{batch}], got {tuple(value.shape)}")
        value = value.to(dtype)
        if check_values:
            check_time_values(name, value)
        return value
    value = check_finite_scalar(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise), got {value}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_time_values(name: str, value: torch.Tensor) -> None:
    """Every entry of the time tensor `value` is finite and in [0, 1]."""
    if value.numel() == 0:
        return
    v = value.detach()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite, got non-finite entries")
    if not bool(((v >= 0) & (v <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise), got values in "
                         f"[{float(v.min())}, {float(v.max())}]")
