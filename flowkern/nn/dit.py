"""`DiT`: a diffusion transformer flow map u(x, t, s) with adaLN-zero two-time conditioning, built only from
`flowkern.ops` and `flowkern.attention` (Peebles & Xie 2023, conditioned on the time pair (t, s))."""
from __future__ import annotations

import torch

from flowkern._validate import check_bool, check_finite_scalar, check_int
from flowkern.attention import attention
from flowkern.nn._inputs import check_labels, check_time, check_x
from flowkern.nn._plain import network_pass
from flowkern.nn.layers import GELU, AdaLNModulation, GatedResidual, Linear, Modulate, RMSNorm
from flowkern.nn.patch import patchify, sincos_pos_embed_2d, unpatchify
from flowkern.nn.time import TimePairEmbedding

# name -> (hidden, depth, heads, patch); DiT paper sizes plus a tiny one for tests
CONFIGS = {
    "tiny/2": (32, 2, 2, 2),
    "S/2": (384, 12, 6, 2), "S/4": (384, 12, 6, 4), "S/8": (384, 12, 6, 8),
    "B/2": (768, 12, 12, 2), "B/4": (768, 12, 12, 4), "B/8": (768, 12, 12, 8),
    "L/2": (1024, 24, 16, 2), "XL/2": (1152, 28, 16, 2),
}


