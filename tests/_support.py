"""Shared by the cross-backend tests (where they run, skipping with a reason) and the Triton
kernel tests (compiling for an NVIDIA GPU without one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batikfast import backends

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
FAST_IMPLS = ["triton", "cuda"]


def require(impl, op, dtype=torch.float32):
    """Skip, saying why, when ``impl`` cannot run ``op`` on this machine."""
    reason = backends.unavailable_reason(impl, DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on {DEVICE.type} here: {reason}")


# Compiling for a real GPU target catches what the interpreter lets through (types, layouts,
# constexpr rules); ptxas ships with Triton, so this runs on machines without a GPU too.
COMPILE_HEADER = r"""
import sys
sys.path.insert(0, {root!r})
import triton
from triton.backends.compiler import GPUTarget
from batikfast import backends
kernels = backends.triton_kernels({op!r})


def compile_for_sm90(fn, types, constants, num_warps):
    signature, attrs = {{}}, {{}}
    for i, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in constants else types[name]
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
"""


def compile_without_gpu(op, calls):
    """Run ``calls`` after COMPILE_HEADER in a fresh interpreter without TRITON_INTERPRET."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = COMPILE_HEADER.format(root=root, op=op) + calls
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

# The fused modulated-convolution layer of the kernel-level API, written with torch ops; shared
# by the Triton and CUDA kernel tests.
MODCONV_ACTS = {"linear": lambda y, a: y, "relu": lambda y, a: y.clamp(min=0),
                "lrelu": lambda y, a: torch.where(y > 0, y, y * a)}


def modconv_layer_reference(x, weight, in_scale, out_scale, noise, bias, act, alpha, gain, clamp, padding,
              dtype=torch.float64):
    """The fused layer computed with torch ops in ``dtype``; also returns the pre-clamp scale."""
    def cast(t):
        return t.to(dtype) if t is not None else None

    x, weight, in_scale, out_scale, noise, bias = map(
        cast, (x, weight, in_scale, out_scale, noise, bias))
    if in_scale is not None:
        x = x * in_scale[:, :, None, None]
    # Not cuDNN: its engine choice changes with shape and dtype, and the H100 run's unexplained
    # segfault came during a 1x3 fp16 case, whose truth is an fp16 cuDNN convolution. ATen's own
    # convolution keeps the truth independent of the library the benchmarks compare against.
    with torch.backends.cudnn.flags(enabled=False):
        y = F.conv2d(x, weight, padding=padding)
    if out_scale is not None:
        y = y * out_scale[:, :, None, None]
    if noise is not None:
        y = y + noise
    if bias is not None:
        y = y + bias[None, :, None, None]
    y = MODCONV_ACTS[act](y, alpha) * gain
    scale = y.abs().max().item() if y.numel() else 0.0
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y, scale
