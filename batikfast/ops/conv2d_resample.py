"""2-D convolution with optional FIR up-/down-sampling, as NVIDIA's ``conv2d_resample``.

Defined as: ``upfirdn2d(x, f, up, padding, gain=up**2)``, then ``conv2d(w)``, then
``upfirdn2d(f, down)``, with ``padding`` widened by the filter's own support. The cheaper
equivalent orderings below (transposed convolution for up-sampling, strided convolution for
down-sampling, filtering on the side with fewer channels for 1x1 kernels) give the same result.
The convolutions run in cuDNN (they are differentiable to every order); the resampling runs in
:func:`batikfast.ops.upfirdn2d`, so ``impl`` chooses its implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from batikfast import backends
from batikfast.ops._validate import check_same_device, check_tensor, parse_padding
from batikfast.ops.upfirdn2d import _checked_filter, _filter_size, upfirdn2d


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    down: int = 1, padding=0, groups: int = 1, flip_weight: bool = True,
                    flip_filter: bool = False, impl: str | None = None) -> torch.Tensor:
    """Convolve ``x`` [N, C, H, W] with ``w`` [O, C // groups, kh, kw], resampling by ``f``.

    Args:
        f: float32 low-pass filter (1-D separable or 2-D), or None for no filtering.
        up, down: integer factors >= 1 (the same on both axes).
        padding: int, [x, y] or [x0, x1, y0, y1] padding of the convolution.
        groups: convolution groups.
        flip_weight: True for cross-correlation (torch.conv2d), False for true convolution.
        flip_filter: correlate with ``f`` instead of convolving.
        impl: implementation of the resampling (see :mod:`batikfast.backends`).
    """
    check_tensor("x", x, ndim=4)
    check_tensor("w", w, ndim=4)
    check_same_device(x=x, w=w)
    if w.numel() == 0:  # torch's convolutions fail on it deep inside (oneDNN, cuDNN)
        raise ValueError(f"w must not be empty, got shape {list(w.shape)}")
    for name, factor in (("up", up), ("down", down), ("groups", groups)):
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"{name} must be an int >= 1, got {factor!r}")
    if x.shape[1] != w.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but w expects "
                         f"{w.shape[1]} x groups {groups} = {w.shape[1] * groups}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"w's {w.shape[0]} output channels do not divide into {groups} groups")
    f = _checked_filter(f, x)
    kh, kw = w.shape[2:]
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    # Widen the padding so the filter's support is covered around the resampled grid.
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pads = [px0, px1, py0, py1]
    _check_output_size(x, (kw, kh), (fw, fh), up, down, pads)
    # Resolved on every path: impl='bogus', or one that cannot run x, was refused only where a
    # resampling pass ran, and taken silently by the plain convolution.
    impl = backends.resolve("conv2d_resample", x, impl)
    conv = dict(groups=groups, flip_weight=flip_weight)

    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=pads, flip_filter=flip_filter, impl=impl)
        return _conv2d(x, w, **conv)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv2d(x, w, **conv)
        return upfirdn2d(x, f, up=up, padding=pads, gain=up ** 2, flip_filter=flip_filter,
                         impl=impl)
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=pads, flip_filter=flip_filter, impl=impl)
        return _conv2d(x, w, stride=down, **conv)
    if up > 1:
        return _transposed_upsampling(x, w, f, up, down, pads, groups, flip_weight, flip_filter,
                                      impl)
    # No resampling: f plays no part. Uneven or cropping padding is a pad / crop (upfirdn2d
    # with the identity filter) before the convolution.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv2d(x, w, padding=[py0, px0], **conv)
    return _conv2d(upfirdn2d(x, None, padding=pads, impl=impl), w, **conv)


def _check_output_size(x, kernel_size, filter_size, up, down, pads) -> None:
    """Refuse, per the definition, a convolution that would leave no output pixel (torch's
    message on some paths, an error from the filter pass or a kernel on others)."""
    height, width = x.shape[2:]
    px0, px1, py0, py1 = pads
    for axis, size, pad, kernel, taps in (("width", width, px0 + px1, kernel_size[0],
                                           filter_size[0]),
                                          ("height", height, py0 + py1, kernel_size[1],
                                           filter_size[1])):
        seen_by_conv = size * up + pad - (taps - 1 if up > 1 else 0)
        left = seen_by_conv - kernel + 1 - (taps - 1 if down > 1 else 0)
        if left < 1:
            widened = f" (widened for the {taps}-tap filter)" if up > 1 or down > 1 else ""
            raise ValueError(f"the {axis} of x ({size}) with padding {list(pads)}{widened}, "
                             f"up={up}, down={down} leaves no output pixel for a "
                             f"{kernel_size[0]}x{kernel_size[1]} kernel")


def _transposed_upsampling(x, w, f, up, down, pads, groups, flip_weight, flip_filter, impl):
    """A stride-``up`` transposed convolution, then the FIR filter on the output."""
    out_channels, in_per_group, kh, kw = w.shape
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw)
        w = w.transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, kh, kw)
    px0, px1, py0, py1 = pads
    px0, px1 = px0 - (kw - 1), px1 - (kw - up)
    py0, py1 = py0 - (kh - 1), py1 - (kh - up)
    # Let the transposed convolution crop what it can; the filter pass handles the rest.
    crop_x = max(min(-px0, -px1), 0)
    crop_y = max(min(-py0, -py1), 0)
    x = _conv2d(x, w, stride=up, padding=[crop_y, crop_x], groups=groups,
                flip_weight=not flip_weight, transpose=True)
    x = upfirdn2d(x, f, padding=[px0 + crop_x, px1 + crop_x, py0 + crop_y, py1 + crop_y],
                  gain=up ** 2, flip_filter=flip_filter, impl=impl)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl=impl)
    return x


def _conv2d(x, w, stride=1, padding=0, groups=1, flip_weight=True, transpose=False):
    kh, kw = w.shape[2:]
    if not flip_weight and (kw > 1 or kh > 1):
        w = w.flip([2, 3])
    w = w.to(x.dtype)
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
