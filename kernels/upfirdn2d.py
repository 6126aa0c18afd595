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

Tiling. A program computes a [PLANES * PLANE_ROWS, BLOCK_W] tile: PLANE_ROWS output rows of
each of PLANES planes (an (n, c) pair) by BLOCK_W columns. Large images take one plane per
tile; small ones (4x4, 8x8) stack many planes so lanes do not idle. The plane and row of each
tile row come from compile-time powers of two (shifts, no per-row integer division), and the
planes are addressed through one plane stride. Up/down factors and the filter size are
compile-time constants: the phase arithmetic folds to shifts and masks, and the tap loops have
fixed trip counts. Taps read x through L1/L2 (neighbouring outputs share their inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_device, grid_x, interpreter_tiles, launch_device

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _filter_index(tap, F: tl.constexpr, FLIP: tl.constexpr):
    # A true convolution reads the filter back to front.
    if FLIP:
        return tap
    else:
        return F - 1 - tap


@triton.jit
def _tap(f_ptr, stride_fh, stride_fw, i, j, FH: tl.constexpr, FW: tl.constexpr,
         FLIP: tl.constexpr):
    """Filter tap (i, j) of the convolution as a scalar, 0 past the filter's end."""
    return tl.load(f_ptr + _filter_index(i, FH, FLIP) * stride_fh
                   + _filter_index(j, FW, FLIP) * stride_fw,
                   mask=(i < FH) & (j < FW), other=0.0).to(tl.float32)


@triton.jit
def _filter_taps(f_ptr, stride_fh, stride_fw, phase_y, phase_x, ky, kx,
                 UPX: tl.constexpr, UPY: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                 FLIP: tl.constexpr):
    """The filter values of taps (phase_y + ky * UPY, phase_x + kx * UPX) for the tile: a
    scalar, a [1, BLOCK_W] row, a [rows, 1] column or a full tile, as the up factors require.

    Each phase's tap is one scalar (uniform) load, and rows / columns / pixels select their
    phase: selects are cheaper than a gathered load per row or pixel, and a pixel needs at most
    UPY of them (UPX more per column)."""
    if UPX == 1:
        row_w = _tap(f_ptr, stride_fh, stride_fw, ky * UPY, kx, FH, FW, FLIP)
    else:
        row_w = tl.zeros(phase_x.shape, dtype=tl.float32)
        for px in tl.static_range(UPX):
            row_w = tl.where(phase_x == px, _tap(f_ptr, stride_fh, stride_fw, ky * UPY,
                                                 px + kx * UPX, FH, FW, FLIP), row_w)
    if UPY == 1:
        w = row_w
    else:
        w = tl.zeros(phase_y.shape, dtype=tl.float32) + row_w
        for py in tl.static_range(1, UPY):
            if UPX == 1:
                row_w = _tap(f_ptr, stride_fh, stride_fw, py + ky * UPY, kx, FH, FW, FLIP)
            else:
                row_w = tl.zeros(phase_x.shape, dtype=tl.float32)
                for px in tl.static_range(UPX):
                    row_w = tl.where(phase_x == px, _tap(f_ptr, stride_fh, stride_fw,
                                                         py + ky * UPY, px + kx * UPX, FH, FW,
                                                         FLIP), row_w)
            w = tl.where(phase_y == py, row_w, w)
    return w


@triton.jit
def _upfirdn2d_kernel(x_ptr, f_ptr, y_ptr,
                      planes, in_h, in_w, out_h, out_w,
                      stride_xp, stride_xh, stride_xw, stride_fh, stride_fw,
                      lead_x, lead_y, skip_x, skip_y, gain,
                      UPX: tl.constexpr, UPY: tl.constexpr, DOWNX: tl.constexpr,
                      DOWNY: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                      FLIP: tl.constexpr, PLANES: tl.constexpr, PLANE_ROWS: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    """y[p, oy, ox] = gain * sum_{i, j} fk[i, j] * u[p, oy * DOWNY + i - pady0,
    ox * DOWNX + j - padx0], u the zero-inserted x, fk the filter (flipped unless FLIP); y is
    [planes, out_h, out_w] contiguous, plane p of x starts at p * stride_xp.

    lead = skip * up - pad0 >= 0 (skip = ceil(max(pad0, 0) / up)) keeps every dividend of the
    phase arithmetic non-negative, so C-style and floor division agree. Per-row values are
    [rows, 1] and per-column values [1, BLOCK_W] tensors from the start, so they share the
    tile's layout instead of being converted to it."""
    TILE: tl.constexpr = PLANES * PLANE_ROWS * BLOCK_W
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(out_w, BLOCK_W)
    row_blocks = tl.cdiv(out_h, PLANE_ROWS)
    pid_w = pid % col_blocks
    pid_rp = pid // col_blocks
    pid_r = pid_rp % row_blocks
    pid_p = pid_rp // row_blocks
    local = tl.arange(0, PLANES * PLANE_ROWS)[:, None]
    plane = pid_p * PLANES + local // PLANE_ROWS
    oy = (pid_r * PLANE_ROWS).to(tl.int32) + local % PLANE_ROWS
    ox = (pid_w * BLOCK_W).to(tl.int32) + tl.arange(0, BLOCK_W)[None, :]
    row_ok = (plane < planes) & (oy < out_h)
    col_ok = ox < out_w
    x_planes = x_ptr + plane * stride_xp

    # Polyphase: the first tap that meets a non-zero sample of the zero-inserted image, and the
    # input row / column it reads; tap k then reads the next input row / column.
    by = oy * DOWNY + lead_y
    phase_y = (UPY - by % UPY) % UPY
    in_y0 = (by + phase_y) // UPY - skip_y
    bx = ox * DOWNX + lead_x
    phase_x = (UPX - bx % UPX) % UPX
    in_x0 = (bx + phase_x) // UPX - skip_x

    acc = tl.zeros((PLANES * PLANE_ROWS, BLOCK_W), dtype=tl.float32)
    for ky in range((FH + UPY - 1) // UPY):
        tap_y = phase_y + ky * UPY
        iy = in_y0 + ky
        ok_y = row_ok & (iy >= 0) & (iy < in_h)
        if UPY > 1:
            ok_y = ok_y & (tap_y < FH)
        x_row = x_planes + iy.to(tl.int64) * stride_xh
        for kx in tl.static_range((FW + UPX - 1) // UPX):
            tap_x = phase_x + kx * UPX
            ix = in_x0 + kx
            ok_x = col_ok & (ix >= 0) & (ix < in_w)
            if UPX > 1:
                ok_x = ok_x & (tap_x < FW)
            w = _filter_taps(f_ptr, stride_fh, stride_fw, phase_y, phase_x, ky, kx,
                             UPX, UPY, FH, FW, FLIP)
            # Loads and the store go through the flat tile: Triton then lays the tile out
            # with consecutive threads on consecutive columns (coalesced scalar tap loads) on
            # both Triton 3.6 and 3.8; on the 2-D tile 3.6 breaks the tie between two
            # non-contiguous axes by putting threads down the rows (16 rows per warp access).
            v = tl.reshape(tl.load(tl.reshape(x_row + ix.to(tl.int64) * stride_xw, (TILE,)),
                                   mask=tl.reshape(ok_y & ok_x, (TILE,)), other=0.0),
                           (PLANES * PLANE_ROWS, BLOCK_W))
            acc += v.to(tl.float32) * w
    out = (acc * gain).to(y_ptr.dtype.element_ty)
    # Declared non-contiguous: a vectorised store would give each thread 8 neighbouring
    # columns, and each scalar tap load of a warp would then span 4 rows x 128 bytes.
    out_offsets = tl.max_contiguous(tl.reshape((plane * out_h + oy) * out_w + ox, (TILE,)), 1)
    tl.store(y_ptr + out_offsets, tl.reshape(out, (TILE,)),
             mask=tl.reshape(row_ok & col_ok, (TILE,)))


def _check_args(x, f, factors, pads) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', x)!r:.80}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check_device("upfirdn2d", "x", x)
    if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.numel() == 0:
        raise ValueError(f"f must be a non-empty 2-D filter [fh, fw], got "
                         f"{getattr(f, 'shape', f)!r:.80}")
    if not f.is_floating_point():
        raise TypeError(f"f must be a floating-point tensor (float32), got {f.dtype}")
    check_device("upfirdn2d", "f", f, x)
    for name, value in factors.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in pads.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")


# The kernel's phase arithmetic runs on int32 coordinates of the zero-inserted, padded image
# (int64 division and remainder per element would cost more than the taps); its offsets are int64.
_MAX_COORDINATE = 2 ** 31 - 1


def _check_coordinates(axis: str, size: int, up: int, pad0: int, pad1: int, taps: int) -> None:
    """Raise unless every coordinate the kernel computes along ``axis`` fits int32: up to
    size * up + pad0 + pad1 (the padded image) plus two phases of slack."""
    extent = size * up + abs(pad0) + abs(pad1) + taps + 2 * up
    if extent > _MAX_COORDINATE:
        raise ValueError(f"upfirdn2d: {axis} = {size} up-sampled by {up} and padded by "
                         f"[{pad0}, {pad1}] spans {extent} coordinates, more than the kernel's "
                         f"32-bit {_MAX_COORDINATE}")


def launch_grid(planes: int, out_h: int, out_w: int, tile: tuple[int, int, int, int]) -> tuple[int]:
    """One program per [PLANES * PLANE_ROWS, BLOCK_W] tile (``tile`` as ``_tile`` gives it),
    all on grid axis x."""
    tile_planes, plane_rows, block_w, _ = tile
    programs = (triton.cdiv(planes, tile_planes) * triton.cdiv(out_h, plane_rows)
                * triton.cdiv(out_w, block_w))
    return grid_x("upfirdn2d", programs, f"{planes} planes of {out_h}x{out_w} outputs")


def _tile(out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(PLANES, PLANE_ROWS, BLOCK_W, num_warps) for out_h x out_w output planes."""
    if interpreter_tiles():
        # About a quarter of a plane per tile: test images wider than 4 and taller than 1 span
        # several tiles both ways, small ones stack planes, and no tile is smaller than needed
        # (interpreted, every program costs about the same Python work, whatever its size).
        block_w = min(max(triton.next_power_of_2(out_w) // 2, 4), 32)
        rows = 256 // block_w
        plane_rows = min(max(triton.next_power_of_2(out_h) // 2, 1), rows)
        return rows // plane_rows, plane_rows, block_w, 1
    # 1024 outputs per program (8 per thread with 4 warps); rows up to 64 wide keep a warp's
    # loads on one or two 128-byte lines.
    block_w, rows, num_warps = min(triton.next_power_of_2(out_w), 64), 1024, 4
    rows //= block_w
    plane_rows = min(triton.next_power_of_2(out_h), rows)
    return rows // plane_rows, plane_rows, block_w, num_warps


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
    _check_coordinates("H", in_h, upy, pady0, pady1, fh)
    _check_coordinates("W", in_w, upx, padx0, padx1, fw)
    y = torch.empty((batch, channels, out_h, out_w), dtype=x.dtype, device=x.device)
    planes = batch * channels
    if planes == 0:
        return y
    # One stride walks all (n, c) planes when the batch stride is channels times the channel
    # stride (any NCHW-contiguous or H/W-sliced x); otherwise copy.
    if channels > 1 and batch > 1 and x.stride(0) != channels * x.stride(1):
        x = x.contiguous()
    plane_stride = x.stride(1) if channels > 1 else x.stride(0)
    skip_x = (max(padx0, 0) + upx - 1) // upx
    skip_y = (max(pady0, 0) + upy - 1) // upy
    tile = _tile(out_h, out_w)
    tile_planes, plane_rows, block_w, num_warps = tile
    with launch_device(x):
        _upfirdn2d_kernel[launch_grid(planes, out_h, out_w, tile)](
            x, f, y, planes, in_h, in_w, out_h, out_w,
            plane_stride, x.stride(2), x.stride(3), *f.stride(),
            skip_x * upx - padx0, skip_y * upy - pady0, skip_x, skip_y, float(gain),
            UPX=upx, UPY=upy, DOWNX=downx, DOWNY=downy, FH=fh, FW=fw, FLIP=bool(flip_filter),
            PLANES=tile_planes, PLANE_ROWS=plane_rows, BLOCK_W=block_w, num_warps=num_warps)
    return y
