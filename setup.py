"""Build and install siri.

`siri/` is installed as the package `siri` and `kernels/` as its subpackage
`siri.kernels`, so trainers outside this repo can `import siri.kernels`.

The native extension `siri._C` (csrc/) is built against the torch already installed, so
install with `pip install --no-build-isolation .` (or `-e .`): an isolated build would
fetch a different torch to compile against. It is a CUDA extension when torch has CUDA
and nvcc is found, a C++ CPU extension otherwise. Environment switches:

- `SIRI_SKIP_EXT=1`: install without the extension (the "torch" and "triton" backends
  remain). A build that was asked for and fails, fails the install.
- `SIRI_CUDA_ARCHS`: CUDA architectures, default "8.0;9.0"; PTX is added for the newest.
- `MAX_JOBS`: parallel compile jobs; by default the CPU count, capped by memory for nvcc.
"""

import os
import platform

from setuptools import find_packages, setup

CSRC = "csrc"

# The CPU kernels are compiled once per instruction set and picked at run time
# (csrc/cpu/dispatch.cpp), as ATen compiles its own: name -> compiler flags. On other
# machines only the DEFAULT build, which the compiler vectorises for its baseline.
X86_CPU_VARIANTS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# nvcc takes about this much memory per job on csrc/cuda.
NVCC_JOB_BYTES = 4 << 30


def _sources(*parts):
    return [os.path.join(CSRC, *part.split("/")) for part in parts]


def _cpu_variants():
    if platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt":
        return X86_CPU_VARIANTS
    return {}


def _cuda_gencode_flags():
    archs = [a.strip() for a in os.environ.get("SIRI_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise RuntimeError("SIRI_CUDA_ARCHS lists no architecture")
    codes = sorted({a.replace(".", "") for a in archs}, key=lambda c: (int("".join(filter(str.isdigit, c))), c))
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
    newest = codes[-1]
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]  # PTX: runs on newer GPUs


def _set_max_jobs(with_cuda):
    if os.environ.get("MAX_JOBS"):
        return
    jobs = os.cpu_count() or 1
    if with_cuda and hasattr(os, "sysconf"):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        jobs = min(jobs, max(1, memory // NVCC_JOB_BYTES))
    os.environ["MAX_JOBS"] = str(jobs)


def _extension_build():
    """(ext_modules, cmdclass) for setup(), or empty ones under SIRI_SKIP_EXT=1."""
    if os.environ.get("SIRI_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        raise RuntimeError(
            "building siri._C needs the installed torch: run `pip install --no-build-isolation .`, "
            "or set SIRI_SKIP_EXT=1 to install without the native extension"
        ) from error

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    variants = _cpu_variants()
    _set_max_jobs(with_cuda)

    # -ffp-contract=off: no implicit FMA, which would subtract from an unrounded x / tau
    # (csrc/cpu/kernels.cpp); explicit at::vec::fmadd calls stay fused.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"] + [f"-DSIRI_CPU_{name}" for name in variants]
    # csrc/cpu/kernels.cpp is not listed: BuildSiriExtension compiles it once per variant.
    sources = _sources("bindings.cpp", "cpu/dispatch.cpp")
    if with_cuda:
        cxx_flags.append("-DSIRI_WITH_CUDA")
        nvcc_flags = ["-O3", "-lineinfo"] + _cuda_gencode_flags()
        extension = CUDAExtension(
            "siri._C",
            sources + _sources("cuda/cuda_backend.cpp", "cuda/kernels.cu"),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "siri._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )

    class BuildSiriExtension(BuildExtension):
        """BuildExtension that also compiles csrc/cpu/kernels.cpp once per instruction set."""

        def build_extension(self, ext):
            kernels = os.path.join(CSRC, "cpu", "kernels.cpp")
            base_flags = list(ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict)
                              else ext.extra_compile_args)
            for name, isa_flags in {"DEFAULT": [], **variants}.items():
                macros = [("CPU_CAPABILITY", name), (f"CPU_CAPABILITY_{name}", None)]
                ext.extra_objects += self.compiler.compile(
                    [kernels],
                    output_dir=os.path.join(self.build_temp, f"cpu_{name.lower()}"),
                    macros=macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs=base_flags + isa_flags,
                    depends=_sources("cpu/kernels.h", "common/kernel_args.h", "common/token_loss.h"),
                )
            super().build_extension(ext)

    return [extension], {"build_ext": BuildSiriExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="siri",
    version="0.1.0",
    description="RL for reasoning models under an interleaved length budget, with fused policy-loss kernels",
    python_requires=">=3.10",
    packages=[*find_packages(include=["siri", "siri.*"]), "siri.kernels"],
    package_dir={"siri": "siri", "siri.kernels": "kernels"},
    install_requires=["torch>=2.6", "numpy", "pyyaml", "transformers>=4.56", "math-verify>=0.9.0"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "hypothesis>=6", "triton>=3.2", "matplotlib", "pyarrow", "tensorboard", "wandb"],
        "vllm": ["vllm>=0.10.2"],
        # siri.integrations: each peer's loss is reproduced for its tested minor version.
        "trl": ["trl>=1.16,<1.17"],
        "verl": ["verl>=0.9,<0.10"],
        "dev": ["pytest>=8", "hypothesis>=6", "triton>=3.2", "matplotlib", "pyarrow", "tensorboard", "wandb", "ruff"],
    },
    entry_points={"console_scripts": ["siri=siri.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
