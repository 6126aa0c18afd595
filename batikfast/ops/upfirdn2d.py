"""Up-sample, FIR-filter, down-sample a batch of 2-D images (NCHW).

``upfirdn2d`` inserts ``up - 1`` zeros after every sample, pads (negative padding crops),
convolves each channel with the filter ``f`` (a true convolution unless ``flip_filter``) and
keeps every ``down``-th sample, per axis. Output size per axis:
``(in * up + pad0 + pad1 - taps + down) // down``. The helpers ``setup_filter``, ``filter2d``,
``upsample2d`` and ``downsample2d`` mean what they mean in NVIDIA's ``torch_utils.ops``.

The fast implementations run as the custom op ``batikfast::upfirdn2d`` on a 2-D filter;
a separable (1-D) filter runs as two passes. Its backward is again an upfirdn2d (up and down
swapped, the filter flipped), so gradients of every order exist on every backend. A filter
that requires grad (filters are constants in StyleGAN) gets its gradient from one plain
convolution of the padded input with the output's gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batikfast import backends
from batikfast.ops._autograd import differentiable
from batikfast.ops._validate import (check_same_device, check_tensor, parse_padding,
                                     parse_scaling)


def setup_filter(f, device=torch.device("cpu"), normalize=True, flip_filter=False, gain=1,
                 separable=None) -> torch.Tensor:
    """Turn a list / array / tensor of taps into a float32 filter tensor for upfirdn2d.

    A 1-D filter stays 1-D (separable) when ``separable`` is None and it has at most 8 taps,
    or when ``separable`` is True; otherwise it becomes the 2-D outer product. ``normalize``
    makes the taps sum to 1 and ``gain`` scales them by ``gain ** (ndim / 2)`` (a finite number;
    negative only for 2-D filters).
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim not in (0, 1, 2):
        raise ValueError(f"f must have rank 0, 1 or 2, got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError("f must have at least one tap")
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = f.ger(f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f"separable={separable} does not fit a filter of shape {tuple(f.shape)}")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    _check_gain(gain)
    if f.ndim == 1 and gain < 0:
        # Its taps get gain ** 0.5 (complex) and run twice, once per axis: no 1-D filter holds
        # the sign. upfirdn2d(..., gain=) can.
        raise ValueError(f"a separable filter cannot carry a negative gain ({gain}): pass "
                         "gain to upfirdn2d instead")
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up=1, down=1, padding=0,
              flip_filter: bool = False, gain: float = 1, impl: str | None = None) -> torch.Tensor:
    """Pad, up-sample, filter and down-sample ``x`` [N, C, H, W].

    Args:
        x: float tensor [N, C, H, W].
        f: float32 filter [fh, fw] (2-D) or [taps] (separable), or None for identity.
        up: int or [x, y] up-sampling factors (>= 1).
        down: int or [x, y] down-sampling factors (>= 1).
        padding: int, [x, y] or [x0, x1, y0, y1], applied after up-sampling; negative crops.
        flip_filter: correlate instead of convolve.
        gain: overall scale; the filter is multiplied by ``gain ** (f.ndim / 2)``.
        impl: ``"ref"``, ``"triton"``, ``"cuda"`` or None for automatic choice.

    Returns:
        [N, C, out_h, out_w] in ``x.dtype``.
    """
    check_tensor("x", x, ndim=4)
    f = _checked_filter(f, x)
    upx, upy = parse_scaling("up", up)
    downx, downy = parse_scaling("down", down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    _check_output_size(x, f, upx, upy, padx0, padx1, pady0, pady1)
    _check_gain(gain)
    chosen = backends.resolve("upfirdn2d", x, impl)
    if chosen == "ref" or 0 in x.shape[2:]:
        # An image without pixels leaves the kernels nothing to do (its padding may still give
        # a zero output), and they refuse the empty first pass and gradient it would need.
        return upfirdn2d_reference(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1,
                                   flip_filter, float(gain))
    flip_filter = bool(flip_filter)  # the custom op takes a bool; the reference any truth value
    if f.ndim == 2:
        return _upfirdn2d_fast(x, f, upx, upy, downx, downy, padx0, padx1,
                                             pady0, pady1, flip_filter, float(gain), chosen)
    # Each pass scales by sqrt(|gain|), the first with gain's sign (a negative gain ** 0.5 is
    # complex).
    root_gain = abs(float(gain)) ** 0.5
    x = _upfirdn2d_fast(x, f[None, :], upx, 1, downx, 1, padx0, padx1, 0, 0,
                                      flip_filter, math.copysign(root_gain, float(gain)), chosen)
    return _upfirdn2d_fast(x, f[:, None], 1, upy, 1, downy, 0, 0, pady0, pady1,
                                         flip_filter, root_gain, chosen)


def _checked_filter(f, x: torch.Tensor) -> torch.Tensor:
    check_tensor("x", x, ndim=4)  # the helpers look at f before upfirdn2d checks x
    if f is None:
        return torch.ones([1, 1], dtype=torch.float32, device=x.device)
    check_tensor("f", f, ndim=(1, 2))
    if f.dtype != torch.float32:
        raise TypeError(f"f must be float32 (see setup_filter), got {f.dtype}")
    if f.numel() == 0:
        raise ValueError(f"f must have at least one tap, got shape {tuple(f.shape)}")
    check_same_device(x=x, f=f)
    return f


def _filter_size(f: torch.Tensor) -> tuple[int, int]:
    """(width, height) in taps."""
    return (f.shape[-1], f.shape[0]) if f.ndim == 2 else (f.shape[0], f.shape[0])


def _check_output_size(x, f, upx, upy, padx0, padx1, pady0, pady1) -> None:
    fw, fh = _filter_size(f)
    width = x.shape[3] * upx + padx0 + padx1
    height = x.shape[2] * upy + pady0 + pady1
    if width < fw or height < fh:
        raise ValueError(
            f"padding {[padx0, padx1, pady0, pady1]} leaves a {width}x{height} image after "
            f"up-sampling, smaller than the {fw}x{fh} filter: the output would be empty")


def upfirdn2d_reference(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1,
                        flip_filter, gain):
    """Plain PyTorch: zero insertion, pad/crop, depthwise conv2d, strided slicing."""
    batch, channels, height, width = x.shape
    if channels == 0:  # conv2d refuses groups=0; an empty x gives an empty output
        fw, fh = _filter_size(f)
        return x.reshape(batch, 0, (height * upy + pady0 + pady1 - fh + downy) // downy,
                         (width * upx + padx0 + padx1 - fw + downx) // downx)
    x = _upsampled_and_padded(x, upx, upy, padx0, padx1, pady0, pady1)
    # |gain| on the filter and the sign on the output: a separable filter scaled by
    # gain ** 0.5 would turn complex (its real part ~0) for a negative gain.
    f = (f.to(torch.promote_types(x.dtype, torch.float32)) * abs(gain) ** (f.ndim / 2)).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].expand(channels, 1, *f.shape), groups=channels)
    else:
        x = F.conv2d(x, f[None, None, None, :].expand(channels, 1, 1, -1), groups=channels)
        x = F.conv2d(x, f[None, None, :, None].expand(channels, 1, -1, 1), groups=channels)
    x = x[:, :, ::downy, ::downx]
    return -x if gain < 0 else x


