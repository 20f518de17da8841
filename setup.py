"""Build and install siri.

`siri/` is installed as the package `siri` and `kernels/` as its subpackage
`siri.kernels`, so trainers outside this repo can `import siri.kernels`.
"""

from setuptools import setup

setup(
    name="siri",
    version="0.1.0",
    description="RL for reasoning models under an interleaved length budget, with fused policy-loss kernels",
    python_requires=">=3.10",
    packages=["siri", "siri.kernels"],
    package_dir={"siri": "siri", "siri.kernels": "kernels"},
    install_requires=["torch>=2.6", "numpy", "pyyaml"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "hypothesis>=6", "triton>=3.2", "transformers>=4.56"],
        "vllm": ["vllm>=0.10"],
        "dev": ["pytest>=8", "hypothesis>=6", "triton>=3.2", "transformers>=4.56", "ruff", "matplotlib"],
    },
)
