"""Input checks of the networks: x, the two times (t, s) and class labels, each failure naming the argument."""
from __future__ import annotations

import torch

from flowkern._validate import check_finite_scalar, check_tensor

TIME_DTYPES = (torch.float32, torch.float64)


def check_x(x, *, dtype: torch.dtype, trailing: tuple[int, ...], shape_doc: str) -> int:
    """`x` is a floating tensor [B, *trailing] of the network's compute dtype; returns B."""
    check_tensor("x", x)
    if x.dim() != 1 + len(trailing) or tuple(x.shape[1:]) != trailing or x.shape[0] == 0:
        raise ValueError(f"x must have shape {shape_doc} with B >= 1, got {tuple(x.shape)}")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the network's parameters are {dtype}; cast one of them "
                        "(or run under torch.autocast)")
    return x.shape[0]


def check_time(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """A time input as a [B] tensor of float32 (or float64), never a low-precision one.

    Accepted: a float32/float64 tensor of shape [B], or a 0-d one or a Python number (broadcast over the batch;
    a number becomes float32). float16/bfloat16 and integer times are refused: time embeddings in low precision
    have collapsed sCM and MeanFlow runs (docs/precision.md). Values are not range-checked (no host sync in forward).
    Forward-mode tangents and autograd graphs are kept (`expand` is differentiable in both modes).
    """
    if not isinstance(value, torch.Tensor):
        value = check_finite_scalar(name, value)
        return torch.full((batch,), value, dtype=torch.float32, device=device)
    if value.dtype not in TIME_DTYPES:
        raise TypeError(f"{name} must be a float32 (or float64) tensor: times stay in full precision whatever the "
                        f"autocast, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}; they must be on one device")
    if value.dim() == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{batch}], got {tuple(value.shape)}")
    return value


def check_labels(y, batch: int, device: torch.device, num_classes: int) -> torch.Tensor:
    """Class labels [B] int64 in [0, num_classes] (num_classes is the null class); validated without a host sync
    only for dtype/shape/device (values are checked when cheap: on CPU)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must hold integer class labels (int64 or int32), got {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [B] = [{batch}], got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"y is on {y.device} but x is on {device}; they must be on one device")
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"y must lie in [0, {num_classes}] ({num_classes} is the null class), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y.long()
