"""Flow maps Φ(x, t, s) = x + (s − t)·u(x, t, s): fused jumps, batched multi-time evaluation, few-step samplers.

* `jump(x, u, t, s, *, logp=None, div=None, inplace=False)`: Φ (and the joint ℓ + (s − t)·D) in one fused kernel.
* `evaluate(model, x, t, s, *, logp=None, max_batch=None, return_u=False)`: K time pairs per sample, one model call.
* `sample(model, noise, *, steps=N | schedule=tensor, likelihood=False, ...)`: noise (t = 1) to data (t = 0).
* `sample_many(model, noise, steps=(1, 2, 4, 8), ...)`: several step counts together, 8 model calls instead of 15.
* `semigroup_target(model, x, t, r, s)`: (Φ(Φ(x, t, r), r, s), Φ(x, t, s)); r = None is the two-half-step target.
* `standard_normal_logp(x)`: log N(x; 0, I) per sample, the log-density at t = 1.
* `GaussianFlowMap`: the exact flow map of Gaussian data (from `flowkern.testing`; ground truth for tests).

Conventions and the model-callable contract: docs/conventions.md.
"""
from flowkern.flow_map.jump import jump
from flowkern.flow_map.sampling import (evaluate, sample, sample_many, semigroup_target, standard_normal_logp,
                                        uniform_schedule)
from flowkern.testing import GaussianFlowMap

__all__ = ["GaussianFlowMap", "evaluate", "jump", "sample", "sample_many", "semigroup_target",
           "standard_normal_logp", "uniform_schedule"]
