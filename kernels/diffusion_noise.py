"""Diffusion noising, ``y[n] = x_scale[n] * x[n] + noise_scale[n] * eps[n]``, in one pass.

``eps`` is the given ``noise`` or, without it, standard normal noise drawn inside the kernel and
never written to memory: element ``i`` (flat, row-major) gets the normal number keyed by
``(seed, offset + i)``. One Philox-4x32 call (10 rounds) at counter ``(offset + i) // 4`` gives
four 32-bit words, turned by Box-Muller into the four normal numbers of the elements
``4 * counter .. 4 * counter + 3``, so the generator costs a quarter call per element. The
result depends only on ``(seed, offset + i)``: the same seed and offset reproduce it on any
launch configuration, and a call that continues another with ``offset + numel`` draws fresh
numbers. Without ``noise_scale`` the kernel computes ``x_scale[n] * x[n]`` (the backward).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_device, interpreter_tiles, launch_device

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TWO_PI = tl.constexpr(6.283185307179586)
# Uniform numbers are (k + 0.5) / 2**24 for 24-bit k: strictly inside (0, 1), so log() is finite
# and the normals are bounded by sqrt(2 * ln(2**25)) = 5.9 (a tail of 4e-9 left out).
_TO_UNIFORM = tl.constexpr(1.0 / 16777216.0)


@triton.jit
def _normal4(seed, counter):
    """Four blocks of N(0, 1) numbers from Philox-4x32 at int64 ``counter`` (split in two
    32-bit words, so counters past 2**32 stay distinct on every Triton version)."""
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    r0, r1, r2, r3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    u0 = ((r0 >> 8).to(tl.float32) + 0.5) * _TO_UNIFORM
    u1 = ((r1 >> 8).to(tl.float32) + 0.5) * _TO_UNIFORM
    u2 = ((r2 >> 8).to(tl.float32) + 0.5) * _TO_UNIFORM
    u3 = ((r3 >> 8).to(tl.float32) + 0.5) * _TO_UNIFORM
    radius_a = tl.sqrt(-2.0 * tl.log(u0))
    radius_b = tl.sqrt(-2.0 * tl.log(u2))
    angle_a = _TWO_PI * u1
    angle_b = _TWO_PI * u3
    return (radius_a * tl.cos(angle_a), radius_a * tl.sin(angle_a),
            radius_b * tl.cos(angle_b), radius_b * tl.sin(angle_b))


@triton.jit
def _diffusion_noise_kernel(x_ptr, x_scale_ptr, noise_scale_ptr, noise_ptr, y_ptr,
                            numel, per_sample, batch, seed, first_counter,
                            HAS_NOISE_SCALE: tl.constexpr, GIVEN_NOISE: tl.constexpr,
                            SHIFT: tl.constexpr, AT_MOST_TWO_SAMPLES: tl.constexpr,
                            BLOCK: tl.constexpr):
    """y.flat[i] = x_scale[i // per_sample] * x.flat[i] + noise_scale[i // per_sample] * eps_i,
    eps_i = noise.flat[i] or the normal number of Philox counter (offset + i) // 4, word
    (offset + i) % 4. SHIFT = offset % 4: programs cover whole counters, so program p starts at
    element p * BLOCK - SHIFT; first_counter = offset // 4."""
    pid = tl.program_id(0).to(tl.int64)
    # [BLOCK // 4, 4]: one row per Philox counter, one column per word.
    groups = tl.arange(0, BLOCK // 4)
    start = pid * BLOCK - SHIFT
    index = start + (groups * 4)[:, None] + tl.arange(0, 4)[None, :]
    mask = (index >= 0) & (index < numel)

    first_sample = tl.maximum(start, 0) // per_sample
    if AT_MOST_TWO_SAMPLES:
        # per_sample >= BLOCK: the block meets at most two samples, so two scalar loads and a
        # select replace a per-element 64-bit division and gather.
        in_second = index >= (first_sample + 1) * per_sample
        has_second = first_sample + 1 < batch
        x_scale = tl.where(in_second,
                           tl.load(x_scale_ptr + first_sample + 1, mask=has_second, other=0.0),
                           tl.load(x_scale_ptr + first_sample)).to(tl.float32)
    else:
        sample = index // per_sample
        x_scale = tl.load(x_scale_ptr + sample, mask=mask, other=0.0).to(tl.float32)

    y = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32) * x_scale
    if HAS_NOISE_SCALE:
        if AT_MOST_TWO_SAMPLES:
            noise_scale = tl.where(
                in_second,
                tl.load(noise_scale_ptr + first_sample + 1, mask=has_second, other=0.0),
                tl.load(noise_scale_ptr + first_sample)).to(tl.float32)
        else:
            noise_scale = tl.load(noise_scale_ptr + sample, mask=mask, other=0.0).to(tl.float32)
        if GIVEN_NOISE:
            eps = tl.load(noise_ptr + index, mask=mask, other=0.0).to(tl.float32)
        else:
            n0, n1, n2, n3 = _normal4(seed, first_counter + pid * (BLOCK // 4) + groups)
            # join + reshape puts the four words of a counter in one thread's registers, the
            # layout of the [BLOCK // 4, 4] loads, where a broadcast-and-select would go through
            # shared memory.
            eps = tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), (BLOCK // 4, 4))
        y += noise_scale * eps
    tl.store(y_ptr + index, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_args(x, x_scale, noise_scale, noise, seed, offset) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"x must be a tensor [N, ...] of rank >= 1, got {x!r:.80}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check_device("diffusion_noise", "x", x)
    for name, scale in (("x_scale", x_scale), ("noise_scale", noise_scale)):
        if scale is None and name == "noise_scale":
            continue
        if (not isinstance(scale, torch.Tensor) or not scale.is_floating_point()
                or tuple(scale.shape) != (x.shape[0],)):
            raise ValueError(f"{name} must be a floating tensor of shape [{x.shape[0]}] (one value "
                             f"per sample), got {scale!r:.80}")
        check_device("diffusion_noise", name, scale, x)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            raise ValueError(f"noise must be a tensor of x's shape {tuple(x.shape)}, got "
                             f"{getattr(noise, 'shape', noise)!r:.80}")
        if noise.dtype not in _DTYPES:
            raise TypeError(f"noise must be float32, float16 or bfloat16, got {noise.dtype}")
        check_device("diffusion_noise", "noise", noise, x)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2 ** 62:
        raise ValueError(f"offset must be an int in [0, 2**62), got {offset!r}")


def diffusion_noise_forward(x, x_scale, noise_scale, noise, seed, offset):
    """``x_scale[n] * x[n] + noise_scale[n] * eps[n]`` per sample n, in x's dtype.

    Args:
        x: [N, ...] float32 / float16 / bfloat16, any layout (non-contiguous input is copied).
        x_scale: [N] floating, the per-sample factor of x.
        noise_scale: None (then ``y = x_scale * x``) or [N] floating.
        noise: None (eps drawn in the kernel) or a tensor of x's shape used as eps.
        seed: int in [0, 2**63); offset: int >= 0, added to the flat element index to key eps.

    Returns:
        y, contiguous, x's shape and dtype; math in fp32.
    """
    _check_args(x, x_scale, noise_scale, noise, seed, offset)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    numel = x.numel()
    if numel == 0:
        return y
    given_noise = noise_scale is not None and noise is not None
    # 4096 elements per program, 8 per thread with 16 warps: 16 per thread (8 warps) made
    # ptxas spill the Philox state (48 bytes on sm_80 and sm_90, see benchmarks/codegen.py).
    # The interpreter gets small blocks so tiny test tensors span several programs.
    block = 256 if interpreter_tiles() else 4096
    shift = offset % 4
    per_sample = numel // x.shape[0]
    grid = (triton.cdiv(numel + shift, block),)
    with launch_device(x):
        _diffusion_noise_kernel[grid](
            x, x_scale.contiguous(), noise_scale.contiguous() if noise_scale is not None else x,
            noise.contiguous() if given_noise else x, y,
            numel, per_sample, x.shape[0], int(seed), offset // 4,
            HAS_NOISE_SCALE=noise_scale is not None, GIVEN_NOISE=given_noise, SHIFT=shift,
            AT_MOST_TWO_SAMPLES=per_sample >= block, BLOCK=block,
            num_warps=1 if interpreter_tiles() else 16)
    return y
