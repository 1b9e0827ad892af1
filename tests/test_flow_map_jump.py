"""flowkern.flow_map.jump: every backend against the plain formula, in place, joint log-density, autograd, forward AD,
validation."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowkern.flow_map as fm
from flowkern import use_backend
from conftest import DEVICE, HAS_CUDA, backends_under_test, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A jump is one multiply-add in float32, rounded once to the output dtype. Triton's CPU interpreter truncates
# float32 -> bfloat16 (compiled Triton rounds to nearest): allow one unit in the last place of the dtype.
ULP = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 2.0 ** -50}
SHAPES = [(1, 1), (3, 5, 7), (37, 3), (2, 1500), (5, 2, 3, 3)]


def _formula(x, u, t, s):
    """x + (s − t)·u in float32 (float64 for float64), rounded once to the dtype of x."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = (s.to(acc) - t.to(acc)).reshape((-1,) + (1,) * (x.dim() - 1))
    return (x.to(acc) + h * u.to(acc)).to(x.dtype)


def _inputs(shape, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    u = torch.randn(shape, generator=g).to(dtype).to(device)
    t = torch.rand(shape[0], generator=g).to(device)
    s = torch.rand(shape[0], generator=g).to(device)
    return x, u, t, s


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "an output element was never written"
    tol = ULP[dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jump_matches_formula(backend, dtype, shape):
    x, u, t, s = _inputs(shape, dtype)
    with use_backend(backend):
        out = fm.jump(x, u, t, s)
    _close(out, _formula(x, u, t, s), dtype)


def test_jump_float64_reference_is_exact():
    x, u, t, s = _inputs((4, 3), torch.float64)
    with use_backend("torch"):
        out = fm.jump(x, u, t.double(), s.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, x + (s.double() - t.double())[:, None] * u)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(19, 3, 5), (3, 1500)], ids=str)  # one and several feature blocks per sample
def test_joint_jump_and_in_place(backend, dtype, shape):
    x, u, t, s = _inputs(shape, dtype, seed=1)
    logp = torch.randn(shape[0], device=DEVICE)
    div = torch.randn(shape[0], device=DEVICE)
    ref = _formula(x, u, t, s)
    ref_lp = logp + (s - t) * div
    with use_backend(backend):
        out, out_lp = fm.jump(x, u, t, s, logp=logp, div=div)
        _close(out, ref, dtype)
        torch.testing.assert_close(out_lp, ref_lp, rtol=0, atol=1e-6)
        xi, lpi = x.clone(), logp.clone()
        got, got_lp = fm.jump(xi, u, t, s, logp=lpi, div=div, inplace=True)
    assert got is xi and got_lp is lpi
    assert torch.equal(xi, out) and torch.equal(lpi, out_lp)


@pytest.mark.parametrize("backend", backends_under_test())
def test_scalar_times_equal_times_and_strided_inputs(backend):
    x, u, _, _ = _inputs((6, 9), torch.float32, seed=2)
    with use_backend(backend):
        out = fm.jump(x, u, 0.75, torch.tensor(0.25, device=DEVICE))
        _close(out, x - 0.5 * u, torch.float32)
        same = fm.jump(x, u, 0.3, 0.3)  # t = s: Φ(x, t, t) = x exactly
        assert torch.equal(same, x)
        xt, ut = x.t(), u.t()  # non-contiguous samples: out of place is fine
        t = torch.linspace(0, 1, 9, device=DEVICE)
        _close(fm.jump(xt, ut, t, 1 - t), _formula(xt, ut, t, 1 - t), torch.float32)
        with pytest.raises(ValueError, match="inplace=True needs x viewable"):
            fm.jump(xt, ut, t, 1 - t, inplace=True)


def _grad_inputs(dtype=torch.float64, shape=(3, 2, 2)):
    g = torch.Generator().manual_seed(3)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=dtype).to(DEVICE).requires_grad_()  # noqa: E731
    x, u = mk(*shape), mk(*shape)
    t = torch.rand(shape[0], generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    s = torch.rand(shape[0], generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    return x, u, t, s, mk(shape[0]), mk(shape[0])


def test_gradcheck_float64_reverse_and_forward():
    x, u, t, s, lp, d = _grad_inputs()
    with use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: fm.jump(*a), (x, u, t, s), check_forward_ad=True)
        assert torch.autograd.gradcheck(lambda x, u, t, s, lp, d: fm.jump(x, u, t, s, logp=lp, div=d),
                                        (x, u, t, s, lp, d), check_forward_ad=True)
        t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)  # a 0-d time: gradient summed over samples
        assert torch.autograd.gradcheck(lambda x, u, t0: fm.jump(x, u, t0, 0.9), (x, u, t0), check_forward_ad=True)


@pytest.mark.parametrize("backend", backends_under_test())
def test_gradients_match_autograd_of_formula(backend):
    x, u, t, s, lp, d = (v.detach().float().requires_grad_() for v in _grad_inputs(shape=(5, 7)))
    gy, gl = torch.randn(5, 7, device=DEVICE), torch.randn(5, device=DEVICE)
    with use_backend(backend):
        y, l2 = fm.jump(x, u, t, s, logp=lp, div=d)
    got = torch.autograd.grad((y * gy).sum() + (l2 * gl).sum(), (x, u, t, s, lp, d))
    y_ref = x + (s - t)[:, None] * u
    l_ref = lp + (s - t) * d
    want = torch.autograd.grad((y_ref * gy).sum() + (l_ref * gl).sum(), (x, u, t, s, lp, d))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_state_keeps_float32_times():
    x, u, t, s = _inputs((4, 8), torch.bfloat16, seed=4)
    t.requires_grad_()
    with use_backend("torch"):
        y = fm.jump(x, u, t, s)
    (gt,) = torch.autograd.grad(y.float().sum(), t)
    assert y.dtype == torch.bfloat16 and gt.dtype == torch.float32
    torch.testing.assert_close(gt, -u.float().sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_under_test())
