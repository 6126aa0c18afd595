"""Fused modulated convolution (StyleGAN2's modulate -> conv -> demodulate -> noise -> bias_act).

``modulated_conv2d_forward`` computes, in ONE Triton kernel, what this PyTorch expression does::

    y = F.conv2d(x * in_scale[:, :, None, None], weight, padding=padding)   # x if in_scale None
    y = y * out_scale[:, :, None, None]          # if out_scale is given (demodulation)
    y = y + noise + bias[None, :, None, None]      # each if given
    y = act(y, alpha) * gain                       # act in linear / relu / lrelu
    y = y.clamp(-clamp, clamp)                     # if clamp is not None

as an implicit GEMM: rows m = (n, oy, ox) of the output, columns o, reduction k = (ky, kx, i)::

    A[m, k] = x[n, i, oy + ky - padding, ox + kx - padding] * in_scale[n, i]   (0 outside the image)
    B[k, o] = weight[o, i, ky, kx]

The style scale is applied to the operand tiles as they are loaded, the demodulation, noise,
bias, activation, gain and clamp in the epilogue, so neither per-sample weights nor the
modulated input ever reach memory. When a tile of rows lies inside one sample (the usual case)
the style scales the rows of the B tile (sum_i x*s*w = sum_i x*(s*w)): A then goes from its
asynchronous copy straight to the MMA, whereas an A modified in registers makes ptxas serialise
Hopper's wgmma (warning C7515). A tile spanning several samples (small images) scales A: the
styles are read as one vector per sample and selected per row (gathered per row when a tile
covers more than 4 samples). out_scale is gathered per row in the epilogue.

Accumulation is fp32; fp16/bf16 operands go to ``tl.dot`` in their own dtype, fp32 operands as
tf32 on the GPU when ``torch.backends.cudnn.allow_tf32`` lets cuDNN do the same for fp32
convolutions (torch's default), else in full fp32 (see ``dot_precision``), and exactly under
``TRITON_INTERPRET=1``.

Tiles (see ``_choose_config``). The StyleGAN2 paper256 generator has two regimes:
- 4x4..32x32 layers, 512 channels: few rows, K = 9 * 512. These are matmul-bound; what limits
  them is filling the GPU, so the largest tile that still gives about one tile per SM is taken
  (128x128 when M is large enough, else 64-wide tiles).
- 64..256 px layers, 64..256 channels: many rows, few channels; bandwidth-bound. BLOCK_N covers
  all output channels (up to 128) so each input tile is read from DRAM once, and BLOCK_M = 128
  rows amortises the weight tile.
BLOCK_M is 64 where that keeps tiles inside one sample (8x8 images) and 128 would not.
BLOCK_K is 64 for 16-bit operands and 32 for fp32 (128-byte rows either way), shrunk for tiny
channel counts. The reduction runs as one flat loop over (tap, channel block) so Triton's
software pipeliner sees a single loop.

Layouts. x is read channels-last (NHWC), converted inside when it is not: each A-tile row is then
BLOCK_K contiguous channels, which Triton loads as 16-byte vectors with asynchronous copies that
its pipeliner overlaps with the MMAs. From NCHW the rows are contiguous only along ox, which
Triton cannot see through the (n, oy, ox) decomposition: element-wise, synchronous loads. The
conversion costs one read and write of x, nothing when activations are kept channels-last. The
weight is re-laid out once per call as [kh, kw, I, O] in the operand dtype (small, independent of
the batch) so B tiles are rows contiguous along o. The output takes x's memory format: NHWC
tiles are stored as vectors along o, NCHW tiles transposed so that a warp's stores run along ox.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._checks import check_device, grid_x, interpreter_tiles, launch_device
from ._checks import interpreting as _interpreting

_ACT_CODES = {"linear": 0, "relu": 1, "lrelu": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _pixel_offsets(n, oy, ox, stride_n, stride_h, stride_w):
    """n * stride_n + oy * stride_h + ox * stride_w in int64. oy and ox are int32 (cheap
    division and border tests), but their products with the row and pixel strides overflow
    int32 once one sample holds 2**31 elements (a 2048x2048 image of 512 channels)."""
    return n * stride_n + oy.to(tl.int64) * stride_h + ox.to(tl.int64) * stride_w


@triton.jit
def _tap_offset(ky, kx, stride_h, stride_w):
    """ky * stride_h + kx * stride_w in int64, once per reduction step (scalars): the weight's
    and a sample's tap offsets overflow int32 beyond 2**31 elements."""
    return ky.to(tl.int64) * stride_h + kx.to(tl.int64) * stride_w


