"""The CUDA probe map of csrc/hutchinson.h, run on the host (its Philox/probe functions are __host__ __device__),
against the Philox reference that the Triton kernel matches: same Rademacher probes bit for bit, Gaussian probes
to float32 precision. Needs nvcc and a host compiler, no GPU."""
import os
import shutil
import subprocess

import pytest
import torch

from flowkern.testing import hutchinson_probes_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")

MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "hutchinson.h"
int main(int argc, char** argv) {
  const unsigned long long seed = strtoull(argv[1], nullptr, 10);
  const unsigned stream = atoi(argv[2]);
  const long probes = atol(argv[3]), batch = atol(argv[4]), dim = atol(argv[5]);
  const int dist = atoi(argv[6]);
  for (long k = 0; k < probes; ++k)
    for (long b = 0; b < batch; ++b)
      for (long i = 0; i < dim; ++i) {
        float z[4];
        flowkern::hutchinson_probe4(seed, stream, b, k, i / 4, dist, z);
        printf("%.9g\n", z[i % 4]);
      }
  return 0;
}
"""


@pytest.fixture(scope="module")
def probe_exe(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    d = tmp_path_factory.mktemp("hutch")
    (d / "main.cu").write_text(MAIN)
    exe = d / "probes"
    result = subprocess.run([NVCC, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), str(d / "main.cu"), "-o",
                             str(exe)], capture_output=True, text=True, check=False)
    if result.returncode != 0 and "cannot find" in result.stderr:
        pytest.skip(f"nvcc cannot link a host program here: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    return str(exe)


@pytest.mark.parametrize("distribution, code", [("rademacher", 0), ("gaussian", 1)])
@pytest.mark.parametrize("seed", [0, 7, 2 ** 40 + 17])
def test_cuda_probe_map_matches_the_reference(probe_exe, distribution, code, seed):
    shape = (3, 2, 11)
    out = subprocess.run([probe_exe, str(seed), "5", *map(str, shape), str(code)], capture_output=True, text=True,
                         check=True).stdout.split()
    got = torch.tensor([float(v) for v in out], dtype=torch.float64).view(shape)
    ref = hutchinson_probes_reference(seed, 5, *shape, distribution)
    if distribution == "rademacher":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