def test_forward_ad_matches_formula(backend):
    x, u, t, s, lp, d = (v.detach().float() for v in _grad_inputs(shape=(4, 6)))
    tangents = [torch.randn_like(v) for v in (x, u, t, s, lp, d)]

    def f(x, u, t, s, lp, d):
        return fm.jump(x, u, t, s, logp=lp, div=d)

    def f_ref(x, u, t, s, lp, d):
        return x + (s - t)[:, None] * u, lp + (s - t) * d

    with use_backend(backend):
        out, out_t = torch.func.jvp(f, (x, u, t, s, lp, d), tuple(tangents))
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, tt) for p, tt in zip((x, u, t, s, lp, d), tangents)]
            y, l2 = f(*duals)
            dual_t = (fwAD.unpack_dual(y).tangent, fwAD.unpack_dual(l2).tangent)
    ref, ref_t = torch.func.jvp(f_ref, (x, u, t, s, lp, d), tuple(tangents))
    for a, b in list(zip(out, ref)) + list(zip(out_t, ref_t)) + list(zip(dual_t, ref_t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a tangent on t only: Φ̇ = −ṫ·u
    with use_backend(backend):
        _, only_t = torch.func.jvp(lambda t: fm.jump(x, u, t, s), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(only_t, -u, rtol=1e-6, atol=1e-6)


def test_validation_errors():
    x, u, t, s = _inputs((4, 3), torch.float32)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fm.jump(x, u, t + 1.5, s)
    with pytest.raises(ValueError, match="s must be finite"):
        fm.jump(x, u, t, s.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="s must lie in"):
        fm.jump(x, u, t, -0.1)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
        fm.jump(x, u, t[:3], s)
    with pytest.raises(TypeError, match="t must be a floating tensor"):
        fm.jump(x, u, torch.zeros(4, dtype=torch.long), s)
    with pytest.raises(TypeError, match="u has dtype"):
        fm.jump(x, u.half(), t, s)
    with pytest.raises(ValueError, match="u must have the shape of x"):
        fm.jump(x, u[:, :2], t, s)
    with pytest.raises(ValueError, match="logp and div go together"):
        fm.jump(x, u, t, s, logp=torch.zeros(4))
    with pytest.raises(ValueError, match=r"logp must have shape \[B\]"):
        fm.jump(x, u, t, s, logp=torch.zeros(3), div=torch.zeros(3))
    with pytest.raises(TypeError, match="logp must have dtype"):
        fm.jump(x, u, t, s, logp=torch.zeros(4).half(), div=torch.zeros(4).half())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fm.jump(x.tolist(), u, t, s)
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        fm.jump(x, u.requires_grad_(), t, s, inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fm.jump(x, u.detach(), t, s, inplace=1)


def test_nvtx_ranges_do_not_break(monkeypatch):
    monkeypatch.setenv("FLOWKERN_NVTX", "1")
    x, u, t, s = _inputs((2, 3), torch.float32)
    with use_backend("torch"):
        torch.testing.assert_close(fm.jump(x, u, t, s), _formula(x, u, t, s))
        fm.sample(fm.GaussianFlowMap(), x, steps=2)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_extension_matches_reference(dtype):
    pytest.importorskip("ninja", reason="the CUDA extension builds with ninja")
    x, u, t, s = _inputs((37, 3, 5), dtype, seed=5)
    logp, div = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    with use_backend("cuda"):
        out, out_lp = fm.jump(x, u, t, s, logp=logp, div=div)
        xi = x.clone()
        fm.jump(xi, u, 0.5, 0.25, inplace=True)
    _close(out, _formula(x, u, t, s), dtype)
    torch.testing.assert_close(out_lp, logp + (s - t) * div, rtol=0, atol=1e-6)
    _close(xi, _formula(x, u, torch.full_like(t, 0.5), torch.full_like(s, 0.25)), dtype)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error path of the cuda backend")
def test_cuda_backend_by_name_on_cpu_raises_clearly():
    x, u, t, s = _inputs((2, 3), torch.float32)
    with use_backend("cuda"), pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        fm.jump(x, u, t, s)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flowkern.kernels.flow_map import flow_map_jump_kernel

ints = ["batch", "features", "stride_xb", "stride_ub", "stride_yb", "stride_t", "stride_s", "stride_lp",
        "stride_div", "stride_lpo"]
for dtype in ("*fp32", "*fp16", "*bf16"):
    for has_logp in (False, True):
        sig = {"X": dtype, "U": dtype, "T": "*fp32", "S": "*fp32", "Y": dtype, "LOGP": "*fp32", "DIV": "*fp32",
               "LOGP_OUT": "*fp32", **{n: "i32" for n in ints},
               "HAS_LOGP": "constexpr", "BLOCK_B": "constexpr", "BLOCK_F": "constexpr"}
        src = ASTSource(fn=flow_map_jump_kernel, signature=sig,
                        constexprs={"HAS_LOGP": has_logp, "BLOCK_B": 2, "BLOCK_F": 1024})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "flow_map_jump_kernel" in compiled.asm["ptx"], (dtype, has_logp)
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernel runs for real")
def test_triton_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """The interpreter skips Triton's compiler: compile the jump kernel to PTX for sm_90 (in a fresh process, since
    this one runs kernels in the interpreter) to catch what the interpreter lets through."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "from triton.backends.compiler import GPUTarget; "
                            "from triton.compiler import ASTSource"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        pytest.skip("this Triton has no ASTSource/GPUTarget compile API")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=root, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
