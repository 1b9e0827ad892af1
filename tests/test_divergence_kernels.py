"""The Hutchinson Triton kernels (in the interpreter on CPU) against the float64 Philox reference."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, TRITON_RUNS

from flowkern.divergence import probes as _probes
from flowkern.testing import hutchinson_probes_reference, philox4x32

SHAPES = [(3, 2, 37), (5, 7, 2), (2, 3, 1), (1, 1, 2051)]  # [K, B, D]: odd sizes, D < 4, D not a multiple of 4
SEEDS = [0, 5, 2 ** 40 + 17]


def test_philox_reference_matches_random123_known_answers():
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in philox4x32(*counter, *key)) == expected


def test_reference_probes_have_the_right_moments():
    z = hutchinson_probes_reference(3, 0, 4, 50, 101, "gaussian")
    assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.05
    r = hutchinson_probes_reference(3, 0, 4, 50, 101, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.03


needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in the interpreter here")


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_kernel_matches_the_reference(shape, distribution, dtype):
    for seed in SEEDS:
        got = _probes.generate("triton", *shape, seed=seed, stream=2, distribution=distribution, dtype=dtype,
                               device=DEVICE).cpu()
        ref = hutchinson_probes_reference(seed, 2, *shape, distribution)
        if distribution == "rademacher":
            assert torch.equal(got.double(), ref)  # bit-exact: the same Philox words
        else:  # float32 log/sin/cos against float64, then the output dtype's rounding
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.interpreter
@needs_triton
def test_streams_and_seeds_give_different_probes():
    a = _probes.generate("triton", 2, 3, 16, seed=1, stream=0, distribution="rademacher", dtype=torch.float32,
                         device=DEVICE)
    b = _probes.generate("triton", 2, 3, 16, seed=1, stream=1, distribution="rademacher", dtype=torch.float32,
                         device=DEVICE)
    c = _probes.generate("triton", 2, 3, 16, seed=2, stream=0, distribution="rademacher", dtype=torch.float32,
                         device=DEVICE)
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduction_kernel_matches_float64(shape, distribution, dtype):
    """est[k, b] = Σ_i z[k, b, i]·jz[k, b, i] with z regenerated in-kernel, against float64 on the same inputs."""
    jz = torch.randn(shape, dtype=torch.float64).to(dtype)
    seed = 77
    reduce = _probes.LAUNCHERS["triton"].probe_reduce
    got = reduce(jz.to(DEVICE), seed, 4, _probes.DISTRIBUTIONS[distribution])[0].cpu()
    ref = (hutchinson_probes_reference(seed, 4, *shape, distribution) * jz.double()).sum(-1)
    assert got.dtype == torch.float32 and got.shape == shape[:2]
    scale = jz.double().abs().sum(-1).clamp_min(1)
    assert ((got.double() - ref).abs() / scale).max() < 1e-5


AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flowkern.kernels.divergence import hutchinson_probes_kernel, hutchinson_reduce_kernel
ONES = ("n_elem", "n_rows", "n_batch", "n_chunks", "seed", "stream")  # ints the JIT may specialise to 1
for fn in (hutchinson_probes_kernel, hutchinson_reduce_kernel):
    for dist in (0, 1):
        for ones in (False, True):
            const = {"DIST": dist, "ROWS": 8, "CB": 64}
            if ones:
                const.update({n: 1 for n in ONES if n in fn.arg_names})
            sig = {n: "constexpr" if n in const else "*fp32" if n.endswith("_ptr") else
                   "i64" if n == "seed" else "i32" for n in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs=const)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter forgives what the compiler refuses (non-constexpr globals, bad casts): compile for sm_90."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT, root], capture_output=True, text=True, timeout=300,
                            check=False)
    if result.returncode != 0 and ("ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip("Triton's bundled ptxas is not available")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.interpreter
@needs_triton
def test_probe_kernel_matches_the_reference_on_random_shapes():
    """hypothesis over (K, B, D, seed, stream): the tiling (rows per program, counters per row) never changes a probe."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(k=st.integers(1, 4), b=st.integers(1, 9), d=st.integers(1, 300),
                      seed=st.integers(0, 2 ** 63 - 1), stream=st.integers(0, 3))
    def check(k, b, d, seed, stream):
        got = _probes.generate("triton", k, b, d, seed=seed, stream=stream, distribution="rademacher",
                               dtype=torch.float32, device=DEVICE).cpu()
        assert torch.equal(got.double(), hutchinson_probes_reference(seed, stream, k, b, d, "rademacher"))

    check()


def test_reference_divergence_uses_the_torch_backend():
    from flowkern import reference

    x = torch.randn(2, 3, dtype=torch.float32, device=DEVICE)
    torch.testing.assert_close(reference.divergence(lambda y: 3 * y, x, probes=2, seed=0), torch.full((2,), 9.0,
                               device=DEVICE))
