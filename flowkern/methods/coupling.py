"""Minibatch optimal-transport coupling of data and noise (Pooladian et al. 2023; Tong et al. 2023, "OT-CFM").

Within a block of n data points x₀ and n noise draws z, the permutation π that solves

    min_π Σ_i ‖x₀_i − z_π(i)‖²

(an exact linear assignment, O(n³), via `scipy.optimize.linear_sum_assignment`) pairs each x₀_i with z_π(i). The
noise of each pair is still N(0, I) and the data still the data, only the pairing changes: the conditional paths
x₀ + σ·z cross less, the probability-flow ODE of the coupled process is straighter, a one-step map is easier to
learn, and the consistency-training target (a one-sample estimate of that ODE) has less variance.

The coupling's strength depends on n, so it is done in blocks of a fixed size (`block`), the same in training and in
the multistep sampler that re-noises with it: a batch is cut into consecutive blocks; a last partial block of r < n
rows is paired as a member of a full block (its rows together with the n − r rows before them, against n fresh
draws), so every row sees the coupling of an n-block whenever the batch has at least n rows.

The assignment is solved on the host. A training step that paired its batch inside the loss would wait for it
(the cost matrix copied back, then milliseconds of solver while the device idles), so a method returns its
`NoisePairing` from `Method.noise_pairing()` and takes the paired noise as its loss's `noise=` argument: the
engine draws the next batch and its noise and pairs them in a background thread while the current step runs
(`flowkern.train.batches`).

The intermediate marginals of the coupled process are NOT those of the independent one (x₀ + σ·ε with ε ⟂ x₀), so
a model trained with this coupling must be re-noised with it too (`flowkern.methods.edm.consistency_sample`,
renoise='ot'); re-noising with independent noise leaves its training distribution (2-D toys: 8-step samples worse
than 1-step ones).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowkern._validate import check_finite_scalar, check_int, check_like, check_tensor
from flowkern.methods._util import check_choice

Coupling = Literal["independent", "ot"]
COUPLINGS = typing.get_args(Coupling)
DEFAULT_BLOCK = 256


def check_coupling(coupling) -> str:
    return check_choice("coupling", coupling, Coupling)


def _check_pair(x0: Tensor, z: Tensor) -> None:
    check_tensor("x0", x0)
    check_tensor("z", z)
    if x0.shape != z.shape or x0.dim() < 1:
        raise ValueError(f"x0 and z must have the same shape [B, ...], got {tuple(x0.shape)} and {tuple(z.shape)}")


def ot_permutation(x0: Tensor, z: Tensor) -> Tensor:
    """The permutation π [B] (int64, on x0's device) minimising Σ_i ‖x₀_i − z_π(i)‖², x0 and z: [B, ...] alike.

    The [B, B] squared distances are computed in float64 where x0 lives (a GPU forms a 256-block's in well under a
    millisecond, where the CPU took 15–50 ms for image-sized rows and had to receive both blocks first); only they
    cross to the CPU, where the assignment is solved exactly (O(B³), milliseconds at B = 256; ties broken
    deterministically). The copy back to the host is a synchronisation point of the step."""
    _check_pair(x0, z)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # scipy comes with scikit-learn (pip install 'flowkern[digits]')
        raise ImportError("the 'ot' coupling needs scipy (pip install scipy)") from err
    a = x0.detach().reshape(x0.shape[0], -1).to(torch.float64)
    b = z.detach().reshape(z.shape[0], -1).to(x0.device, torch.float64)
    rows, cols = linear_sum_assignment(torch.cdist(a, b).square_().cpu().numpy())
    perm = torch.empty(x0.shape[0], dtype=torch.int64)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(x0.device)


def _normal_draws(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) draws of `shape` in like's dtype and on its device, from `generator` wherever that lives."""
    device = like.device if generator is None else generator.device
    return torch.randn(shape, dtype=like.dtype, device=device, generator=generator).to(like.device)


def couple(x0: Tensor, z: Tensor, coupling: str, block: int = DEFAULT_BLOCK,
           generator: torch.Generator | None = None, scale: float = 1.0) -> Tensor:
    """Noise paired with x0 under `coupling`: 'independent' returns z itself; 'ot' returns, block by block of `block`
    rows, z re-ordered by `ot_permutation` (a last partial block is paired inside a full one against fresh draws
    scale·N(0, I) from `generator`, see the module docstring; `scale` is the standard deviation z was drawn with).
    x0, z: [B, ...] alike; the result is shaped and typed like z."""
    if check_coupling(coupling) == "independent":
        return z
    _check_pair(x0, z)
    scale = check_finite_scalar("scale", scale, positive=True)
    n = x0.shape[0]
    block = min(check_int("block", block, minimum=1), max(n, 1))   # fewer rows than a block: what there is
    out = torch.empty_like(z)
    full = n - n % block
    for lo in range(0, full, block):
        xb, zb = x0[lo:lo + block], z[lo:lo + block]
        out[lo:lo + block] = zb[ot_permutation(xb, zb)]
    if full < n:
        lo = n - block      # the trailing rows with the block - r before them, against a fresh block of draws
        fresh = _normal_draws((block, *z.shape[1:]), z, generator) * scale
        paired = fresh[ot_permutation(x0[lo:], fresh)]
        out[full:] = paired[full - lo:]
    return out


def paired_noise(x0: Tensor, coupling: str, block: int = DEFAULT_BLOCK, labels: Tensor | None = None) -> Tensor:
    """Fresh noise ε ~ N(0, I) shaped like x0, paired with it by `coupling` (`couple`); with labels [B], OT pairs
    within each class, so that ε given the class is still N(0, I), as a sampler draws it."""
    eps = torch.randn_like(x0)
    if check_coupling(coupling) == "independent":
        return eps
    if labels is None:
        return couple(x0, eps, coupling, block)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        eps[rows] = couple(x0[rows], eps[rows], coupling, block)
    return eps


@dataclass(frozen=True)
class NoisePairing:
    """How a method pairs its training noise with the data: ε = scale·z, z ~ N(0, I) shaped like x0, paired with it
    by minibatch OT in blocks of `block` rows (`couple`). `draw(x0, generator)` draws and pairs one batch's."""

    block: int = DEFAULT_BLOCK
    scale: float = 1.0

    def __post_init__(self):
        check_int("block", self.block, minimum=1)
        check_finite_scalar("scale", self.scale, positive=True)

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ε [B, ...] like x0 (its dtype and device), paired with x0; every draw from `generator` (None: the global
        RNG of x0's device)."""
        check_tensor("x0", x0)
        z = _normal_draws(x0.shape, x0, generator) * self.scale
        return couple(x0, z, "ot", self.block, generator, self.scale)


def noise_pairing(coupling: str, block: int, scale: float = 1.0) -> NoisePairing | None:
    """The `NoisePairing` of a method trained with `coupling` (None for 'independent': nothing to pair)."""
    return None if check_coupling(coupling) == "independent" else NoisePairing(block, scale)


def check_noise(noise: Tensor | None, x0: Tensor) -> Tensor | None:
    """A loss's `noise=` argument: None, or a tensor like x0 (shape, dtype, device)."""
    if noise is not None:
        check_like("noise", noise, "x0", x0)
    return noise
