"""Every csrc/cuda/*.cu compiles standalone for sm_90 (no torch header, no GPU needed), unspilled.

The CUDA kernels can only run where a GPU is; this keeps them compiling on every machine
that has nvcc. Compile only (`-c`), into a temporary directory. `ptxas -v` reports each
kernel's registers and spills: a kernel that spills to local memory fails the test, and the
register counts are printed (`pytest -s` shows them).
"""

import pathlib
import re
import shutil
import subprocess

import pytest

CUDA_SOURCES = sorted((pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    command = [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-Werror=all-warnings", "-Xptxas", "-v", "-c", str(source),
               "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    kernels = ptxas_usage(result.stdout + result.stderr)
    for name, (registers, spill_stores, spill_loads) in kernels.items():
        print(f"{demangle(name)}: {registers} registers, {spill_stores} B spill stores, {spill_loads} B spill loads")
    spilled = [demangle(name) for name, (_, stores, loads) in kernels.items() if stores or loads]
    assert not spilled, f"kernels that spill registers: {spilled}"


def ptxas_usage(log: str) -> dict[str, tuple[int, int, int]]:
    """Entry function -> (registers, spill store bytes, spill load bytes), from `ptxas -v` output."""
    found = {}
    for block in log.split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        assert spills and registers, f"no ptxas -v report for {name}:\n{block}"
        found[name] = (int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))
    assert found, f"ptxas -v reported no entry function:\n{log}"
    return found


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda holds no .cu file"
