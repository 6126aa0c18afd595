"""The public ops, with NVIDIA's ``torch_utils.ops`` names, arguments and semantics.

Each op takes ``impl=None | "ref" | "triton" | "cuda"``; :mod:`batikfast.backends` decides
when it is None. Importing this package registers the ``batikfast::*`` custom ops with
``torch.library`` (so ``torch.compile`` traces through them) and loads no kernels.
NVIDIA's module layout (``bias_act.bias_act(...)``) is in :mod:`batikfast.ops.compat`.
"""
from batikfast.ops.bias_act import ACTIVATIONS, bias_act
from batikfast.ops.conv2d_resample import conv2d_resample
from batikfast.ops.diffusion_noise import diffusion_noise
from batikfast.ops.modulated_conv2d import demodulation_coefficients, modulated_conv2d
from batikfast.ops.upfirdn2d import (downsample2d, filter2d, setup_filter, upfirdn2d,
                                     upsample2d)

__all__ = [
    "ACTIVATIONS", "bias_act", "conv2d_resample", "demodulation_coefficients",
    "diffusion_noise", "downsample2d", "filter2d", "modulated_conv2d", "setup_filter",
    "upfirdn2d", "upsample2d",
]