@triton.jit
def _modulated_conv2d_fwd_kernel(
        x_ptr, w_ptr, in_scale_ptr, out_scale_ptr, noise_ptr, bias_ptr, y_ptr,
        N, I, H, W, O, Ho, Wo, M, padding,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wh, stride_ww, stride_wi, stride_wo,
        stride_sn, stride_si,
        stride_on, stride_oo,
        stride_nn, stride_nh, stride_nw,
        stride_b,
        stride_yn, stride_yc, stride_yh, stride_yw,
        alpha, gain, clamp,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_OUT_SCALE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, HAS_CLAMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr, SCALE_SAMPLES: tl.constexpr, EVEN_K: tl.constexpr,
        STORE_ROWS_FASTEST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n,o,oy,ox] = clamp(act(out_scale[n,o] * sum_{i,ky,kx} x[n,i,oy+ky-p,ox+kx-p]
    * in_scale[n,i] * w[ky,kx,i,o] + noise[n,oy,ox] + bias[o], alpha) * gain), with w the weight
    laid out [kh,kw,I,O]; the padding reads zeros.

    SCALE_SAMPLES: 0 without in_scale, else how many samples a row tile can touch (from the image
    size and BLOCK_M). 1: the sample's style vector scales the rows of B. 2 to 4: that many style
    vectors are selected per row of A. More: the styles are gathered per row of A.
    """
    num_n_tiles = tl.cdiv(O, BLOCK_N)
    # Output-channel tiles of one row block are neighbours in launch order, so they share the
    # x tile through L2; the whole (re-laid-out) weight is small enough to stay in L2.
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // num_n_tiles
    pid_n = pid % num_n_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < O
    pixels = Ho * Wo
    n = rows // pixels
    pix = (rows - n * pixels).to(tl.int32)
    oy = pix // Wo
    ox = pix - oy * Wo
    x_row = x_ptr + _pixel_offsets(n, oy - padding, ox - padding, stride_xn, stride_xh, stride_xw)
    first_sample = (pid_m * BLOCK_M) // pixels

    ks = tl.arange(0, BLOCK_K)
    channel_blocks = tl.cdiv(I, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block): Triton's software pipeliner only overlaps the
    # loads of the innermost loop, so a nested tap loop would restart the pipeline per tap.
    for step in range(0, KH * KW * channel_blocks):
        tap = step // channel_blocks
        i0 = (step - tap * channel_blocks) * BLOCK_K
        ky = tap // KW
        kx = tap - ky * KW
        iy = oy + (ky - padding)
        ix = ox + (kx - padding)
        inside = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        chan = i0 + ks
        if EVEN_K:
            chan_ok = tl.full((BLOCK_K,), True, tl.int1)
        else:
            chan_ok = chan < I
        a = tl.load(x_row[:, None] + _tap_offset(ky, kx, stride_xh, stride_xw)
                    + chan[None, :].to(tl.int64) * stride_xc,
                    mask=inside[:, None] & chan_ok[None, :], other=0.0)
        if SCALE_SAMPLES > 1:
            s = _load_styles(in_scale_ptr, n, row_ok, first_sample, N, chan, chan_ok, stride_sn,
                             stride_si, SCALE_SAMPLES)
            a = (a.to(tl.float32) * s).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + _tap_offset(ky, kx, stride_wh, stride_ww)
                    + chan[:, None].to(tl.int64) * stride_wi
                    + cols[None, :] * stride_wo,
                    mask=chan_ok[:, None] & col_ok[None, :], other=0.0)
        if SCALE_SAMPLES == 1:
            # The whole row tile is one sample: its style scales the rows of B instead of A.
            s = tl.load(in_scale_ptr + first_sample * stride_sn + chan * stride_si, mask=chan_ok,
                        other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(w_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            # Operands already rounded to their dtype; the fp32 product of two of them is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_OUT_SCALE:
        acc *= tl.load(out_scale_ptr + n[:, None] * stride_on + cols[None, :] * stride_oo,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_NOISE:
        acc += tl.load(noise_ptr + _pixel_offsets(n, oy, ox, stride_nn, stride_nh, stride_nw),
                       mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        # NaN stays NaN, as in torch's relu and clamp (Triton's default min / max drop it).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        acc = tl.where(acc > 0.0, acc, acc * alpha)
    acc = acc * gain
    if HAS_CLAMP:
        acc = tl.minimum(tl.maximum(acc, -clamp, propagate_nan=tl.PropagateNan.ALL), clamp,
                         propagate_nan=tl.PropagateNan.ALL)

    row_offsets = _pixel_offsets(n, oy, ox, stride_yn, stride_yh, stride_yw)
    col_offsets = cols.to(tl.int64) * stride_yc
    out = acc.to(y_ptr.dtype.element_ty)
    if STORE_ROWS_FASTEST:
        # NCHW output: neighbouring rows (ox) are neighbouring addresses, so the tile is stored
        # transposed for the warp's threads to run along rows and the stores to coalesce.
        tl.store(y_ptr + col_offsets[:, None] + row_offsets[None, :], tl.trans(out),
                 mask=col_ok[:, None] & row_ok[None, :])
    else:
        tl.store(y_ptr + row_offsets[:, None] + col_offsets[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _load_styles(in_scale_ptr, n, row_ok, first_sample, N, chan, chan_ok, stride_sn, stride_si,
                 SCALE_SAMPLES: tl.constexpr):
    """in_scale[n[m], chan[k]] as a [BLOCK_M, BLOCK_K] fp32 block."""
    chan_offsets = chan * stride_si
    if SCALE_SAMPLES > 4:
        s = tl.load(in_scale_ptr + n[:, None] * stride_sn + chan_offsets[None, :],
                    mask=row_ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
    else:
        s = tl.load(in_scale_ptr + first_sample * stride_sn + chan_offsets, mask=chan_ok,
                    other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(1, SCALE_SAMPLES):
            sample = first_sample + j
            s_j = tl.load(in_scale_ptr + sample * stride_sn + chan_offsets,
                          mask=chan_ok & (sample < N), other=0.0).to(tl.float32)
            s = tl.where((n == sample)[:, None], s_j[None, :], s)
    return s


class _Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# An H100's count, for the interpreter launching with device tiles (it has no SMs to count).
NOMINAL_MULTIPROCESSORS = 132


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return NOMINAL_MULTIPROCESSORS
    return _multiprocessor_count(device.index if device.index is not None
                                 else torch.cuda.current_device())


def _choose_config(rows: int, pixels: int, in_channels: int, out_channels: int,
                   dtype: torch.dtype, device: torch.device) -> _Config:
    if interpreter_tiles():
        # One small config: the interpreter cannot autotune, and 32x32x16 tiles already make the
        # tiny test shapes span several row, column and channel blocks.
        return _Config(32, 32, 16, 4, 1)
    sixteen_bit = dtype != torch.float32
    block_k = min(64 if sixteen_bit else 32, max(16, triton.next_power_of_2(in_channels)))
    # All output channels in one tile when O <= 128: the x tile is then read once.
    block_n = min(128, max(16, triton.next_power_of_2(out_channels)))
    sms = _sm_count(device)
    n_tiles = triton.cdiv(out_channels, block_n)
    block_m = 128
    if pixels % 128 != 0 and pixels % 64 == 0:
        # 64-row tiles then stay inside one sample, where the kernel scales B by the style
        # rather than A (A then feeds the MMA straight from shared memory).
        block_m = 64
    if triton.cdiv(rows, block_m) * n_tiles < sms:
        # Small images with many channels (the matmul-bound layers): smaller tiles fill the SMs.
        block_m = 64
        if triton.cdiv(rows, block_m) * n_tiles < sms and block_n > 64:
            block_n = 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return _Config(block_m, block_n, block_k, num_warps, 3)


def _smaller_configs(config: _Config):
    """Configs to fall back to, in order, when ``config`` needs more shared memory than the GPU
    has (3 stages of 128x128 tiles fit an A100 or H100, not every consumer GPU)."""
    if config.num_stages > 2:
        yield config._replace(num_stages=2)
    if config.block_n > 64:
        yield config._replace(block_n=64, num_warps=4, num_stages=2)
    if config.block_m > 64:
        yield config._replace(block_m=64, block_n=min(config.block_n, 64), num_warps=4,
                              num_stages=2)


_fitting_configs: dict = {}


def _launch_fitting(*args, config: _Config) -> None:
    key = (config, args[0].device)
    config = _fitting_configs.get(key, config)
    try:
        _launch(*args, config=config)
    except OutOfResources:
        for smaller in _smaller_configs(config):
            try:
                _launch(*args, config=smaller)
            except OutOfResources:
                continue
            _fitting_configs[key] = smaller
            return
        raise


def dot_precision(dtype: torch.dtype) -> str:
    """How fp32 tiles are multiplied: in TF32 when torch lets cuDNN use it for convolutions
    (``torch.backends.cudnn.allow_tf32``, on by default; NVIDIA's StyleGAN training and ours turn
    it off), else in full fp32, as the reference's convolution then is. The interpreter always
    multiplies exactly. 16-bit tiles ignore it."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the output for input ``x``, as torch.conv2d picks it: channels-last
    when x is (and is not also plainly contiguous), else contiguous. Fake (meta) implementations
    should allocate with it so that compiled graphs see the real strides."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def modulated_conv2d_forward(x, weight, in_scale, out_scale, noise, bias, act, alpha, gain,
                             clamp, padding):
    """Modulated convolution with its fused epilogue; see the module docstring for the formula.

    Args:
        x: [N, I, H, W] float32, float16 or bfloat16, any layout.
        weight: [O, I, kh, kw], x's dtype or float32 (cast to x's dtype inside).
        in_scale: None or [N, I] floating (the styles), applied to x in fp32. None (no scaling)
            makes this a plain convolution with the fused epilogue.
        out_scale: None or [N, O] floating (the demodulation coefficients).
        noise: None or a tensor broadcastable to [N, 1, Ho, Wo].
        bias: None or [O].
        act: "linear", "relu" or "lrelu"; alpha: lrelu's negative slope; gain: output multiplier.
        clamp: None or a float >= 0, applied after gain.
        padding: int >= 0, zero padding on every side (stride 1, cross-correlation).

    Returns:
        y: [N, O, Ho, Wo] with Ho = H + 2 * padding - kh + 1, in x's dtype and memory format.
    """
    _check_args(x, weight, in_scale, out_scale, bias, act, clamp, padding)
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = height + 2 * padding - kh + 1
    out_w = width + 2 * padding - kw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"padding={padding} with a {kh}x{kw} kernel leaves no output pixel for a "
                         f"{height}x{width} input")
    _check_pixel_index(height, width, out_h, out_w, padding)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.device != x.device:
            raise ValueError(f"noise must be a tensor on {x.device}, got {_describe(noise)}")
        try:
            noise = noise.expand(batch, 1, out_h, out_w)
        except RuntimeError:
            raise ValueError(
                f"noise must broadcast to [N, 1, Ho, Wo] = {[batch, 1, out_h, out_w]}, "
                f"got shape {tuple(noise.shape)}") from None

    y = torch.empty((batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))
    rows = batch * out_h * out_w
    if rows == 0 or out_channels == 0:
        return y
    # [kh, kw, I, O]: B tiles become rows contiguous along o; the cast happens here once instead
    # of in every tile that reads the weight.
    w_kkio = weight.permute(2, 3, 1, 0).to(x.dtype).contiguous()
    # Channels-last x makes each A-tile row I contiguous elements: vectorised loads that the
    # pipeliner can issue asynchronously. NCHW rows are only contiguous along ox, which Triton
    # cannot see through the (n, oy, ox) decomposition, so it would load element by element.
    # A no-op when x is already channels-last (keep activations so to skip this copy).
    x = x.contiguous(memory_format=torch.channels_last)
    config = _choose_config(rows, out_h * out_w, in_channels, out_channels, x.dtype, x.device)
    with launch_device(x):
        _launch_fitting(x, w_kkio, in_scale, out_scale, noise, bias, y, act, alpha, gain, clamp,
                        padding, config=config)
    return y


