"""Modulated convolution, the StyleGAN2 synthesis layer's convolution.

Each sample ``n`` is convolved with its own weights ``w[n] = weight * styles[n]`` (styles scale
the input channels); with ``demodulate`` each output channel is then scaled by
``rsqrt(sum(w[n]^2 over in, kh, kw) + 1e-8)``, and ``noise`` is added. fp16 inputs are
pre-normalised as NVIDIA's code does, to keep the sums in range.

The keyword-only extras ``bias, act, alpha, gain, clamp`` fuse the rest of the synthesis layer:
the result equals ``bias_act(modulated_conv2d(...), bias, act=act, alpha=alpha, gain=gain,
clamp=clamp)``.

The reference materialises per-sample weights (a grouped convolution) or scales activations
around a shared-weight convolution, exactly as NVIDIA's ``fused_modconv`` does. The fast paths
never materialise per-sample weights: the custom op ``batikfast::modulated_conv2d`` scales the
input by the style while loading it, convolves on tensor cores and applies the demodulation,
noise, bias, activation and clamp to the output in one kernel (stride 1, square kernels).
Up-/down-sampling layers scale the input, convolve and resample with
:func:`conv2d_resample`, and apply the epilogue with :func:`bias_act`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from batikfast import backends
from batikfast.ops._autograd import differentiable
from batikfast.ops._validate import check_same_device, check_tensor, parse_padding
from batikfast.ops.bias_act import bias_act, resolve_activation
from batikfast.ops.conv2d_resample import conv2d_resample
from batikfast.ops.upfirdn2d import _checked_filter

FUSED_ACTIVATIONS = ("linear", "relu", "lrelu")


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: torch.Tensor | None = None, up: int = 1, down: int = 1, padding=0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True,
                     flip_weight: bool = True, fused_modconv: bool = True,
                     impl: str | None = None, *, bias: torch.Tensor | None = None,
                     act: str = "linear", alpha: float | None = None, gain: float | None = None,
                     clamp: float | None = None) -> torch.Tensor:
    """Convolve each sample of ``x`` with the shared ``weight`` modulated by its ``styles``.

    Args:
        x: [N, I, H, W] activations.
        weight: [O, I, kh, kw] shared weights.
        styles: [N, I] per-sample input-channel scales.
        noise: None or a tensor broadcastable to the output (StyleGAN: [N, 1, H, W] or [H, W]).
        up, down: integer resampling factors (>= 1) applied with ``resample_filter``.
        padding: convolution padding (int, [x, y] or [x0, x1, y0, y1]).
        resample_filter: float32 low-pass filter for up/down-sampling.
        demodulate: scale each output channel to unit expected variance.
        flip_weight: True for cross-correlation (torch.conv2d), False for convolution.
        fused_modconv: the reference's choice of grouped convolution (True) or scaling around a
            shared convolution (False); the fast paths compute the same either way.
        impl: ``"ref"``, ``"triton"``, ``"cuda"`` or None for automatic choice.
        bias, act, alpha, gain, clamp: the fused epilogue, as :func:`bias_act`.

    Returns:
        [N, O, H', W'] in ``x.dtype``.
    """
    _check_arguments(x, weight, styles, noise, bias)
    _check_resampling(x, up, down, padding, resample_filter)
    # Checked on every path (the reference skipped the epilogue's alpha when act was linear).
    resolved = resolve_activation(act, alpha, gain, clamp)
    chosen = backends.resolve("modulated_conv2d", x, impl)
    if chosen == "ref":
        y = modulated_conv2d_reference(x, weight, styles, noise, up, down, padding,
                                       resample_filter, demodulate, flip_weight, fused_modconv)
        if bias is None and act == "linear" and gain is None and clamp is None:
            return y
        return bias_act(y, bias, act=act, alpha=alpha, gain=gain, clamp=clamp, impl="ref")
    act, alpha, gain, clamp = resolved
    return _modulated_conv2d_fast(x, weight, styles, noise, up, down, padding, resample_filter,
                                  demodulate, flip_weight, bias, act, alpha, gain, clamp, chosen)


def _check_arguments(x, weight, styles, noise, bias) -> None:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_tensor("styles", styles, ndim=2)
    if noise is not None:
        check_tensor("noise", noise)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same_device(x=x, weight=weight, styles=styles, noise=noise, bias=bias)
    if weight.numel() == 0:  # torch's convolutions fail on it deep inside (oneDNN, cuDNN)
        raise ValueError(f"weight must not be empty, got shape {list(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels, x has {x.shape[1]}")
    if styles.shape != (x.shape[0], x.shape[1]):
        raise ValueError(f"styles must have shape [N, I] = {[x.shape[0], x.shape[1]]}, "
                         f"got {list(styles.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have {weight.shape[0]} elements (output channels), "
                         f"got {bias.shape[0]}")


def _check_resampling(x, up, down, padding, resample_filter) -> None:
    """What the reference's conv2d_resample refuses, refused before dispatch: the fast path's
    single-pass test (``up == 1``) took True and 1.0 for 1, and never looked at the filter."""
    for name, factor in (("up", up), ("down", down)):
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"{name} must be an int >= 1, got {factor!r}")
    parse_padding(padding)
    if resample_filter is not None:
        _checked_filter(resample_filter, x)


def _prenormalized(x, weight, styles, demodulate):
    """Scale weight and styles so fp16 sums stay finite; demodulation cancels the scale."""
    if x.dtype != torch.float16 or not demodulate:
        return weight, styles
    out_channels, in_channels, kh, kw = weight.shape
    weight = weight * (1 / math.sqrt(in_channels * kh * kw)
                       / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
    styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    return weight, styles


def modulated_conv2d_reference(x, weight, styles, noise, up, down, padding, resample_filter,
                               demodulate, flip_weight, fused_modconv):
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    weight, styles = _prenormalized(x, weight, styles, demodulate)
    per_sample = None
    demod_coefs = None
    if demodulate or fused_modconv:
        per_sample = weight[None] * styles.reshape(batch, 1, in_channels, 1, 1)
    if demodulate:
        demod_coefs = (per_sample.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    if not fused_modconv or batch == 0:  # a grouped convolution of 0 groups does not exist
        x = x * styles.to(x.dtype).reshape(batch, in_channels, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down,
                            padding=padding, flip_weight=flip_weight, impl="ref")
        if demod_coefs is not None:
            x = x * demod_coefs.to(x.dtype).reshape(batch, out_channels, 1, 1)
        _check_noise(noise, x.shape)
        return x if noise is None else x + noise.to(x.dtype)
    if demod_coefs is not None:
        per_sample = per_sample * demod_coefs.reshape(batch, out_channels, 1, 1, 1)
    grouped = x.reshape(1, batch * in_channels, *x.shape[2:])
    y = conv2d_resample(grouped, per_sample.reshape(batch * out_channels, in_channels, kh, kw)
                        .to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch, flip_weight=flip_weight, impl="ref")
    y = y.reshape(batch, out_channels, *y.shape[2:])
    _check_noise(noise, y.shape)
    return y if noise is None else y + noise.to(y.dtype)


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """rsqrt(sum over i, kh, kw of (weight * styles)^2 + 1e-8) as [N, O], without
    materialising per-sample weights: styles^2 @ (sum over taps of weight^2)^T."""
    weight_energy = weight.float().square().sum(dim=[2, 3])
    return (styles.float().square() @ weight_energy.t() + 1e-8).rsqrt()


def _modulated_conv2d_fast(x, weight, styles, noise, up, down, padding, resample_filter,
                           demodulate, flip_weight, bias, act, alpha, gain, clamp, impl):
    out_channels, _, kh, kw = weight.shape
    weight, styles = _prenormalized(x, weight, styles, demodulate)
    if not flip_weight and (kh > 1 or kw > 1):
        weight = weight.flip([2, 3])
    styles = styles.float()
    demod_coefs = demodulation_coefficients(weight, styles) if demodulate else None
    single_pass = (up == 1 and down == 1 and kh == kw and isinstance(padding, int)
                   and 0 <= padding <= kh - 1 and not _exact_fp32_unavailable(x, impl))
    if not single_pass:
        y = conv2d_resample(x * styles.to(x.dtype)[:, :, None, None], weight.to(x.dtype),
                            f=resample_filter, up=up, down=down, padding=padding, impl=impl)
        _check_noise(noise, y.shape)
        if demod_coefs is not None and noise is not None:
            # One pass over the largest tensor of the layer instead of two.
            y = torch.addcmul(noise.to(y.dtype), y, demod_coefs.to(y.dtype)[:, :, None, None])
        elif demod_coefs is not None:
            y = y * demod_coefs.to(y.dtype)[:, :, None, None]
        elif noise is not None:
            y = y + noise.to(y.dtype)
        return _epilogue(y, bias, act, alpha, gain, clamp, impl)
    out_size = (x.shape[2] + 2 * padding - kh + 1, x.shape[3] + 2 * padding - kw + 1)
    _check_noise(noise, (x.shape[0], out_channels, *out_size))
    noise_plane = _as_noise_plane(noise, x.shape[0], out_size, x.dtype)
    epilogue_fits = act in FUSED_ACTIVATIONS and gain > 0 and alpha >= 0
    if noise is not None and noise_plane is None:
        epilogue_fits = False
    if epilogue_fits:
        return _modulated_conv2d_fast_op(
            x, weight.to(x.dtype), styles, demod_coefs, noise_plane, _cast(bias, x.dtype), act,
            alpha, gain, -1.0 if clamp is None else clamp, padding, impl)
    y = _modulated_conv2d_fast_op(x, weight.to(x.dtype), styles, demod_coefs, None,
                                             None, "linear", 0.0, 1.0, -1.0, padding, impl)
    if noise is not None:
        y = y + noise.to(y.dtype)
    return _epilogue(y, bias, act, alpha, gain, clamp, impl)


def _exact_fp32_unavailable(x, impl) -> bool:
    """The CUDA kernel multiplies fp32 on tensor cores in TF32 only; when torch forbids TF32 for
    convolutions (``torch.backends.cudnn.allow_tf32 = False``, as in training) an fp32 layer
    takes the composite path, whose convolution is cuDNN's in full fp32. (The Triton kernel
    switches its own precision.)"""
    return impl == "cuda" and x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


def _epilogue(y, bias, act, alpha, gain, clamp, impl):
    if bias is None and act == "linear" and gain == 1 and clamp is None:
        return y
    return bias_act(y, bias, act=act, alpha=alpha, gain=gain, clamp=clamp, impl=impl)


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


def _check_noise(noise, out_shape) -> None:
    """Noise must broadcast to the output without changing its shape (a torch broadcasting
    error, or a silently larger result, otherwise)."""
    if noise is not None and not _broadcasts_unchanged(tuple(noise.shape), tuple(out_shape)):
        raise ValueError(f"noise must broadcast to the output's shape {list(out_shape)}, got "
                         f"shape {list(noise.shape)}")


def _broadcasts_unchanged(shape, target) -> bool:
    """``torch.broadcast_shapes(shape, target) == target``, in plain Python: torch's (through
    its symbolic-shape guards) was about a third of an eager layer's host time on this CPU."""
    if len(shape) > len(target):
        return False
    return all(size in (1, wanted) for size, wanted in zip(reversed(shape), reversed(target)))


