"""JVP-aware networks and layers built only from `flowkern.ops` and `flowkern.attention`.

* `MLPFlowMap(dim, hidden=256, depth=4, time_dim=64, time_mode="ts", divergence_head=False, dropout=0.0)`:
  u(x, t, s) (or (u, D)) for vector data.
* `DiT(img_size, in_ch, *, patch=2, hidden=384, depth=12, heads=6, ...)`, `DiT.from_config("S/2", img_size=32,
  in_ch=4)`: u(x, t, s, y=None) for images, adaLN-zero (t, s) conditioning, optional labels with a null class.
* `jvp(model, primals, tangents, *, kwargs=None, preserve_rng_state=True, grad=False)`: the forward-mode pass
  (DDP-safe), no-grad before a grad pass with the same dropout masks, or with grad=True the grad pass itself
  (differentiable output, detached tangent). Also `flowkern.jvp`.
* Layers: `Linear`, `LayerNorm`, `RMSNorm` (torch.nn-compatible parameters and state dicts), `SiLU`, `GELU`,
  `Modulate` (adaLN, norm fused), `GatedResidual`, `AdaLNModulation`, `TimePairEmbedding`.
"""
from flowkern.nn.dit import DiT
from flowkern.nn.forward_mode import jvp, unwrap_ddp
from flowkern.nn.layers import GELU, AdaLNModulation, GatedResidual, LayerNorm, Linear, Modulate, RMSNorm, SiLU
from flowkern.nn.mlp import MLPFlowMap
from flowkern.nn.time import TimePairEmbedding

__all__ = ["GELU", "AdaLNModulation", "DiT", "GatedResidual", "LayerNorm", "Linear", "MLPFlowMap", "Modulate",
           "RMSNorm", "SiLU", "TimePairEmbedding", "jvp", "unwrap_ddp"]
