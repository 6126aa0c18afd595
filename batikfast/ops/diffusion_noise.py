"""Diffusion noising: ``x_t = sqrt_alpha_bar[t] * x + sqrt_one_minus_alpha_bar[t] * noise_std * eps``.

``t`` holds one integer step per sample. With ``noise`` given, ``eps = noise``; without, the
fast implementations draw ``eps ~ N(0, 1)`` inside the kernel from a counter-based generator
(Philox) keyed by ``seed``, so no noise tensor is written to memory, and the reference draws it
from a ``torch.Generator`` seeded with ``seed``. Each implementation is reproducible from the
seed; the noise streams of different implementations are different (equal in distribution).
Differentiable in ``x`` (R1 is taken through the noising), in ``noise`` and in the two
schedules (the fast paths draw the noise again from the seed for the latter).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from batikfast import backends
from batikfast.ops._autograd import differentiable
from batikfast.ops._validate import check_same_device, check_tensor

_SEED_RANGE = 2 ** 62


def diffusion_noise(x: torch.Tensor, t: torch.Tensor, sqrt_alpha_bar: torch.Tensor,
                    sqrt_one_minus_alpha_bar: torch.Tensor, noise_std: float = 0.05,
                    noise: torch.Tensor | None = None, seed: int | None = None,
                    impl: str | None = None) -> torch.Tensor:
    """Noise each sample of ``x`` to its diffusion step ``t``.

    Args:
        x: [N, ...] clean samples.
        t: [N] integer steps, each in ``[0, len(sqrt_alpha_bar))``, on x's device or on the
            CPU. Their range is checked; on a GPU that check waits for the device, so a caller
            that draws t on the host (as :class:`batikfast.diffusion.Diffusion` does) should
            pass the CPU tensor: then nothing waits.
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar: 1-D schedules of equal length (t = 0 is the
            clean image: sqrt_alpha_bar[0] = 1 and sqrt_one_minus_alpha_bar[0] = 0).
        noise_std: scale of the noise on top of the schedule (Diffusion-GAN: 0.05).
        noise: None or a tensor of ``x``'s shape to use as ``eps``.
        seed: None (drawn from torch's default generator) or an int in [0, 2**62).
        impl: ``"ref"``, ``"triton"``, ``"cuda"`` or None for automatic choice.
    """
    _check_arguments(x, t, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, noise_std, noise, seed)
    if t.device != x.device:
        # A host t, copied through pinned memory: a pageable copy would wait for the GPU. Not
        # while compiling: the graph is traced on fake tensors, which cannot be pinned
        # (torch.compile would fail on every GPU), and the compiled graph does the copy.
        pinned = x.is_cuda and not torch.compiler.is_compiling()
        t = t.pin_memory().to(x.device, non_blocking=True) if pinned else t.to(x.device)
    # As int64: a uint8 t would index as a boolean mask, an int8 / int16 one not at all.
    t = t.long()
    x_scale = sqrt_alpha_bar.float()[t]
    noise_scale = sqrt_one_minus_alpha_bar.float()[t] * float(noise_std)
    chosen = backends.resolve("diffusion_noise", x, impl)
    if chosen == "ref":
        return diffusion_noise_reference(x, x_scale, noise_scale, noise, seed)
    if noise is not None and noise.dtype not in backends.FAST_DTYPES:
        noise = noise.float()  # float64 noise: the reference computes in float32 too
    if seed is None:
        seed_tensor = torch.randint(0, _SEED_RANGE, (), dtype=torch.int64)
    else:
        seed_tensor = torch.tensor(seed, dtype=torch.int64)
    return _diffusion_noise_fast(x, x_scale, noise_scale, noise, seed_tensor, chosen)


def _check_arguments(x, t, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, noise_std, noise,
                     seed) -> None:
    check_tensor("x", x)
    if x.ndim < 1:
        raise ValueError("x must have a batch axis, got a scalar")
    check_tensor("t", t, ndim=1, floating=False)
    if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have one step per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
    check_tensor("sqrt_alpha_bar", sqrt_alpha_bar, ndim=1)
    check_tensor("sqrt_one_minus_alpha_bar", sqrt_one_minus_alpha_bar, ndim=1)
    if sqrt_alpha_bar.shape != sqrt_one_minus_alpha_bar.shape:
        raise ValueError(f"the schedules differ in length: {sqrt_alpha_bar.shape[0]} and "
                         f"{sqrt_one_minus_alpha_bar.shape[0]}")
    if noise is not None:
        check_tensor("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if t.device.type != "cpu":
        check_same_device(x=x, t=t)
    check_same_device(x=x, sqrt_alpha_bar=sqrt_alpha_bar,
                      sqrt_one_minus_alpha_bar=sqrt_one_minus_alpha_bar, noise=noise)
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) \
            or not math.isfinite(noise_std) or noise_std < 0:
        # float(None) was torch's "must be a string or a real number"; a negative or NaN one
        # a silent wrong answer.
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)
                                 and 0 <= seed < _SEED_RANGE):
        raise ValueError(f"seed must be None or an int in [0, 2**62), got {seed!r}")
    # Under torch.compile a data-dependent check would break the graph; on a GPU tensor it costs
    # a device sync (see the docstring).
    # A meta t has no values to check (t.min() cannot be read: a RuntimeError from .item()).
    if t.numel() and t.device.type != "meta" and not torch.compiler.is_compiling():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= sqrt_alpha_bar.shape[0]:
            raise ValueError(f"t must lie in [0, {sqrt_alpha_bar.shape[0] - 1}] (the schedule's "
                             f"steps), got values from {low} to {high}")


def _per_sample(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape([-1] + [1] * (like.ndim - 1))


def diffusion_noise_reference(x, x_scale, noise_scale, noise, seed):
    if noise is None and seed is None:
        noise = torch.randn(x.shape, device=x.device, dtype=torch.float32)
    elif noise is None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    y = _per_sample(x_scale, x) * x.float() + _per_sample(noise_scale, x) * noise.float()
    return y.to(x.dtype)


@torch.library.custom_op("batikfast::diffusion_noise", mutates_args=())
def _diffusion_noise_op(x: torch.Tensor, x_scale: torch.Tensor, noise_scale: Optional[torch.Tensor],
                        noise: Optional[torch.Tensor], seed: torch.Tensor,
                        impl: str) -> torch.Tensor:
    # The seed travels as a CPU tensor so a compiled graph draws a fresh one per call.
    return backends.kernels("diffusion_noise", impl).diffusion_noise_forward(
        x, x_scale, noise_scale, noise, int(seed), 0)


@_diffusion_noise_op.register_fake
def _(x, x_scale, noise_scale, noise, seed, impl):
    return x.new_empty(x.shape)


def _diffusion_noise_setup(ctx, inputs, output):
    x, x_scale, noise_scale, noise, seed, ctx.impl = inputs
    ctx.noise_dtype = noise.dtype if noise is not None else None
    # x and the noise only for the schedule's gradient (references kept, no copies).
    schedule_needs_grad = x_scale.requires_grad or (noise_scale is not None
                                                    and noise_scale.requires_grad)
    ctx.save_for_backward(x_scale, noise_scale, x if schedule_needs_grad else None,
                          noise if schedule_needs_grad else None, seed)


def _diffusion_noise_backward(ctx, dy):
    x_scale, noise_scale, x, noise, seed = ctx.saved_tensors
    unused_seed = torch.zeros((), dtype=torch.int64)
    d_x = d_x_scale = d_noise_scale = d_noise = None
    if ctx.needs_input_grad[0]:
        d_x = _diffusion_noise_fast(dy, x_scale, None, None, unused_seed, ctx.impl)
    if ctx.needs_input_grad[1]:
        d_x_scale = _per_sample_dot(dy, x)
    if ctx.needs_input_grad[2]:
        eps = noise if noise is not None else _drawn_noise(x, seed, ctx.impl)
        d_noise_scale = _per_sample_dot(dy, eps)
    if ctx.needs_input_grad[3] and noise_scale is not None:
        # In the noise's own precision: a float32 noise under a 16-bit x gets dy * scale
        # unrounded, as the reference's float32 arithmetic gives it.
        d_noise = _diffusion_noise_fast(dy.to(ctx.noise_dtype), noise_scale, None, None,
                                        unused_seed, ctx.impl)
    return d_x, d_x_scale, d_noise_scale, d_noise, None, None


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over all but the first axis of a * b, in float32: [N]."""
    per_sample = math.prod(a.shape[1:])
    return (a.float() * b.float()).reshape(a.shape[0], per_sample).sum(1)


def _drawn_noise(x: torch.Tensor, seed: torch.Tensor, impl: str) -> torch.Tensor:
    """The eps the kernel drew for ``x`` from ``seed`` (the stream depends on the seed and the
    element's index alone), drawn again in float32: x scaled by 0 plus eps scaled by 1."""
    zeros = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    per_sample = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return _diffusion_noise_op(zeros, per_sample * 0, per_sample, None, seed, impl)


_diffusion_noise_fast = differentiable(_diffusion_noise_op, _diffusion_noise_setup,
                                       _diffusion_noise_backward)
