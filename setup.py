"""Build and install batikfast.

The Python package always installs. The CUDA extension ``batikfast._C`` is built from ``csrc/``
when a CUDA toolkit is found, unless ``BATIKFAST_BUILD_CUDA=0``; see ``csrc/extension.py``.
``kernels/`` (the Triton kernels) installs as ``batikfast.kernels``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["batikfast", "batikfast.*"]) + ["batikfast.kernels"]

setup(
    name="batikfast",
    version="0.1.0",
    description="Custom-kernel Diffusion-GAN (StyleGAN2-ADA) training for batik motifs",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"batikfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "pillow"],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy", "ninja", "pybind11", "pytest-benchmark"],
    },
)
