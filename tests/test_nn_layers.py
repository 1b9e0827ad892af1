"""flowkern.nn layer modules: torch.nn-compatible parameters and state dicts, same results as torch.nn, tangents
against torch.func.jvp of the torch.nn layer, autocast, bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nn_reference import modulate as plain_modulate
from nn_reference import randomize

import flowkern
import flowkern.nn as fnn

PAIRS = [
    (lambda: fnn.Linear(5, 7), lambda: torch.nn.Linear(5, 7), 5),
    (lambda: fnn.Linear(5, 7, bias=False), lambda: torch.nn.Linear(5, 7, bias=False), 5),
    (lambda: fnn.LayerNorm(6), lambda: torch.nn.LayerNorm(6), 6),
    (lambda: fnn.LayerNorm(6, elementwise_affine=False), lambda: torch.nn.LayerNorm(6, elementwise_affine=False), 6),
    (lambda: fnn.RMSNorm(6), lambda: torch.nn.RMSNorm(6, eps=1e-6), 6),
    (lambda: fnn.RMSNorm(6, eps=None), lambda: torch.nn.RMSNorm(6), 6),
    (lambda: fnn.SiLU(), lambda: torch.nn.SiLU(), 6),
    (lambda: fnn.GELU("tanh"), lambda: torch.nn.GELU("tanh"), 6),
]
IDS = ["linear", "linear_nobias", "layer_norm", "layer_norm_noaffine", "rms_norm", "rms_norm_eps_none", "silu",
       "gelu_tanh"]


@pytest.mark.parametrize("make, make_plain, width", PAIRS, ids=IDS)
def test_module_matches_torch_nn_with_loaded_state(make, make_plain, width):
    """Load the torch.nn module's state dict into the flowkern one (and back): output, tangent, gradients agree."""
    plain = randomize(make_plain().double(), std=0.5)
    mod = make().double()
    mod.load_state_dict(plain.state_dict())
    plain.load_state_dict(mod.state_dict())  # both ways: same keys and shapes
    gen = torch.Generator().manual_seed(0)
    x, x_t = (torch.randn(3, 4, width, generator=gen, dtype=torch.float64) for _ in range(2))
    with flowkern.use_backend("torch"):
        y_ref, yt_ref = torch.func.jvp(plain, (x,), (x_t,))
        y, y_t = flowkern.nn.jvp(mod, x, x_t)
        torch.testing.assert_close(y, y_ref.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(y_t, yt_ref.detach(), atol=1e-12, rtol=1e-10)
        cot = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        for m, leaf in zip((mod, plain), leaves):
            (m(leaf) * cot).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, atol=1e-12, rtol=1e-10)
    for (name, p), (_, q) in zip(mod.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_default_init_matches_torch_nn():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    torch.manual_seed(0)
    b = fnn.Linear(8, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    z = fnn.Linear(8, 4, zero_init=True)
    assert not z.weight.any() and not z.bias.any()


def test_modulate_gated_residual_and_adaln_against_plain():
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    c = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    ada = randomize(fnn.AdaLNModulation(6, 8, 3).double())
    with flowkern.use_backend("torch"):
        shift, scale, gate = ada(c)
        ref = F.linear(F.silu(c), ada.proj.weight, ada.proj.bias).chunk(3, dim=-1)
        for a, b in zip((shift, scale, gate), ref):
            torch.testing.assert_close(a, b)
        z = fnn.Modulate("layer")(x, shift, scale)
        torch.testing.assert_close(z, plain_modulate(x, shift, scale))
        out = fnn.GatedResidual()(x, gate, y)
        torch.testing.assert_close(out, x + gate[:, None] * y)
        rms = fnn.Modulate("rms", eps=1e-5)(x, shift, scale)
        torch.testing.assert_close(rms, F.rms_norm(x, (8,), eps=1e-5) * (1 + scale[:, None]) + shift[:, None])
    assert fnn.AdaLNModulation(6, 8, 2).proj.weight.abs().sum() == 0  # adaLN-zero


def test_autocast_runs_linear_in_bf16_and_norms_in_x_dtype():
    lin, ln = fnn.Linear(8, 8), fnn.LayerNorm(8)
    x = torch.randn(4, 8)
    with flowkern.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        assert ln(h).dtype == torch.bfloat16  # float32 γ, β cast to h's dtype
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(h.float(), ref.float(), atol=0.05, rtol=0.02)
    with flowkern.use_backend("torch"):
        assert lin(x).dtype == torch.float32


@pytest.mark.parametrize("build, err, match", [
    (lambda: fnn.Linear(0, 3), ValueError, "in_features"),
    (lambda: fnn.LayerNorm((4, 4)), TypeError, "normalized_shape"),
    (lambda: fnn.GELU("fast"), ValueError, "approximate"),
    (lambda: fnn.Modulate("batch"), ValueError, "norm"),
    (lambda: fnn.AdaLNModulation(4, 4, 0), ValueError, "chunks"),
    (lambda: fnn.TimePairEmbedding(8, 4, mode="s"), ValueError, "time_mode"),
    (lambda: fnn.TimePairEmbedding(8, 4, time_scale=float("inf")), ValueError, "time_scale"),
])
def test_bad_constructor_arguments(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_linear_dtype_mismatch_is_a_clear_error():
    with flowkern.use_backend("torch"), pytest.raises(TypeError, match="weight has dtype torch.float32 but x has"):
        fnn.Linear(4, 4)(torch.randn(2, 4, dtype=torch.float64))


def _layer_cases():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=gen)
    sh, sc, g = (torch.randn(3, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    y = torch.randn(3, 4, 8, dtype=torch.float64, generator=gen)
    lin = randomize(fnn.Linear(8, 5)).double()
    return [
        ("Linear", lin, (x,), lambda x: F.linear(x, lin.weight, lin.bias)),
        ("Modulate", fnn.Modulate("layer"), (x, sh, sc), lambda x, a, b: plain_modulate(x, a, b)),
        ("Modulate rms", fnn.Modulate("rms"), (x, sh, sc),
         lambda x, a, b: F.rms_norm(x, (8,), eps=1e-6) * (1 + b[:, None]) + a[:, None]),
        ("GatedResidual", fnn.GatedResidual(), (x, g, y), lambda x, g, y: x + g[:, None] * y),
        ("SiLU", fnn.SiLU(), (x,), F.silu),
        ("GELU tanh", fnn.GELU("tanh"), (x,), lambda x: F.gelu(x, approximate="tanh")),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _layer_cases()])
def test_module_fast_paths_match_plain_pytorch_in_float64(case):
    """Grad pass (native ops, no custom Function node) and tangent pass (the prevalidated fused op under
    torch.func.jvp and forward_ad) of each layer against plain PyTorch on the same inputs."""
    import torch.autograd.forward_ad as fwAD

    _, layer, args, plain = _layer_cases()[case]
    tangents = tuple(torch.randn_like(a) for a in args)
    with flowkern.use_backend("torch"):
        leaves = [a.clone().requires_grad_() for a in args]
        out = layer(*leaves)
        assert out.grad_fn is not None and "FusedFunction" not in type(out.grad_fn).__name__
        grads = torch.autograd.grad(out.square().sum(), leaves)
        y_t = torch.func.jvp(layer, args, tangents)[1]
        with fwAD.dual_level():
            y_t2 = fwAD.unpack_dual(layer(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))).tangent
    ref_leaves = [a.clone().requires_grad_() for a in args]
    ref = plain(*ref_leaves)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), ref_leaves)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    ref_t = torch.func.jvp(plain, args, tangents)[1]
    torch.testing.assert_close(y_t, ref_t, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(y_t2, ref_t, atol=1e-11, rtol=1e-11)


def test_modulate_eps_is_checked_at_construction():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fnn.Modulate("layer", eps=-1.0)


def _plain_pass_seen(model, call):
    """Whether the layers inside `model` ran in a plain network pass during `call()` (a forward hook records it)."""
    from flowkern.nn._plain import in_plain_pass

    seen = []
    layer = next(m for m in model.modules() if isinstance(m, flowkern.nn.Linear))
    handle = layer.register_forward_hook(lambda *_: seen.append(in_plain_pass()))
    try:
        call()
    finally:
        handle.remove()
    return all(seen) and bool(seen)


def test_a_network_pass_runs_plain_only_where_no_tangent_autocast_or_kernel_can_be_involved():
    """One decision per network forward: plain native ops in an ordinary forward/grad pass on the PyTorch backend,
    the fused path under forward AD, torch.func.jvp, autocast and a low-precision model."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    net = flowkern.nn.MLPFlowMap(2, hidden=16, depth=1, time_dim=8)
    x, t = torch.randn(5, 2), torch.rand(5)
    with flowkern.use_backend("torch"):
        assert _plain_pass_seen(net, lambda: net(x, t, t).sum().backward())
        assert not _plain_pass_seen(net, lambda: torch.func.jvp(lambda x: net(x, t, t), (x,), (x,)))
        with fwAD.dual_level():
            assert not _plain_pass_seen(net, lambda: net(fwAD.make_dual(x, x), t, t))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _plain_pass_seen(net, lambda: net(x, t, t))
    from flowkern.nn._plain import in_plain_pass
    assert not in_plain_pass()   # restored after the pass


def test_a_plain_network_pass_equals_the_fused_path_in_float64():
    """Outputs and parameter gradients of the plain pass equal those of the op path (forced by a dual level)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(1)
    net = flowkern.nn.DiT(4, 2, patch=2, hidden=32, depth=2, heads=2).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)

    def grads(run):
        net.zero_grad()
        out = run()
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    with flowkern.use_backend("torch"):
        plain = grads(lambda: net(x, t, 0.5 * t))
        with fwAD.dual_level():   # an open level: every layer takes the op path
            fused = grads(lambda: net(x, t, 0.5 * t))
    torch.testing.assert_close(plain[0], fused[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(plain[1], fused[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
