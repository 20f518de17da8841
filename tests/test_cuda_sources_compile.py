"""Every csrc/cuda/*.cu compiles standalone for sm_90 (no torch header, no GPU needed).

The CUDA kernels can only run where a GPU is; this keeps them compiling on every machine
that has nvcc. Compile only (`-c`), into a temporary directory.
"""

import pathlib
import shutil
import subprocess

import pytest

CUDA_SOURCES = sorted((pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    command = [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-Werror=all-warnings", "-c", str(source),
               "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda holds no .cu file"
