"""Up-sample, FIR-filter, down-sample (NVIDIA's ``upfirdn2d``) as one polyphase Triton kernel.

``upfirdn2d`` computes, for x [N, C, H, W] and a 2-D filter f [fh, fw], what this does::

    u = zeros(N, C, H * upy, W * upx); u[:, :, ::upy, ::upx] = x        # zero insertion
    p = pad u by (padx0, padx1, pady0, pady1)                            # negative crops
    y = conv2d(p, f if flip_filter else f.flip(0, 1), groups=C) * gain   # true convolution
    y = y[:, :, ::downy, ::downx]

Polyphase: of the fh x fw taps over the zero-inserted image, only those that land on one of
its non-zero samples contribute, and for output row oy these are the taps
``i = phase_y(oy) + k * upy`` (k = 0 .. ceil(fh / upy) - 1), reading input row
``row0_y(oy) + k``. Each output pixel therefore runs ceil(fh / upy) * ceil(fw / upx) taps
(a quarter of the 4x4 for up = 2) straight from x, and neither the zero-inserted nor the
padded image exists in memory.

Tiling. A program computes a [BLOCK_R, BLOCK_W] tile of output rows x columns, where rows run
over (plane, oy) flattened, so small images (4x4, 8x8) pack many planes into one tile instead
of leaving most lanes idle. Per-row and per-column quantities (plane, phases, input row and
column) are computed once per tile edge, not per pixel. Up/down factors and the filter size
are compile-time constants: the phase arithmetic folds to shifts and masks, and the tap loops
have fixed trip counts. Taps read x through L1/L2 (neighbouring outputs share their inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _filter_index(tap, F: tl.constexpr, FLIP: tl.constexpr):
    # A true convolution reads the filter back to front.
    if FLIP:
        return tap
    else:
        return F - 1 - tap


@triton.jit
def _filter_taps(f_ptr, stride_fh, stride_fw, phase_y, tap_y, tap_x, ky, kx,
                 UPX: tl.constexpr, UPY: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                 FLIP: tl.constexpr):
    """The filter values of taps (tap_y, tap_x) = (phase + k * up) for the tile: a scalar, a
    row or a column vector when an up factor is 1; 0 for taps past the filter's end.

    With both factors > 1 the value varies along rows and columns. Rather than gathering a
    filter value per pixel (a load as costly as the pixel's own), one row of taps is gathered
    per row phase (per column, cheap) and each pixel selects its row phase: UPY selects."""
    if UPY == 1 and UPX == 1:
        w = tl.load(f_ptr + _filter_index(ky, FH, FLIP) * stride_fh
                    + _filter_index(kx, FW, FLIP) * stride_fw)
    elif UPY == 1:
        w = tl.load(f_ptr + _filter_index(ky, FH, FLIP) * stride_fh
                    + _filter_index(tap_x, FW, FLIP) * stride_fw,
                    mask=tap_x < FW, other=0.0)[None, :]
    elif UPX == 1:
        w = tl.load(f_ptr + _filter_index(tap_y, FH, FLIP) * stride_fh
                    + _filter_index(kx, FW, FLIP) * stride_fw,
                    mask=tap_y < FH, other=0.0)[:, None]
    else:
        w = tl.zeros((phase_y.shape[0], tap_x.shape[0]), dtype=tl.float32)
        for py in tl.static_range(UPY):
            row_tap = py + ky * UPY
            taps = tl.load(f_ptr + _filter_index(row_tap, FH, FLIP) * stride_fh
                           + _filter_index(tap_x, FW, FLIP) * stride_fw,
                           mask=(tap_x < FW) & (row_tap < FH), other=0.0)
            w = tl.where((phase_y == py)[:, None], taps.to(tl.float32)[None, :], w)
    return w.to(tl.float32)


@triton.jit
def _upfirdn2d_kernel(x_ptr, f_ptr, y_ptr,
                      channels, in_h, in_w, out_h, out_w, rows,
                      stride_xn, stride_xc, stride_xh, stride_xw, stride_fh, stride_fw,
                      lead_x, lead_y, skip_x, skip_y, gain,
                      UPX: tl.constexpr, UPY: tl.constexpr, DOWNX: tl.constexpr,
                      DOWNY: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                      FLIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """y[plane, oy, ox] = gain * sum_{i, j} fk[i, j] * u[oy * DOWNY + i - pady0,
    ox * DOWNX + j - padx0], u the zero-inserted x, fk the filter (flipped unless FLIP); y is
    [N * C * out_h, out_w].

    lead = skip * up - pad0 >= 0 (skip = ceil(max(pad0, 0) / up)) keeps every dividend of the
    phase arithmetic non-negative, so C-style and floor division agree."""
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(out_w, BLOCK_W)
    pid_r = pid // col_blocks
    pid_w = pid - pid_r * col_blocks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    ox = (pid_w * BLOCK_W).to(tl.int32) + tl.arange(0, BLOCK_W)
    row_ok = r < rows
    col_ok = ox < out_w
    plane = r // out_h
    oy = (r - plane * out_h).to(tl.int32)
    sample = plane // channels
    x_rows = x_ptr + sample * stride_xn + (plane - sample * channels) * stride_xc

    # Polyphase: the first tap that meets a non-zero sample of the zero-inserted image, and the
    # input row / column it reads; tap k then reads the next input row / column.
    by = oy * DOWNY + lead_y
    phase_y = (UPY - by % UPY) % UPY
    in_y0 = (by + phase_y) // UPY - skip_y
    bx = ox * DOWNX + lead_x
    phase_x = (UPX - bx % UPX) % UPX
    in_x0 = (bx + phase_x) // UPX - skip_x

    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for ky in range((FH + UPY - 1) // UPY):
        tap_y = phase_y + ky * UPY
        iy = in_y0 + ky
        ok_y = row_ok & (iy >= 0) & (iy < in_h)
        if UPY > 1:
            ok_y = ok_y & (tap_y < FH)
        x_row = x_rows + iy.to(tl.int64) * stride_xh
        for kx in tl.static_range((FW + UPX - 1) // UPX):
            tap_x = phase_x + kx * UPX
            ix = in_x0 + kx
            ok_x = col_ok & (ix >= 0) & (ix < in_w)
            if UPX > 1:
                ok_x = ok_x & (tap_x < FW)
            w = _filter_taps(f_ptr, stride_fh, stride_fw, phase_y, tap_y, tap_x, ky, kx,
                             UPX, UPY, FH, FW, FLIP)
            v = tl.load(x_row[:, None] + ix[None, :].to(tl.int64) * stride_xw,
                        mask=ok_y[:, None] & ok_x[None, :], other=0.0)
            acc += v.to(tl.float32) * w
    out = (acc * gain).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + r[:, None] * out_w + ox[None, :], out,
             mask=row_ok[:, None] & col_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _check_device(name: str, t: torch.Tensor, like: torch.Tensor | None) -> None:
    if t.device.type == "cpu":
        if not _interpreting():
            raise RuntimeError(f"upfirdn2d (Triton) got {name} on the CPU: it needs CUDA tensors, "
                               "or TRITON_INTERPRET=1 set before triton is imported (slow, for "
                               "tests)")
    elif t.device.type != "cuda":
        raise RuntimeError(f"upfirdn2d (Triton) needs CUDA tensors, got {name} on {t.device}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like x, got {t.device}")


def _check_args(x, f, factors, pads) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', x)!r:.80}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_device("x", x, None)
    if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.numel() == 0:
        raise ValueError(f"f must be a non-empty 2-D filter [fh, fw], got "
                         f"{getattr(f, 'shape', f)!r:.80}")
    if not f.is_floating_point():
        raise TypeError(f"f must be a floating-point tensor (float32), got {f.dtype}")
    _check_device("f", f, x)
    for name, value in factors.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in pads.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")


def _block_shape(out_w: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_W, num_warps) for a row length of out_w outputs."""
    if _interpreting():
        # Tiny tiles so the small test images span several tiles in both directions.
        block_w = min(triton.next_power_of_2(out_w), 8)
        return 32 // block_w, block_w, 1
    # 1024 outputs per program (8 per thread with 4 warps); rows up to 64 wide keep a warp's
    # loads on one or two 128-byte lines, narrower images stack more rows (and planes).
    block_w = min(triton.next_power_of_2(out_w), 64)
    return 1024 // block_w, block_w, 4


def upfirdn2d(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    """Zero-insert by (upx, upy), pad (negative crops), convolve with f, scale, subsample.

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16, any strides.
        f: [fh, fw] floating filter (float32 from setup_filter), any strides.
        upx, upy, downx, downy: ints >= 1.
        padx0, padx1, pady0, pady1: ints, applied after zero insertion; negative values crop.
        flip_filter: correlate (filter as given) instead of convolve (filter flipped).
        gain: scalar multiplier of the output.

    Returns:
        y [N, C, (H * upy + pady0 + pady1 - fh) // downy + 1, (W * upx + padx0 + padx1 - fw)
        // downx + 1], contiguous, in x's dtype; accumulation in fp32.
    """
    _check_args(x, f, dict(upx=upx, upy=upy, downx=downx, downy=downy),
                dict(padx0=padx0, padx1=padx1, pady0=pady0, pady1=pady1))
    batch, channels, in_h, in_w = x.shape
    fh, fw = f.shape
    out_h = (in_h * upy + pady0 + pady1 - fh + downy) // downy
    out_w = (in_w * upx + padx0 + padx1 - fw + downx) // downx
    if out_h < 1 or out_w < 1:
        raise ValueError(f"padding {[padx0, padx1, pady0, pady1]} with a {fw}x{fh} filter leaves "
                         f"no output pixel for a {in_w}x{in_h} image up-sampled by "
                         f"{[upx, upy]}")
    y = torch.empty((batch, channels, out_h, out_w), dtype=x.dtype, device=x.device)
    rows = batch * channels * out_h
    if rows == 0:
        return y
    skip_x = (max(padx0, 0) + upx - 1) // upx
    skip_y = (max(pady0, 0) + upy - 1) // upy
    block_r, block_w, num_warps = _block_shape(out_w)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(out_w, block_w),)
    _upfirdn2d_kernel[grid](
        x, f, y, channels, in_h, in_w, out_h, out_w, rows,
        *x.stride(), *f.stride(),
        skip_x * upx - padx0, skip_y * upy - pady0, skip_x, skip_y, float(gain),
        UPX=upx, UPY=upy, DOWNX=downx, DOWNY=downy, FH=fh, FW=fw, FLIP=bool(flip_filter),
        BLOCK_R=block_r, BLOCK_W=block_w, num_warps=num_warps)
    return y
