"""JVP-aware networks and layers built only from `flowkern.ops` and `flowkern.attention`.

* `MLPFlowMap(dim, hidden=256, depth=4, time_dim=64, time_mode="ts", divergence_head=False, dropout=0.0)`:
  u(x, t, s) (or (u, D)) for vector data.
* `jvp(model, primals, tangents, *, kwargs=None, preserve_rng_state=True)`: the no-grad forward-mode pass
  (DDP-safe, same dropout masks as the grad pass that follows). Also `flowkern.jvp`.
* Layers: `Linear`, `LayerNorm`, `RMSNorm` (torch.nn-compatible parameters and state dicts), `SiLU`, `GELU`,
  `Modulate` (adaLN, norm fused), `GatedResidual`, `AdaLNModulation`, `TimePairEmbedding`.
"""
from flowkern.nn.layers import GELU, AdaLNModulation, GatedResidual, LayerNorm, Linear, Modulate, RMSNorm, SiLU
from flowkern.nn.forward_mode import jvp, unwrap_ddp
from flowkern.nn.mlp import MLPFlowMap
from flowkern.nn.time import TimePairEmbedding

__all__ = ["AdaLNModulation", "GELU", "GatedResidual", "LayerNorm", "Linear", "MLPFlowMap", "Modulate", "RMSNorm",
           "SiLU", "TimePairEmbedding", "jvp", "unwrap_ddp"]