def _as_noise_plane(noise, batch, out_size, dtype):
    """Noise as the [N, 1, H, W] plane the kernel adds to every channel; None if it is not one."""
    if noise is None:
        return None
    try:
        return noise.to(dtype).expand(batch, 1, *out_size).contiguous()
    except RuntimeError:
        return None


@torch.library.custom_op("batikfast::modulated_conv2d", mutates_args=())
def _modulated_conv2d_op(x: torch.Tensor, weight: torch.Tensor, in_scale: torch.Tensor,
                         out_scale: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], act: str, alpha: float, gain: float,
                         clamp: float, padding: int, impl: str) -> torch.Tensor:
    return backends.kernels("modulated_conv2d", impl).modulated_conv2d_forward(
        x, weight, in_scale, out_scale, noise, bias, act, alpha, gain,
        None if clamp < 0 else clamp, padding)


@_modulated_conv2d_op.register_fake
def _(x, weight, in_scale, out_scale, noise, bias, act, alpha, gain, clamp, padding, impl):
    out_h = x.shape[2] + 2 * padding - weight.shape[2] + 1
    out_w = x.shape[3] + 2 * padding - weight.shape[3] + 1
    # A compiled graph must see the strides the kernel really produces.
    layout_rule = getattr(backends.kernels("modulated_conv2d", impl), "output_memory_format", None)
    memory_format = layout_rule(x) if layout_rule else torch.contiguous_format
    return torch.empty([x.shape[0], weight.shape[0], out_h, out_w], dtype=x.dtype, device=x.device,
                       memory_format=memory_format)


