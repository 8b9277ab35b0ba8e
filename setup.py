"""Build and install mtlsam_fast (pure Python; the compiled extension is added by csrc/)."""

from setuptools import find_packages, setup

setup(
    name="mtlsam_fast",
    version="0.1.0",
    description="Fast sharpness-aware multi-task optimization (F-MTL, SAMO) and gradient aggregation for PyTorch",
    packages=find_packages(include=["mtlsam_fast", "mtlsam_fast.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest>=8", "scipy", "quadprog", "pytest-benchmark", "scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["mtlsam-fast=mtlsam_fast.cli:main"]},
)
