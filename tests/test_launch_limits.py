"""Every kernel launch fits CUDA's grid (at most 2**31 - 1 blocks along x, 65535 along y and z)
and addresses memory in 64 bits, for any tensor a GPU can hold; past a kernel's own limits the
op raises an error naming the argument and the limit before it launches.

The launches are checked on sizes alone, without allocating: the Triton launch grids are pure
functions of the shape, and the CUDA modulated convolution's launch plan is a CPU op of the
extension. The inputs that must be refused take no memory: expanded (stride-0) tensors, tiny
ones with a huge padding, fake CUDA tensors. The Triton offset helpers run in the interpreter
on values past 2**31. Launching at those sizes needs a GPU (the last tests).

Audit of the launches not tested here: the CUDA bias_act, diffusion noise and direct upfirdn2d
kernels use grid-stride loops over at most 8 blocks per SM; the tiled CUDA upfirdn2d kernel
puts at most 65535 planes on axis y and loops over the rest, and leaves more than 2**31 - 1
tiles (axis x) to the direct kernel; the Triton diffusion-noise grid is one program per 4096
(256 interpreted) elements, under 2**31 - 1 up to 8 * 10**12 elements.
"""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from batikfast import _cuda, backends  # noqa: E402
from tests._support import modconv_layer_reference  # noqa: E402

bias_act = backends.triton_kernels("bias_act")
upfirdn2d = backends.triton_kernels("upfirdn2d")
modconv = backends.triton_kernels("modulated_conv2d")

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_Y = 65535
# Outputs of 2**37 elements: 256 GiB in fp16, with their inputs more than any GPU holds (288 GB
# at most today). A 1-channel modulated convolution of twice that would pass 2**31 programs.
BEYOND_ANY_GPU = 2 ** 37


@pytest.fixture
def device_tiles(monkeypatch):
    """The block sizes a GPU launches with, also inside the interpreter."""
    monkeypatch.setenv("BATIKFAST_INTERPRET_DEVICE_TILES", "1")


# ---- Triton: one-dimensional grids on axis x ---------------------------------------------------

def bias_act_grid(rows, inner):
    return bias_act.launch_grid(rows, inner, *bias_act._tile(inner))


def upfirdn2d_grid(planes, out_h, out_w):
    return upfirdn2d.launch_grid(planes, out_h, out_w, upfirdn2d._tile(out_h, out_w))


def modconv_grid(rows, pixels, out_channels):
    config = modconv._choose_config(rows, pixels, 512, out_channels, torch.float16,
                                    torch.device("cpu"))
    return modconv.launch_grid(rows, out_channels, config)


# Shapes whose tiles are mostly empty (a row or plane one element longer than a tile) waste the
# most programs.
BIAS_ACT_ROWS = [1, 3, 4097, 65, 2 ** 20 + 1]