def _modulated_conv2d_setup(ctx, inputs, output):
    x, weight, in_scale, out_scale, noise, bias, *ctx.params = inputs
    ctx.save_for_backward(x, weight, in_scale, out_scale, noise, bias, output)


def _modulated_conv2d_backward(ctx, dy):
    x, weight, in_scale, out_scale, noise, bias, y = ctx.saved_tensors
    act, alpha, gain, clamp, padding, impl = ctx.params
    need = ctx.needs_input_grad
    d_pre = dy.float() * _epilogue_slope(y, act, alpha, gain, clamp)
    d_conv = d_pre if out_scale is None else d_pre * out_scale[:, :, None, None]
    d_x = d_weight = d_in_scale = d_out_scale = d_noise = d_bias = None
    if need[0] or need[2]:
        # One transposed convolution serves both: d(x * s) = conv^T(d_conv, weight).
        unit = torch.ones_like(out_scale) if out_scale is not None else \
            torch.ones(x.shape[0], weight.shape[0], device=x.device)
        d_scaled_x = _modulated_conv2d_fast_op(
            d_conv.to(x.dtype), weight.transpose(0, 1).flip([2, 3]).contiguous(), unit, None,
            None, None, "linear", 0.0, 1.0, -1.0, weight.shape[2] - 1 - padding, impl)
        if need[0]:
            d_x = d_scaled_x * in_scale.to(x.dtype)[:, :, None, None]
        if need[2]:
            d_in_scale = (d_scaled_x.float() * x.float()).sum(dim=[2, 3])
    if need[1]:
        scaled_x = x * in_scale.to(x.dtype)[:, :, None, None]
        d_weight = torch.nn.grad.conv2d_weight(scaled_x, weight.shape, d_conv.to(x.dtype),
                                               padding=padding).to(weight.dtype)
    if out_scale is not None and need[3]:
        if x.dtype == torch.float32:
            conv = _pre_activation(y, act, alpha, gain, noise, bias) / out_scale[:, :, None, None]
        else:
            # Read back off a 16-bit output, the convolution keeps only the bits that noise and
            # bias leave it: convolve again (one more convolution, 16-bit layers only).
            conv = _modulated_conv2d_fast_op(x, weight, in_scale, None, None, None, "linear",
                                             0.0, 1.0, -1.0, padding, impl).float()
        d_out_scale = (d_pre * conv).sum(dim=[2, 3])
    if noise is not None and need[4]:
        d_noise = d_pre.sum(dim=1, keepdim=True).to(noise.dtype)
    if bias is not None and need[5]:
        d_bias = d_pre.sum(dim=[0, 2, 3]).to(bias.dtype)
    return d_x, d_weight, d_in_scale, d_out_scale, d_noise, d_bias, *([None] * 6)


