"""Shared by the cross-backend tests: where they run, and skipping with a reason."""
import importlib.util

import pytest
import torch

from batikfast import backends

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
FAST_IMPLS = ["triton", "cuda"]


def require(impl, op, dtype=torch.float32):
    """Skip, saying why, when ``impl`` cannot run ``op`` on this machine."""
    reason = backends.unavailable_reason(impl, DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on {DEVICE.type} here: {reason}")
    # The modulated convolution's resampling and unfused epilogues run on the other kernels.
    needed = [op] + (["upfirdn2d", "bias_act"] if op == "modulated_conv2d" else [])
    missing = [name for name in needed if not _triton_kernel_exists(name)]
    if impl == "triton" and missing:
        pytest.skip(f"kernels/{missing[0]}.py is not in this checkout")


def _triton_kernel_exists(op):
    return importlib.util.find_spec(f"batikfast.kernels.{op}") is not None
