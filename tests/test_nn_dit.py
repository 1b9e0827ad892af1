"""flowkern.nn.DiT against a plain-PyTorch twin with the same weights (explicit softmax attention): outputs,
tangents (flowkern.jvp, torch.func.jvp, forward_ad), gradients; the fused Triton path in the interpreter."""
from __future__ import annotations

import math

import pytest
import torch
from nn_reference import PlainDiT, randomize
from helpers import check_network_against_twin

import flowkern
from flowkern.nn import DiT
from flowkern.nn.dit import CONFIGS
from flowkern.nn.patch import patchify, sincos_pos_embed_2d, unpatchify

SMALL = {"patch": 2, "hidden": 16, "depth": 2, "heads": 2, "time_dim": 8, "time_scale": 3.0}


def make_pair(dtype, img=(4, 6), in_ch=3, **cfg):
    model = randomize(DiT(img, in_ch, **{**SMALL, **cfg}).to(dtype), std=0.2)
    twin = PlainDiT(model).to(dtype)
    twin.load_state_dict(model.state_dict())
    return model, twin


def inputs(dtype, batch=2, in_ch=3, img=(4, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, x_t = (torch.randn(batch, in_ch, *img, generator=gen, dtype=dtype) for _ in range(2))
    t, s = (torch.rand(batch, generator=gen, dtype=dtype) for _ in range(2))
    t_t, s_t = (torch.randn(batch, generator=gen, dtype=dtype) for _ in range(2))
    return (x, t, s), (x_t, t_t, s_t)


@pytest.mark.parametrize("cfg", [{}, {"qk_norm": True, "num_classes": 5, "time_mode": "t_delta", "out_ch": 2}],
                         ids=["plain", "qknorm+labels+t_delta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_plain_twin(cfg, dtype):
    model, twin = make_pair(dtype, **cfg)
    primals, tangents = inputs(dtype)
    kwargs = {"y": torch.tensor([1, 5])} if cfg.get("num_classes") else {}  # 5 = the null class
    with flowkern.use_backend("torch"):
        check_network_against_twin(model, twin, primals, tangents, atol=1e-9 if dtype == torch.float64 else 5e-4,
                                   kwargs=kwargs)


@pytest.mark.interpreter
def test_triton_interpreter_fused_path_matches_torch_func_jvp(device):
    """Fused Triton kernels (attention, norms, modulate, residual, activations, time embedding; the interpreter on
    CPU, compiled on a GPU) vs the twin under torch.func.jvp."""
    model, twin = (m.to(device) for m in make_pair(torch.float32, img=(4, 4), depth=1, qk_norm=True, num_classes=3))
    primals, tangents = (tuple(a.to(device) for a in group) for group in inputs(torch.float32, img=(4, 4)))
    with flowkern.use_backend("triton"):
        check_network_against_twin(model, twin, primals, tangents, atol=5e-4,
                                   kwargs={"y": torch.tensor([0, 3], device=device)})


def test_null_class_is_the_default_label():
    model, _ = make_pair(torch.float64, num_classes=4)
    (x, t, s), _ = inputs(torch.float64)
    with flowkern.use_backend("torch"):
        assert torch.equal(model(x, t, s), model(x, t, s, torch.tensor([4, 4])))
        assert not torch.allclose(model(x, t, s), model(x, t, s, torch.tensor([0, 1])))


def test_init_output_is_zero_and_configs():
    model = DiT.from_config("tiny/2", img_size=8, in_ch=4)
    with flowkern.use_backend("torch"):
        u = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2))
    assert u.shape == (2, 4, 8, 8) and torch.equal(u, torch.zeros_like(u))
    s2 = DiT.from_config("S/2", img_size=32, in_ch=4)
    assert s2.num_tokens == 256 and len(s2.blocks) == 12 and s2.blocks[0].attn.heads == 6
    assert 32e6 < sum(p.numel() for p in s2.parameters()) < 34e6  # DiT-S/2: 33M
    assert CONFIGS["B/2"] == (768, 12, 12, 2)
    assert DiT.from_config("B/2", img_size=8, in_ch=1, depth=1).patch_embed.out_features == 768


def test_patchify_is_a_strided_conv():
    """patchify + Linear equals Conv2d(C, D, p, stride=p) with the weight viewed as [D, C·p·p]; unpatchify inverts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(x, w, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(x, 2) @ w.reshape(5, -1).t(), conv)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 3, 4, 6), x)


def test_sincos_positions_closed_form():
    pe = sincos_pos_embed_2d(8, 2, 3)  # rows = grid row-major (i, j); first half encodes j (column), second half i
    i, j, k = 1, 2, 1
    omega = 1.0 / 10000 ** (k / 2)
    row = pe[i * 3 + j]
    assert row[k].item() == pytest.approx(math.sin(j * omega)) and row[2 + k].item() == pytest.approx(math.cos(j * omega))
    assert row[4 + k].item() == pytest.approx(math.sin(i * omega))


@pytest.mark.parametrize("build, err, match", [
    (lambda: DiT(6, 3, patch=4), ValueError, "divisible by patch"),
    (lambda: DiT(8, 3, hidden=30, heads=4), ValueError, "multiple of heads"),
    (lambda: DiT(8, 3, qk_norm="yes"), TypeError, "qk_norm"),
    (lambda: DiT.from_config("M/2", img_size=8, in_ch=3), ValueError, "config must be one of"),
    (lambda: DiT(8, 0), ValueError, "in_ch"),
])
def test_bad_constructor_arguments(build, err, match):
    with pytest.raises(err, match=match):
        build()


@pytest.mark.parametrize("case, err, match", [
    ("x_shape", ValueError, r"x must have shape \[B, in_ch, H, W\] = \[B, 3, 4, 6\]"),
    ("t_bf16", TypeError, "t must be a float32"),
    ("y_float", TypeError, "y must hold integer class labels"),
    ("y_range", ValueError, r"y must lie in \[0, 5\]"),
    ("y_shape", ValueError, r"y must have shape \[B\] = \[2\]"),
    ("y_without_classes", ValueError, "num_classes=0"),
])
def test_bad_inputs_raise(case, err, match):
    model, _ = make_pair(torch.float32, num_classes=5)
    plain, _ = make_pair(torch.float32)
    (x, t, s), _ = inputs(torch.float32)
    call = {"x_shape": lambda: model(x[:, :2], t, s), "t_bf16": lambda: model(x, t.bfloat16(), s),
            "y_float": lambda: model(x, t, s, torch.zeros(2)), "y_range": lambda: model(x, t, s, torch.tensor([0, 6])),
            "y_shape": lambda: model(x, t, s, torch.tensor([0])),
            "y_without_classes": lambda: plain(x, t, s, torch.tensor([0, 1]))}[case]
    with flowkern.use_backend("torch"), pytest.raises(err, match=match):
        call()


def test_divergence_head_is_a_sum_of_per_token_terms_zero_at_init_with_a_fused_tangent():
    """divergence_head=True: (u, D [B]) with D = Σ_tokens w_D·h (h the final modulated features), zero at init
    (like u); u unchanged by the head; D's tangent under flowkern.jvp equals a float64 central difference."""
    torch.manual_seed(0)
    kw = dict(patch=2, hidden=32, depth=1, heads=2, time_dim=8)
    plain = DiT(8, 1, **kw).double()
    joint = DiT(8, 1, divergence_head=True, **kw).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t, s = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    with flowkern.use_backend("torch"):
        u0, d0 = joint(x, t, s)
        assert d0.shape == (3,) and float(d0.abs().max()) == 0.0
        randomize(joint, std=0.2)
        joint_state = {k: v for k, v in joint.state_dict().items() if not k.startswith("div.")}
        plain.load_state_dict(joint_state)
        features = {}
        hook = joint.final_norm.register_forward_hook(lambda m, a, out: features.update(h=out))
        u, d = joint(x, t, s)
        hook.remove()
        torch.testing.assert_close(u, plain(x, t, s), rtol=0, atol=0)
        manual = features["h"] @ joint.div.weight[0] + joint.div.bias[0]
        torch.testing.assert_close(d, manual.sum(1), rtol=1e-12, atol=1e-12)
        x_t = torch.randn_like(x)
        (_, d_out), (_, d_tan) = flowkern.jvp(joint, (x, t, s), (x_t, torch.ones_like(t), torch.zeros_like(s)))
        h = 1e-6
        fd = (joint(x + h * x_t, t + h, s)[1] - joint(x - h * x_t, t - h, s)[1]) / (2 * h)
    torch.testing.assert_close(d_out, d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_tan, fd, rtol=1e-6, atol=1e-7)
    assert float(d_tan.abs().max()) > 1e-3