@pytest.mark.usefixtures("device_tiles")
@pytest.mark.parametrize("inner", BIAS_ACT_ROWS)
def test_bias_act_grid_fits_axis_x_for_more_elements_than_any_gpu_holds(inner):
    (programs,) = bias_act_grid(BEYOND_ANY_GPU // inner, inner)
    assert programs <= MAX_GRID_X


@pytest.mark.usefixtures("device_tiles")
@pytest.mark.parametrize("out_h, out_w", [(1, 1), (3, 3), (17, 65), (65, 17), (1, 2 ** 20 + 1)])
def test_upfirdn2d_grid_fits_axis_x_for_more_outputs_than_any_gpu_holds(out_h, out_w):
    (programs,) = upfirdn2d_grid(BEYOND_ANY_GPU // (out_h * out_w), out_h, out_w)
    assert programs <= MAX_GRID_X


@pytest.mark.usefixtures("device_tiles")
@pytest.mark.parametrize("pixels, out_channels", [(1, 1), (16, 17), (4096, 512), (1, 3_000_000)])
def test_modulated_conv2d_grid_fits_axis_x_for_more_outputs_than_any_gpu_holds(pixels,
                                                                               out_channels):
    rows = BEYOND_ANY_GPU // out_channels
    (programs,) = modconv_grid(rows, pixels, out_channels)
    assert programs <= MAX_GRID_X


@pytest.mark.usefixtures("device_tiles")
@pytest.mark.parametrize("op, grid", [
    ("bias_act", lambda: bias_act_grid(2 ** 50, 1)),
    ("upfirdn2d", lambda: upfirdn2d_grid(2 ** 50, 1, 1)),
    ("modulated_conv2d_forward", lambda: modconv_grid(2 ** 50, 1, 3_000_000)),
])
def test_a_triton_grid_past_axis_x_is_a_value_error_naming_the_op_and_the_limit(op, grid):
    with pytest.raises(ValueError, match=rf"^{op}: .* on grid axis x, more than CUDA's "
                                         rf"{MAX_GRID_X}"):
        grid()


# ---- Triton: 64-bit offsets where 32-bit products overflow --------------------------------------

@triton.jit
def _modconv_offsets_probe(out_ptr, n, oy, ox, stride_n, stride_h, stride_w, ky, kx):
    """out = [pixel offsets of (n, oy, ox) and (n + 1, oy + 1, ox + 1), tap offset of (ky, kx)]."""
    step = tl.arange(0, 2)
    pixel = modconv._pixel_offsets(n + step.to(tl.int64), oy + step, ox + step, stride_n,
                                   stride_h, stride_w)
    tl.store(out_ptr + step, pixel)
    tl.store(out_ptr + 2, modconv._tap_offset(ky, kx, stride_h, stride_w))


def test_modulated_conv2d_offsets_in_a_sample_of_more_than_2_31_elements_are_exact():
    # A channels-last sample of 40002 x 40002 pixels and 64 channels: its row stride times a
    # row index passes 2**31, as does a (large) tap's offset; the sample stride is int64.
    n, oy, ox, ky, kx = 3, 40000, 40000, 33000, 40000
    stride_n, stride_h, stride_w = 40002 * 40002 * 64, 40002 * 64, 64
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _modconv_offsets_probe[(1,)](out, n, oy, ox, stride_n, stride_h, stride_w, ky, kx)
    expected = [(n + d) * stride_n + (oy + d) * stride_h + (ox + d) * stride_w for d in (0, 1)]
    expected.append(ky * stride_h + kx * stride_w)
    assert out.tolist() == expected


def test_modulated_conv2d_refuses_an_image_past_its_32_bit_pixel_index():
    x = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(1, 1, 65536, 32769)
    weight = torch.ones(1, 1, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"modulated_conv2d_forward: a 65536x32769 input .* "
                                         r"32-bit pixel index"):
        modconv.modulated_conv2d_forward(x, weight, None, None, None, None, "linear", 0.2, 1.0,
                                         None, 0)


@pytest.mark.parametrize("axis", ["H", "W"])
def test_upfirdn2d_refuses_padding_past_its_32_bit_coordinates(axis):
    # Outputs 2**30 + 1 apart in a padding of 2**32 + 2**30: in int32 the fifth one's coordinate
    # wrapped to 4, inside the image, and read x there instead of the padding's zero.
    x = torch.ones(1, 1, 8, 8, device=DEVICE)
    f = torch.ones(1, 1, device=DEVICE)
    pad = dict(padx0=0, padx1=0, pady0=0, pady1=0)
    pad["pady1" if axis == "H" else "padx1"] = 2 ** 32 + 2 ** 30
    down = dict(downx=1, downy=1)
    down["downy" if axis == "H" else "downx"] = 2 ** 30 + 1
    with pytest.raises(ValueError, match=rf"upfirdn2d: {axis} = 8 up-sampled by 1 and padded by "
                                         rf".* more than the kernel's 32-bit"):
        upfirdn2d.upfirdn2d(x, f, 1, 1, down["downx"], down["downy"], pad["padx0"],
                            pad["padx1"], pad["pady0"], pad["pady1"], False, 1.0)


# ---- CUDA: the modulated convolution's launch plan ----------------------------------------------

def cuda_launch_plan(rows, out_channels, steps=1, multiprocessors=132, block_m=64, block_n=32):
    """[(grid x, grid y, grid z, first output channel)] of each launch, from the extension."""
    available, reason = _cuda.available()
    if not available:
        pytest.skip(f"batikfast._C is not available: {reason}")
    _cuda.load()
    flat = torch.ops.batikfast_cuda._modulated_conv2d_launch_plan(
        rows, out_channels, steps, multiprocessors, block_m, block_n)
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]


@pytest.mark.parametrize("block_m, block_n", [(64, 32), (128, 64)])
@pytest.mark.parametrize("out_channels", [MAX_GRID_Y * 32, MAX_GRID_Y * 32 + 1, 3_000_000,
                                          2 ** 31 - 200])
def test_cuda_modulated_conv2d_launches_channel_tiles_past_65535_in_chunks_along_axis_y(
        block_m, block_n, out_channels):
    launches = cuda_launch_plan(1000, out_channels, block_m=block_m, block_n=block_n)
    assert all(1 <= grid_y <= MAX_GRID_Y for _, grid_y, _, _ in launches)
    # The chunks tile the output channels in order, each starting where the previous ended.
    firsts = [first for _, _, _, first in launches]
    assert firsts == [sum(launch[1] for launch in launches[:k]) * block_n
                      for k in range(len(launches))]
    tiles = sum(grid_y for _, grid_y, _, _ in launches)
    assert tiles == -(-out_channels // block_n)
    assert {(grid_x, grid_z) for grid_x, _, grid_z, _ in launches} == {(-(-1000 // block_m), 1)}


def test_a_stylegan_layer_is_one_cuda_launch_and_a_small_one_splits_its_reduction():
    # 256x256 output, 128 channels, batch 8: many tiles, no split.
    assert cuda_launch_plan(8 * 256 * 256, 128, steps=9 * 4, block_m=128, block_n=64) == [
        (8 * 256 * 256 // 128, 2, 1, 0)]
    # 4x4 output, 512 channels, batch 4: 16 tiles for 132 SMs, the reduction split 16 ways.
    assert cuda_launch_plan(4 * 4 * 4, 512, steps=9 * 16) == [(1, 16, 16, 0)]


def test_cuda_modulated_conv2d_refuses_more_row_tiles_than_axis_x_holds():
    rows = 64 * MAX_GRID_X + 1
    with pytest.raises(RuntimeError, match=re.escape(
            f"modulated_conv2d_forward: {rows} output pixels (N * Ho * Wo) need "
            f"{MAX_GRID_X + 1} blocks of 64 on grid axis x, more than CUDA's {MAX_GRID_X}")):
        cuda_launch_plan(rows, 16)


def test_cuda_modulated_conv2d_refuses_output_channels_within_a_tile_of_2_31():
    """The channel index of a tile's last column (up to O + 63) must not wrap: the raw op's own
    check, run on fake CUDA tensors (no GPU, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda_launch_plan(1, 1)  # skips without the extension
    op = torch.ops.batikfast_cuda.modulated_conv2d_forward.default
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(1, 1, 1, 1, device="cuda")
        weight = torch.empty(2 ** 31 - 100, 1, 1, 1, device="cuda")
        in_scale = torch.empty(1, 1, device="cuda")
        with pytest.raises(RuntimeError, match=re.escape(
                "modulated_conv2d_forward: sizes too large (each dimension must fit in 32 bits, "
                "O and I*kh*kw with a tile to spare)")):
            op.redispatch(cuda_kernel, x, weight, in_scale, None, None, None, "linear", 0.0, 1.0,
                          -1.0, 0)


# ---- On a GPU: the launches themselves ----------------------------------------------------------

FAST_IMPLS = ["triton", "cuda"]


def run_modconv(impl, x, weight, in_scale):
    if impl == "cuda":
        available, reason = _cuda.available()
        if not available:
            pytest.skip(f"batikfast._C is not available: {reason}")
        return _cuda.modulated_conv2d_forward(x, weight, in_scale, None, None, None, "linear",
                                              0.0, 1.0, None, 0)
    return modconv.modulated_conv2d_forward(x, weight, in_scale, None, None, None, "linear", 0.0,
                                            1.0, None, 0)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: launches 3,000,000 output channels")
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_modulated_conv2d_with_3_million_output_channels_matches_the_reference(impl):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 16, 2, 2, device="cuda", generator=gen).half()
    weight = torch.randn(3_000_000, 16, 1, 1, device="cuda", generator=gen).half()
    in_scale = torch.rand(2, 16, device="cuda", generator=gen) + 0.5
    y = run_modconv(impl, x, weight, in_scale)
    truth, _ = modconv_layer_reference(x, weight, in_scale, None, None, None, "linear", 0.0, 1.0,
                                       None, 0)
    torch.testing.assert_close(y.double(), truth, rtol=2e-3, atol=2e-2)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (and 5 GB): one sample of 2**31 "
                                        "elements")
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_modulated_conv2d_reads_and_writes_the_last_rows_of_a_sample_past_2_31_elements(impl):
    # Channels-last, the last rows of x start past element 2**31 of the sample.
    height, width, channels = 2048, 2056, 512
    x = torch.zeros(1, channels, height, width, device="cuda", dtype=torch.half,
                    memory_format=torch.channels_last)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x[:, :, -2:] = torch.randn(1, channels, 2, width, device="cuda", generator=gen).half()
    weight = torch.randn(8, channels, 1, 1, device="cuda", generator=gen).half()
    in_scale = torch.ones(1, channels, device="cuda")
    y = run_modconv(impl, x, weight, in_scale)
    truth, _ = modconv_layer_reference(x[:, :, -2:], weight, in_scale, None, None, None,
                                       "linear", 0.0, 1.0, None, 0)
    torch.testing.assert_close(y[:, :, -2:].double(), truth, rtol=2e-3, atol=5e-2)
    assert not y[:, :, :-2].any()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (and 9 GB): an image of 2**31 "
                                        "elements")
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_upfirdn2d_filters_the_last_rows_of_a_channels_last_image_past_2_31_elements(impl):
    # The CUDA op refused any plane whose strides spanned 2**31 elements (every channels-last
    # image that large) though its offsets are 64-bit.
    from batikfast import ops
    if impl == "cuda" and not _cuda.available()[0]:
        pytest.skip(f"batikfast._C is not available: {_cuda.available()[1]}")
    height, width, channels = 2048, 2056, 512
    x = torch.zeros(1, channels, height, width, device="cuda", dtype=torch.half,
                    memory_format=torch.channels_last)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x[:, :, -2:] = torch.randn(1, channels, 2, width, device="cuda", generator=gen).half()
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda")
    y = ops.upfirdn2d(x, f, impl=impl)
    truth = ops.upfirdn2d(x[:, :, -3:].float(), f, impl="ref").double()
    torch.testing.assert_close(y[:, :, -2:].double(), truth, rtol=2e-3, atol=2e-2)
    assert not y[:, :, :-2].any()
