"""batikfast: a custom-kernel Diffusion-GAN (StyleGAN2-ADA) for synthesising batik motifs.

The hot ops live in :mod:`batikfast.ops`, each in three implementations (pure PyTorch, Triton,
CUDA C++) chosen by :mod:`batikfast.backends`. Importing batikfast never touches CUDA, never
compiles anything and never loads the CUDA extension.
"""
from batikfast.backends import get_backend, set_backend

__version__ = "0.1.0"
__all__ = ["set_backend", "get_backend", "__version__"]