_modulated_conv2d_fast_op = differentiable(_modulated_conv2d_op, _modulated_conv2d_setup,
                                           _modulated_conv2d_backward)


def _epilogue_slope(y, act, alpha, gain, clamp):
    """d y / d pre-activation, read off the output (valid for linear / relu / lrelu, gain > 0)."""
    clamp_in_y_dtype = _largest_at_most(clamp, y.dtype) if clamp >= 0 else clamp
    y = y.float()
    if act == "linear":
        slope = torch.full_like(y, gain)
    elif act == "relu":
        slope = (y > 0).float() * gain
    else:
        slope = torch.where(y > 0, gain, gain * alpha)
    if clamp >= 0:
        # Strict: an output sitting exactly on the clamp was clamped (torch.clamp passes the
        # gradient only for inputs within the range, and the input is not saved).
        slope = slope * (y.abs() < clamp_in_y_dtype).float()  # < clamp: not clamped
    return slope


def _largest_at_most(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` <= value. A clamped output holds the clamp rounded to
    y's dtype either way (kernels round differently), so outputs at or above this count as
    clamped, as NVIDIA's kernels read it."""
    rounded = torch.tensor(value, dtype=dtype).item()
    if rounded > value and not math.isinf(rounded):  # past the dtype's range: inf, no finite output clamped
        step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(rounded))
        rounded = torch.tensor(rounded - step, dtype=dtype).item()
    return rounded


def _pre_activation(y, act, alpha, gain, noise, bias):
    """out_scale * conv, recovered from the output where the gradient is non-zero."""
    y = y.float()
    if act == "lrelu" and alpha > 0:
        pre = torch.where(y > 0, y / gain, y / (gain * alpha))
    else:
        pre = y / gain
    if noise is not None:
        pre = pre - noise.float()
    if bias is not None:
        pre = pre - bias.float()[None, :, None, None]
    return pre