def launch_grid(rows: int, out_channels: int, config: _Config) -> tuple[int]:
    """One program per (row tile, output-channel tile), all on grid axis x."""
    tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(out_channels, config.block_n)
    return grid_x("modulated_conv2d_forward", tiles,
                  f"{rows} output pixels (N * Ho * Wo) by {out_channels} output channels")


def _launch(x, w_kkio, in_scale, out_scale, noise, bias, y, act, alpha, gain, clamp, padding,
            config: _Config) -> None:
    batch, in_channels, height, width = x.shape
    kh, kw, _, out_channels = w_kkio.shape
    _, _, out_h, out_w = y.shape
    rows = batch * out_h * out_w
    # A placeholder for absent optional tensors: never read, their loads are compiled out.
    dummy = y
    in_scale_strides = in_scale.stride() if in_scale is not None else (0, 0)
    out_scale_strides = out_scale.stride() if out_scale is not None else (0, 0)
    noise_strides = (noise.stride(0), noise.stride(2), noise.stride(3)) if noise is not None \
        else (0, 0, 0)
    pixels = out_h * out_w
    scale_samples = (pixels - math.gcd(config.block_m, pixels) + config.block_m - 1) // pixels + 1
    _modulated_conv2d_fwd_kernel[launch_grid(rows, out_channels, config)](
        x, w_kkio, in_scale if in_scale is not None else dummy,
        out_scale if out_scale is not None else dummy,
        noise if noise is not None else dummy,
        bias if bias is not None else dummy, y,
        batch, in_channels, height, width, out_channels, out_h, out_w, rows, int(padding),
        *x.stride(), *w_kkio.stride(), *in_scale_strides, *out_scale_strides, *noise_strides,
        bias.stride(0) if bias is not None else 0, *y.stride(),
        float(alpha) if alpha is not None else 0.0, float(gain) if gain is not None else 1.0,
        float(clamp) if clamp is not None else 0.0,
        KH=kh, KW=kw, HAS_OUT_SCALE=out_scale is not None, HAS_NOISE=noise is not None,
        HAS_BIAS=bias is not None, ACT=_ACT_CODES[act], HAS_CLAMP=clamp is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        # Triton 3.8's interpreter multiplies bf16 blocks as their raw uint16 bits.
        DOT_IN_FP32=x.dtype == torch.bfloat16 and _interpreting(),
        SCALE_SAMPLES=min(scale_samples, batch) if in_scale is not None else 0,
        EVEN_K=in_channels % config.block_k == 0,
        STORE_ROWS_FASTEST=y.stride(1) != 1 and y.stride(3) == 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


# The kernel indexes the pixels of one image in int32 (a 64-bit division per row would cost more
# than the addresses it computes); its offsets are int64.
_MAX_PIXEL_INDEX = 2 ** 31 - 1


def _check_pixel_index(height, width, out_h, out_w, padding) -> None:
    if out_h * out_w > _MAX_PIXEL_INDEX or max(height, width) + 2 * padding > _MAX_PIXEL_INDEX:
        raise ValueError(f"modulated_conv2d_forward: a {height}x{width} input with padding "
                         f"{padding} ({out_h}x{out_w} output pixels) exceeds the kernel's 32-bit "
                         f"pixel index (at most {_MAX_PIXEL_INDEX} pixels per image and padded "
                         f"side); split the image")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def _check_args(x, weight, in_scale, out_scale, bias, act, clamp, padding) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, I, H, W] tensor, got {_describe(x)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check_device("modulated_conv2d_forward", "x", x)
    batch, in_channels = x.shape[:2]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != in_channels:
        raise ValueError(f"weight must be [O, {in_channels}, kh, kw], got {_describe(weight)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must be {x.dtype} (x's dtype) or float32, got {weight.dtype}")
    out_channels = weight.shape[0]
    if in_scale is not None:
        _check_floating("in_scale", in_scale, (batch, in_channels), x.device)
    if out_scale is not None:
        _check_floating("out_scale", out_scale, (batch, out_channels), x.device)
    if bias is not None:
        _check_floating("bias", bias, (out_channels,), x.device)
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device} like x, got {weight.device}")
    if act not in _ACT_CODES:
        raise ValueError(f"act must be one of {sorted(_ACT_CODES)}, got {act!r}")
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"clamp must be None or >= 0, got {clamp!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")


def _check_floating(name, value, shape, device) -> None:
    if (not isinstance(value, torch.Tensor) or not value.is_floating_point()
            or tuple(value.shape) != tuple(shape) or value.device != device):
        raise ValueError(f"{name} must be a floating-point tensor of shape {list(shape)} on "
                         f"{device}, got {_describe(value)}")