class Attention(torch.nn.Module):
    """Multi-head self-attention: qkv Linear → (optional per-head RMS QK-norm) → `flowkern.attention` → proj."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.k_norm = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(torch.nn.Module):
    """x ← x + g₁·Attn(LN(x)(1 + a₁) + b₁);  x ← x + g₂·MLP(LN(x)(1 + a₂) + b₂), (b, a, g)₁,₂ = adaLN-zero(c)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.ada = AdaLNModulation(dim, dim, 6)
        self.norm = Modulate("layer", eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        hidden = int(dim * mlp_ratio)
        self.fc1 = Linear(dim, hidden)
        self.act = GELU("tanh")
        self.fc2 = Linear(hidden, dim)
        self.residual = GatedResidual()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = self.residual(x, gate1, self.attn(self.norm(x, shift1, scale1)))
        return self.residual(x, gate2, self.fc2(self.act(self.fc1(self.norm(x, shift2, scale2)))))


class DiT(torch.nn.Module):
    """Diffusion transformer flow map: u(x, t, s [, y]) for images [B, C, H, W] (docs/conventions.md: Φ = x + (s − t)·u).

        tokens = W_patch·patchify(x) + pos          conv-free patch embedding (unfold + `Linear`), fixed 2-D sin-cos
        c = TimeMLP(E(t, s)) + Emb(y)               E in float32 (`flowkern.ops.time_embedding`); y = num_classes is
                                                    the null class (classifier-free guidance); y=None means null
        tokens ← DiTBlock(tokens, c) × depth        adaLN-zero (modulate and gated residual fused), optional QK-norm,
                                                    `flowkern.attention` (fused JVP), GELU-tanh MLP
        u = unpatchify(W_out·(LN(h)(1 + a) + b))    W_out and every adaLN projection zero-initialised: u = 0 at init
        D = Σ_tokens w_D·(LN(h)(1 + a) + b)          divergence_head=True only (F2D2's scalar head, zero-initialised):
                                                    one log-density rate per sample, a sum of per-token terms as a
                                                    divergence is a sum of per-pixel ones

    Arguments: img_size (int or (H, W)), in_ch, patch, hidden, depth, heads, mlp_ratio, num_classes (0: no labels),
    qk_norm, time_mode ('ts' | 't_delta'), time_dim (sinusoid width per time), time_scale (1000: t ∈ [0, 1] as DiT's
    timesteps), out_ch (default in_ch), divergence_head (also return D [B], in log-density units per unit time: a
    joint flow map for F2D2 and `flowkern.flow_map_log_likelihood`). `DiT.from_config("S/2", img_size=32, in_ch=4)` builds the paper sizes
    (tiny/2, S, B, L, XL with patch 2/4/8; keyword overrides allowed).

    forward(x [B, in_ch, H, W], t, s, y=None) -> u [B, out_ch, H, W], or (u, D [B]) with divergence_head; t, s as `MLPFlowMap` (float32/float64 [B],
    0-d or Python numbers broadcast; low-precision or integer times raise). Works unchanged under `torch.func.jvp`,
    `torch.autograd.forward_ad` and backward; run the JVP pass with `flowkern.jvp(model, (x, t, s), tangents,
    kwargs={"y": y})`.
    """

    def __init__(self, img_size, in_ch: int, *, patch: int = 2, hidden: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, num_classes: int = 0, qk_norm: bool = False, time_mode: str = "ts",
                 time_dim: int = 256, time_scale: float = 1000.0, out_ch: int | None = None,
                 divergence_head: bool = False):
        super().__init__()
        h, w = (img_size, img_size) if not isinstance(img_size, (tuple, list)) else tuple(img_size)
        self.img_size = (check_int("img_size", h, minimum=1), check_int("img_size", w, minimum=1))
        self.in_ch = check_int("in_ch", in_ch, minimum=1)
        self.out_ch = self.in_ch if out_ch is None else check_int("out_ch", out_ch, minimum=1)
        self.patch = check_int("patch", patch, minimum=1)
        if h % patch or w % patch:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch={patch}")
        hidden = check_int("hidden", hidden, minimum=4)
        heads = check_int("heads", heads, minimum=1)
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden must be a multiple of heads ({heads}) and of 4, got {hidden}")
        depth = check_int("depth", depth, minimum=1)
        mlp_ratio = check_finite_scalar("mlp_ratio", mlp_ratio, positive=True)
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        self.qk_norm = check_bool("qk_norm", qk_norm)
        self.divergence_head = check_bool("divergence_head", divergence_head)

        self.patch_embed = Linear(self.in_ch * patch * patch, hidden)
        grid = (h // patch, w // patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, *grid).float().unsqueeze(0))
        self.time = TimePairEmbedding(time_dim, hidden, mode=time_mode, time_scale=time_scale)
        self.label_embed = torch.nn.Embedding(self.num_classes + 1, hidden) if self.num_classes else None
        self.blocks = torch.nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_ada = AdaLNModulation(hidden, hidden, 2)
        self.final_norm = Modulate("layer", eps=1e-6)
        self.out = Linear(hidden, patch * patch * self.out_ch, zero_init=True)
        self.div = Linear(hidden, 1, zero_init=True) if self.divergence_head else None
        self._init_weights()

    @classmethod
    def from_config(cls, name: str, *, img_size, in_ch: int, **overrides) -> DiT:
        """DiT of a named size: one of CONFIGS ('tiny/2', 'S/2', 'B/2', ...); overrides take DiT's keywords."""
        if name not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
        hidden, depth, heads, patch = CONFIGS[name]
        kwargs = {"hidden": hidden, "depth": depth, "heads": heads, "patch": patch}
        kwargs.update(overrides)
        return cls(img_size, in_ch, **kwargs)

    def _init_weights(self) -> None:
        """DiT's init: xavier-uniform Linears with zero bias (the patch embedding as a conv weight), N(0, 0.02)
        label embedding, time MLP N(0, 0.02), adaLN projections and the output layer zero (adaLN-zero)."""
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.proj, block.fc1, block.fc2):
                torch.nn.init.xavier_uniform_(lin.weight)
                torch.nn.init.zeros_(lin.bias)
        torch.nn.init.xavier_uniform_(self.patch_embed.weight)
        torch.nn.init.zeros_(self.patch_embed.bias)
        if self.label_embed is not None:
            torch.nn.init.normal_(self.label_embed.weight, std=0.02)

    @property
    def num_tokens(self) -> int:
        return (self.img_size[0] // self.patch) * (self.img_size[1] // self.patch)

    def forward(self, x: torch.Tensor, t, s, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = check_x(x, dtype=self.patch_embed.weight.dtype, trailing=(self.in_ch, *self.img_size),
                        shape_doc=f"[B, in_ch, H, W] = [B, {self.in_ch}, {self.img_size[0]}, {self.img_size[1]}]")
        t = check_time("t", t, batch, x.device)
        s = check_time("s", s, batch, x.device)
        if y is not None and self.label_embed is None:
            raise ValueError("y (class labels) was given but the model has num_classes=0")
        if self.label_embed is not None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device) if y is None else \
                check_labels(y, batch, x.device, self.num_classes)
        with network_pass(x, self.patch_embed.weight.dtype):
            h = self.patch_embed(patchify(x, self.patch))
            h = h + self.pos_embed.to(h.dtype)
            c = self.time(t, s)
            if self.label_embed is not None:
                c = c + self.label_embed(y).to(c.dtype)
            for block in self.blocks:
                h = block(h, c)
            shift, scale = self.final_ada(c)
            h = self.final_norm(h, shift, scale)
            u = unpatchify(self.out(h), self.patch, self.out_ch, *self.img_size)
            if self.div is None:
                return u
            return u, self.div(h).sum((1, 2))

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, in_ch={self.in_ch}, patch={self.patch}, tokens={self.num_tokens}, "
                f"num_classes={self.num_classes}, qk_norm={self.qk_norm}, divergence_head={self.divergence_head}")


__all__ = ["CONFIGS", "DiT", "DiTBlock"]