def _upsampled_and_padded(x, upx, upy, padx0, padx1, pady0, pady1):
    """``x`` with ``up - 1`` zeros after every sample, then padded (negative: cropped)."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, channels, height, 1, width, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(batch, channels, height * upy, width * upx)
    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    return x[:, :, max(-pady0, 0): x.shape[2] - max(-pady1, 0),
             max(-padx0, 0): x.shape[3] - max(-padx1, 0)]


def _filter_gradient(x, f, dy, upx, upy, downx, downy, padx0, padx1, pady0, pady1,
                     flip_filter, gain):
    """d loss / d f for a 2-D f: every output is sum_ij padded_x[oy*down + i, ox*down + j] *
    taps[i, j] (taps = f flipped unless flip_filter), so the taps' gradient correlates the
    padded input with the output's gradient spread back onto the full grid (zeros between
    kept samples), summed over images and channels: one convolution, in float32 at least."""
    compute_dtype = torch.promote_types(torch.promote_types(x.dtype, dy.dtype), torch.float32)
    padded = _upsampled_and_padded(x.to(compute_dtype), upx, upy, padx0, padx1, pady0, pady1)
    fh, fw = f.shape
    full_h, full_w = padded.shape[2] - fh + 1, padded.shape[3] - fw + 1
    spread = _upsampled_and_padded(dy.to(compute_dtype), downx, downy, 0, 0, 0, 0)
    spread = F.pad(spread, [0, full_w - spread.shape[3], 0, full_h - spread.shape[2]])
    planes = x.shape[0] * x.shape[1]
    taps_grad = F.conv2d(padded.reshape(1, planes, *padded.shape[2:]),
                         spread.reshape(1, planes, full_h, full_w)).reshape(fh, fw)
    df = taps_grad if flip_filter else taps_grad.flip([0, 1])
    return (df * gain).to(f.dtype)


def _check_gain(gain) -> None:
    # inf scales the zero padding into NaN in one path and not in the other.
    try:
        finite = not isinstance(gain, bool) and math.isfinite(float(gain))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"gain must be a finite number, got {gain!r}")


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl=None):
    """Filter ``x`` with ``f``, padded so the output keeps the input size (plus ``padding``)."""
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = _filter_size(_checked_filter(f, x))
    pad = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Up-sample by ``up`` with filter ``f``; output is ``in * up`` (plus ``padding``)."""
    upx, upy = parse_scaling("up", up)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = _filter_size(_checked_filter(f, x))
    _check_gain(gain)  # before it is multiplied: None * 4 was a TypeError, 'a' became 'aaaa'
    pad = [padx0 + (fw + upx - 1) // 2, padx1 + (fw - upx) // 2,
           pady0 + (fh + upy - 1) // 2, pady1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=pad, flip_filter=flip_filter,
                     gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Down-sample by ``down`` with filter ``f``; output is ``in // down`` (plus ``padding``)."""
    downx, downy = parse_scaling("down", down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = _filter_size(_checked_filter(f, x))
    pad = [padx0 + (fw - downx + 1) // 2, padx1 + (fw - downx) // 2,
           pady0 + (fh - downy + 1) // 2, pady1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=pad, flip_filter=flip_filter,
                     gain=gain, impl=impl)


@torch.library.custom_op("batikfast::upfirdn2d", mutates_args=())
def _upfirdn2d_op(x: torch.Tensor, f: torch.Tensor, upx: int, upy: int, downx: int, downy: int,
                  padx0: int, padx1: int, pady0: int, pady1: int, flip_filter: bool, gain: float,
                  impl: str) -> torch.Tensor:
    return backends.kernels("upfirdn2d", impl).upfirdn2d(
        x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)


@_upfirdn2d_op.register_fake
def _(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, impl):
    fh, fw = f.shape
    out_h = (x.shape[2] * upy + pady0 + pady1 - fh + downy) // downy
    out_w = (x.shape[3] * upx + padx0 + padx1 - fw + downx) // downx
    return x.new_empty([x.shape[0], x.shape[1], out_h, out_w])


def _upfirdn2d_setup(ctx, inputs, output):
    x, f, *ctx.params = inputs
    ctx.in_size = x.shape[2:]
    ctx.out_size = output.shape[2:]
    # x only for the filter's gradient (a reference kept, no copy).
    ctx.save_for_backward(f, x if f.requires_grad else None)


def _upfirdn2d_backward(ctx, dy):
    f, x = ctx.saved_tensors
    upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, impl = ctx.params
    in_h, in_w = ctx.in_size
    out_h, out_w = ctx.out_size
    fh, fw = f.shape
    dx = df = None
    if ctx.needs_input_grad[0]:
        # The adjoint of (zero-insert, pad, filter, subsample) is (zero-insert by down, pad,
        # correlate, subsample by up), with the padding that lines the grids up again.
        grad_padding = (fw - padx0 - 1, in_w * upx - out_w * downx + padx0 - upx + 1,
                        fh - pady0 - 1, in_h * upy - out_h * downy + pady0 - upy + 1)
        dx = _upfirdn2d_fast(dy, f, downx, downy, upx, upy, *grad_padding,
                             not flip_filter, gain, impl)
    if ctx.needs_input_grad[1]:
        df = _filter_gradient(x, f, dy, upx, upy, downx, downy, padx0, padx1, pady0, pady1,
                              flip_filter, gain)
    return dx, df, None, None, None, None, None, None, None, None, None, None, None


_upfirdn2d_fast = differentiable(_upfirdn2d_op, _upfirdn2d_setup, _upfirdn2d_backward)
