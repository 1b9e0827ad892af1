"""Every torch-free CUDA source in csrc/ compiles with nvcc (compile only: no GPU needed)."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cuda_source_compiles_without_torch(source, tmp_path):
    text = open(source).read()
    assert "torch/" not in text and "ATen/" not in text, f"{source} must stay free of torch headers"
    result = subprocess.run([NVCC, "-std=c++17", "-O2", "-arch=sm_90", "-c", source, "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
