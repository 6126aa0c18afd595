"""Shared by the cross-backend tests (where they run, skipping with a reason) and the Triton
kernel tests (compiling for an NVIDIA GPU without one)."""
import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batikfast import backends

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
FAST_IMPLS = ["triton", "cuda"]

# Tests that say "fresh" draw new inputs on every run, from a seed chosen once per session;
# BATIKFAST_TEST_SEED=<seed> replays a run (their failure messages name the seed).
SESSION_SEED = int(os.environ.get("BATIKFAST_TEST_SEED") or
                   int.from_bytes(os.urandom(4), "little"))
REPLAY = f"replay with BATIKFAST_TEST_SEED={SESSION_SEED}"


def fresh_generator(*salt):
    """A CPU generator seeded from this session's seed and ``salt`` (say, the test's
    parameters), so each case draws its own inputs, different on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SESSION_SEED,) + salt).encode()))


def rand(*shape, seed, dtype=torch.float32, scale=1.0):
    """Seeded normal values on DEVICE, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def schedule(steps=20):
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of a linear beta schedule, t = 0..steps."""
    betas = torch.linspace(1e-4, 2e-2, steps, dtype=torch.float64)
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    return alpha_bar.sqrt().float().to(DEVICE), (1 - alpha_bar).sqrt().float().to(DEVICE)


def require(impl, op, dtype=torch.float32):
    """Skip, saying why, when ``impl`` cannot run ``op`` on this machine."""
    reason = backends.unavailable_reason(impl, DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on {DEVICE.type} here: {reason}")


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG, for the archives the data tests write."""
    buffer = io.BytesIO()
    image.save(buffer, "png")
    return buffer.getvalue()


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


# The documented diffusion-noise stream (Philox4x32-10, Box-Muller), written out in numpy:
# shared by the Triton and CUDA kernel tests.
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(counters, seed):
    """Philox4x32-10 on uint64 numpy arrays of 32-bit words: counter (lo, hi, 0, 0), key = seed."""
    c = [counters & _MASK, counters >> np.uint64(32), np.zeros_like(counters), np.zeros_like(counters)]
    return philox_rounds(c, np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32))


def philox_rounds(c, k0, k1):
    """The ten Philox4x32 rounds on the counter words ``c`` with key (k0, k1)."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(_W0)) & _MASK, (k1 + np.uint64(_W1)) & _MASK
        p0, p1 = np.uint64(_M0) * c[0], np.uint64(_M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & _MASK]
    return c


def documented_eps(seed, offset, numel):
    """float64 normals of positions offset .. offset+numel-1 (the documented stream)."""
    pos = np.arange(offset, offset + numel, dtype=np.uint64)
    words = philox4x32_10(pos // np.uint64(4), seed)
    # (k + 0.5) / 2**24 rounded to float32, as both kernels compute it.
    uniform = [((w >> np.uint64(8)).astype(np.float32) + np.float32(0.5)).astype(np.float64) / 2.0**24
               for w in words]
    radius = [np.sqrt(-2.0 * np.log(uniform[0])), np.sqrt(-2.0 * np.log(uniform[2]))]
    angle = [2.0 * np.pi * uniform[1], 2.0 * np.pi * uniform[3]]
    # Positions 4c .. 4c+3: (r_a cos a, r_b cos b, r_a sin a, r_b sin b).
    normals = [radius[0] * np.cos(angle[0]), radius[1] * np.cos(angle[1]),
               radius[0] * np.sin(angle[0]), radius[1] * np.sin(angle[1])]
    lane = (pos % np.uint64(4)).astype(np.int64)
    return torch.from_numpy(np.choose(lane, normals))
