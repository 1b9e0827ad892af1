"""flowkern: fused kernels for training few-step generative models (flow maps, consistency models, MeanFlow, sCM).

Public API
----------
* `flowkern.jvp_attention(q, k, v, q_t, k_t, v_t)` -> (out, out_t): softmax attention and its forward-mode tangent
  in one fused kernel pass.
* `flowkern.attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
  enable_gqa=False)`: drop-in for `F.scaled_dot_product_attention` (same signature and semantics) that works under
  `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward, with the tangent from the fused kernel.
* `flowkern.patch_sdpa()`: a context manager (and `.install()` / `.uninstall()`) routing every
  `F.scaled_dot_product_attention` call of an unmodified model to `flowkern.attention`.
* `flowkern.ops`: fused JVP-aware layer ops (layer_norm, rms_norm, modulate, gated_residual, gelu, silu,
  time_embedding, linear), each a drop-in plus an explicit `*_jvp` form returning (y, y_t) from one pass.
* `flowkern.flow_map`: fused flow-map jumps Φ = x + (s − t)·u (with the joint log-density), batched multi-time
  `evaluate`, `sample` / `sample_many` (steps (1, 2, 4, 8) in 8 model calls instead of 15), `semigroup_target`.
* `flowkern.divergence(fn, x, *args, method="hutchinson"|"hutch++"|"exact", probes=1, distribution="rademacher",
  seed=None, return_output=False)` -> [B]: per-sample divergence from forward-mode products; Philox probes
  regenerated in a fused Triton/CUDA reduction, K probes in one batched JVP.
* `flowkern.likelihood`: `ode_log_likelihood`, `flow_map_log_likelihood` (joint flow map (u, D)), `bits_per_dim`,
  `dequantize`.
* `flowkern.nn`: MLPFlowMap, DiT and layer modules built from the fused ops; `flowkern.jvp(model, primals,
  tangents, grad=False)`: the forward-mode pass (DDP-safe; no-grad before a grad pass with the same dropout masks,
  or grad=True: one pass, differentiable output, detached tangent).
* `flowkern.reference`: pure-PyTorch implementations with the same signatures (CPU fallback and test ground truth).
* `flowkern.use_backend(name)`: pick 'auto', 'triton', 'torch' for the ops inside a ``with`` block.
"""
from __future__ import annotations

import importlib.util as _importlib_util
import os as _os


def _expose_source_tree_kernels() -> None:
    """Installed, the Triton sources in `kernels/` are `flowkern.kernels`. Run from a source tree (PYTHONPATH=.),
    map that folder to the same name so both ways import the same modules."""
    if _importlib_util.find_spec("flowkern.kernels") is not None:
        return
    tree_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(tree_root, "kernels", "__init__.py")):
        __path__.append(tree_root)  # noqa: F821 - the package's own __path__


_expose_source_tree_kernels()

from flowkern._config import use_backend  # noqa: E402
from flowkern.attention import attention, jvp_attention, patch_sdpa  # noqa: E402
from flowkern import flow_map, likelihood, ops, reference  # noqa: E402
from flowkern.divergence import divergence  # noqa: E402
from flowkern.likelihood import bits_per_dim, dequantize, flow_map_log_likelihood, ode_log_likelihood  # noqa: E402
from flowkern import nn  # noqa: E402
from flowkern.nn.forward_mode import jvp  # noqa: E402

__all__ = ["attention", "bits_per_dim", "dequantize", "divergence", "flow_map", "flow_map_log_likelihood",
           "jvp", "jvp_attention", "likelihood", "nn", "ode_log_likelihood", "ops", "patch_sdpa", "reference",
           "use_backend"]
__version__ = "0.1.0"
