"""flowkern.patch_sdpa() on real third-party models with random weights and tiny configs (the `integrations` extra):
a diffusers DiT and a timm VisionTransformer, unmodified. torch.func.jvp through them under the patch equals the
JVP through SDPA's math backend, the fused op is what serves the calls, and at 1024 tokens the JVP's peak memory is
far below math SDPA's (no [N, N] score matrices)."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import TRITON_RUNS
from torch.nn.attention import SDPBackend, sdpa_kernel

import flowkern
from flowkern._measure import peak_memory_bytes


def _importable_torchvision() -> None:
    """timm and diffusers import torchvision. PyPI's torchvision wheel is built against CUDA torch: against a CPU
    torch its C++ ops (`torchvision/_C.so`) do not load, and its import then fails registering fake kernels for two
    of them (`nms`, `qnms`: "operator torchvision::nms does not exist"). Give those two ops their schemas, with no
    kernel, so torchvision's pure-Python part imports. Neither model here calls a torchvision op; a call would fail
    loudly (no kernel registered), never silently."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_importable_torchvision()


def _diffusers_dit(sample_size=8, heads=2, head_dim=8):
    pytest.importorskip("diffusers", reason="diffusers is in the `integrations` extra")
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  out_channels=4, num_layers=1, sample_size=sample_size, patch_size=2,
                                  num_embeds_ada_norm=10, norm_num_groups=1)
    return model.eval()


def _dit_call(model, batch, sample_size, dtype):
    g = torch.Generator().manual_seed(1)
    x, x_t = (torch.randn(batch, 4, sample_size, sample_size, generator=g, dtype=torch.float64).to(dtype)
              for _ in range(2))
    t, y = torch.tensor([3, 7][:batch]), torch.tensor([1, 2][:batch])
    return (lambda inp: model(inp, timestep=t, class_labels=y).sample), x, x_t


def _math_jvp(f, x, x_t):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, (x,), (x_t,))


def test_diffusers_dit_jvp_under_the_patch_equals_math_sdpa_float64():
    model = _diffusers_dit().double()
    f, x, x_t = _dit_call(model, 2, 8, torch.float64)
    want = _math_jvp(f, x, x_t)
    with flowkern.patch_sdpa() as counts, flowkern.use_backend("torch"):
        counts.reset()
        got = torch.func.jvp(f, (x,), (x_t,))
        assert counts.fused == 1 and counts.fallback == 0  # one attention layer, served by the fused op
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in its interpreter here")
def test_diffusers_dit_jvp_on_the_triton_kernel():
    model = _diffusers_dit(sample_size=4)
    f, x, x_t = _dit_call(model, 1, 4, torch.float32)
    model64 = _diffusers_dit(sample_size=4).double()
    f64, x64, xt64 = _dit_call(model64, 1, 4, torch.float64)
    _assert_triton_jvp_is_math_sdpas(f, x, x_t, _math_jvp(f64, x64, xt64))


def _assert_triton_jvp_is_math_sdpas(f, x, x_t, want):
    """torch.func.jvp of f under the patch, on the Triton kernel (one fused call), equals the float64 math JVP."""
    with flowkern.patch_sdpa() as counts, flowkern.use_backend("triton"):
        counts.reset()
        got = torch.func.jvp(f, (x,), (x_t,))
        assert counts.fused == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def _timm_vit(img_size=8, embed_dim=16, heads=2):
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        pytest.skip(f"timm is in the `integrations` extra ({exc})")
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=2, in_chans=3, num_classes=5, embed_dim=embed_dim,
                             depth=1, num_heads=heads).eval()


def _images(batch, size, dtype):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))


def test_timm_vision_transformer_jvp_under_the_patch_equals_math_sdpa_float64():
    model = _timm_vit().double()
    x, x_t = _images(2, 8, torch.float64)
    want = _math_jvp(model, x, x_t)
    with flowkern.patch_sdpa() as counts, flowkern.use_backend("torch"):
        counts.reset()
        got = torch.func.jvp(model, (x,), (x_t,))
        assert counts.fused == 1 and counts.fallback == 0  # one block: 16 patch tokens and the class token
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in its interpreter here")
def test_timm_vision_transformer_jvp_on_the_triton_kernel():
    """17 tokens (16 patches and the class token): a sequence length that is no multiple of any block size."""
    model, model64 = _timm_vit(), _timm_vit().double()
    x, x_t = _images(1, 8, torch.float32)
    _assert_triton_jvp_is_math_sdpas(model, x, x_t, _math_jvp(model64, x.double(), x_t.double()))


def test_timm_vision_transformer_jvp_at_1024_tokens_needs_far_less_memory_than_math_sdpa():
    """64×64 images in 2×2 patches: 1024 patch tokens and the class token, 4 heads."""
    model = _timm_vit(img_size=64, embed_dim=64, heads=4)
    x, x_t = _images(1, 64, torch.float32)
    _assert_far_less_memory(model, x, x_t)


def _assert_far_less_memory(f, x, x_t):
    """Math SDPA's JVP keeps [4, N, N] score, probability and tangent matrices (16 MiB each in float32 at N = 1024);
    the fused op walks the keys in chunks."""
    with torch.no_grad():
        math_peak = peak_memory_bytes(lambda: _math_jvp(f, x, x_t), torch.device("cpu"))
        with flowkern.patch_sdpa() as counts, flowkern.use_backend("torch"):
            counts.reset()
            ours = peak_memory_bytes(lambda: torch.func.jvp(f, (x,), (x_t,)), torch.device("cpu"))
            assert counts.fused == 1
    if math_peak is None or ours is None:
        pytest.skip("peak resident memory is not measurable on this system (/proc/self/clear_refs)")
    assert math_peak > 48 * 2**20, f"math SDPA's JVP peak {math_peak / 2**20:.0f} MiB: the case lost its N² cost"
    assert ours < math_peak / 4, f"flowkern {ours / 2**20:.0f} MiB vs math SDPA {math_peak / 2**20:.0f} MiB"


def test_dit_jvp_at_1024_tokens_needs_far_less_memory_than_math_sdpa():
    """64×64 latents in 2×2 patches: 1024 tokens, 4 heads."""
    model = _diffusers_dit(sample_size=64, heads=4, head_dim=16)
    f, x, x_t = _dit_call(model, 1, 64, torch.float32)
    _assert_far_less_memory(f, x, x_t)
