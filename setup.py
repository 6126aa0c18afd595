"""Build and install batikfast.

The Python package always installs. The CUDA extension ``batikfast._C`` is built from ``csrc/``
when a CUDA toolkit is found, unless ``BATIKFAST_BUILD_CUDA=0``; see ``csrc/extension.py``.
``kernels/`` (the Triton kernels) installs as ``batikfast.kernels``.

setup.py imports torch to build the extension, so install without build isolation:
``pip install --no-build-isolation -e '.[test]'``.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from extension import build_ext_class, cuda_extensions  # noqa: E402

packages = find_packages(include=["batikfast", "batikfast.*"]) + ["batikfast.kernels"]
ext_modules = cuda_extensions()

setup(
    name="batikfast",
    version="0.1.0",
    description="Custom-kernel Diffusion-GAN (StyleGAN2-ADA) training for batik motifs",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"batikfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "scipy", "ninja", "pybind11",
                 "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_class()} if ext_modules else {},
)
