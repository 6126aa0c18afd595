"""The Triton upfirdn2d kernel against an independent float64 formulation.

Truth, in float64: zero insertion by strided assignment, F.pad then slicing for (negative)
padding, F.conv2d with the flipped filter (a true convolution) unless flip_filter, strided
slicing for down-sampling, times gain. Low-precision outputs are compared with the truth
computed from the same rounded inputs: the kernel accumulates in fp32, so its only sizeable
error is the final rounding, allowed one unit in the last place of the output's scale.
Without a GPU the kernel runs in Triton's interpreter, so the images stay tiny.
"""
import os
import random

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batikfast import backends, ops  # noqa: E402
from tests._support import compile_without_gpu  # noqa: E402

up2d = backends.triton_kernels("upfirdn2d")

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# One unit in the last place (relative to the output's largest value); fp32 a few units, as the
# sum of up to a few dozen taps rounds in a different order than conv2d.
ULP = {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
STYLEGAN_TAPS = [1.0, 3.0, 3.0, 1.0]


def rand(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def reference(x, f, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """float64 upfirdn2d; up / down as (x, y), pad as (x0, x1, y0, y1)."""
    (upx, upy), (downx, downy), (padx0, padx1, pady0, pady1) = up, down, pad
    x, f = x.double().cpu(), f.double().cpu()
    batch, channels, height, width = x.shape
    zero_inserted = x.new_zeros(batch, channels, height * upy, width * upx)
    zero_inserted[:, :, ::upy, ::upx] = x
    padded = F.pad(zero_inserted, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    padded = padded[:, :, max(-pady0, 0): padded.shape[2] - max(-pady1, 0),
                    max(-padx0, 0): padded.shape[3] - max(-padx1, 0)]
    kernel = f if flip_filter else f.flip(0, 1)
    y = F.conv2d(padded.reshape(batch * channels, 1, *padded.shape[2:]), kernel[None, None])
    y = y.reshape(batch, channels, *y.shape[2:])
    return y[:, :, ::downy, ::downx] * gain


def run(x, f, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    return up2d.upfirdn2d(x.to(DEVICE), f.to(DEVICE), up[0], up[1], down[0], down[1], *pad,
                          flip_filter, gain)


def assert_matches(out, x, f, dtype, what, **kwargs):
    """out against the float64 truth of the (already rounded) inputs x and f."""
    truth = reference(x, f, **kwargs)
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = truth.abs().max().item() or 1.0
    err = (out - truth).abs().max().item()
    assert err <= ULP[dtype] * scale, f"{what}: error {err:.3g} > {ULP[dtype] * scale:.3g}"


def random_cases(count, seed):
    """Random factors, paddings (cropping included), filter sizes (1-D rows / columns and 2-D),
    flips and gains, keeping the output non-empty."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        up = (rng.randint(1, 3), rng.randint(1, 3))
        down = (rng.randint(1, 3), rng.randint(1, 3))
        fh, fw = rng.choice([(1, rng.randint(1, 6)), (rng.randint(1, 6), 1),
                             (rng.randint(1, 5), rng.randint(1, 5))])
        height, width = rng.randint(1, 7), rng.randint(1, 7)
        pad = tuple(rng.randint(-3, 4) for _ in range(4))
        if width * up[0] + pad[0] + pad[1] < fw or height * up[1] + pad[2] + pad[3] < fh:
            continue
        cases.append(dict(shape=(rng.randint(1, 2), rng.randint(1, 3), height, width),
                          taps=(fh, fw), up=up, down=down, pad=pad,
                          flip_filter=rng.random() < 0.5, gain=rng.choice([1.0, 0.5, 4.0])))
    return cases


@pytest.mark.parametrize("case", random_cases(24, seed=0), ids=lambda c: (
    f"up{c['up']}-down{c['down']}-pad{c['pad']}-f{c['taps']}-{c['shape'][2]}x{c['shape'][3]}"
    f"{'-flip' if c['flip_filter'] else ''}").replace(" ", ""))
def test_upfirdn2d_matches_float64_for_any_factors_paddings_and_filters(case):
    x = rand(*case["shape"], seed=1).float()
    f = rand(*case["taps"], seed=2).float()
    kwargs = {k: case[k] for k in ("up", "down", "pad", "flip_filter", "gain")}
    assert_matches(run(x, f, **kwargs), x, f, torch.float32, str(case), **kwargs)


def stylegan_cases():
    taps = torch.tensor(STYLEGAN_TAPS, dtype=torch.float64)
    row = taps[None, :] / taps.sum()
    return {
        # upsample2d's passes: up 2 with the 4-tap filter along x, then along y (gain 2 each).
        "up2-row": dict(f=row, up=(2, 1), pad=(2, 1, 0, 0), gain=2.0),
        "up2-column": dict(f=row.t(), up=(1, 2), pad=(0, 0, 2, 1), gain=2.0),
        # downsample2d's passes.
        "down2-row": dict(f=row, down=(2, 1), pad=(1, 1, 0, 0)),
        "down2-column": dict(f=row.t(), down=(1, 2), pad=(0, 0, 1, 1)),
        # The same as one 2-D 4x4 filter, and plain 4x4 filtering (filter2d).
        "up2-2d": dict(f=row.t() @ row, up=(2, 2), pad=(2, 1, 2, 1), gain=4.0),
        "down2-2d": dict(f=row.t() @ row, down=(2, 2), pad=(1, 1, 1, 1)),
        "filter-4x4": dict(f=row.t() @ row, pad=(2, 1, 2, 1)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(stylegan_cases()))
def test_upfirdn2d_stylegan_resampling_matches_float64_in_every_dtype(name, dtype):
    case = dict(stylegan_cases()[name])
    f = case.pop("f").float()
    x = rand(2, 3, 5, 6, seed=3).to(dtype)
    assert_matches(run(x, f, **case), x, f, dtype, name, **case)


def test_upfirdn2d_reads_non_contiguous_images_and_filters():
    f = rand(3, 4, seed=4).float()
    images = {
        "transposed": rand(2, 3, 6, 5, seed=5).float().transpose(2, 3),
        "strided": rand(2, 6, 7, 11, seed=6).float()[:, ::2, 1:, ::2],
        "channels-last": rand(2, 3, 5, 4, seed=7).float().contiguous(
            memory_format=torch.channels_last),
        "batch-strided": rand(6, 2, 3, 4, seed=17).float()[1::2],
        "one-channel-of-three": rand(2, 3, 4, 5, seed=19).float()[:, 1:2],
        "channels-first-in-memory": rand(3, 2, 4, 5, seed=18).float().transpose(0, 1),
    }
    for what, x in images.items():
        x_dev = x.to(DEVICE)
        if what == "channels-last":
            x_dev = x_dev.contiguous(memory_format=torch.channels_last)
        out = up2d.upfirdn2d(x_dev, f.t().to(DEVICE), 2, 1, 1, 2, 1, 2, 3, -1, False, 1.0)
        assert_matches(out, x, f.t(), torch.float32, what, up=(2, 1), down=(1, 2),
                       pad=(1, 2, 3, -1))


def test_upfirdn2d_handles_single_pixel_images_and_filters():
    x = rand(3, 2, 1, 1, seed=8).float()
    one_tap = torch.tensor([[2.5]])
    assert_matches(run(x, one_tap), x, one_tap, torch.float32, "1x1 filter")
    f = rand(4, 4, seed=9).float()
    assert_matches(run(x, f, up=(2, 2), pad=(2, 1, 2, 1)), x, f, torch.float32, "1x1 image up 2",
                   up=(2, 2), pad=(2, 1, 2, 1))
    assert_matches(run(x, f, pad=(3, 3, 3, 3), down=(3, 2)), x, f, torch.float32,
                   "1x1 image padded", pad=(3, 3, 3, 3), down=(3, 2))


def test_upfirdn2d_crops_with_negative_padding_past_the_upsampled_border():
    x = rand(1, 2, 7, 5, seed=10).float()
    f = rand(2, 3, seed=11).float()
    for pad in [(-4, -1, -5, 0), (-1, -6, 2, -7), (5, -8, -9, 3)]:
        assert_matches(run(x, f, up=(2, 3), pad=pad), x, f, torch.float32, f"pad {pad}",
                       up=(2, 3), pad=pad)


def test_upfirdn2d_with_filters_longer_than_the_image():
    x = rand(1, 1, 2, 3, seed=12).float()
    f = rand(7, 8, seed=13).float()
    kwargs = dict(up=(3, 2), down=(2, 1), pad=(4, 4, 3, 3), flip_filter=True, gain=0.7)
    assert_matches(run(x, f, **kwargs), x, f, torch.float32, "long filter", **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_upfirdn2d_ops_triton_matches_ops_reference_through_the_public_helpers(dtype):
    x = rand(2, 3, 6, 5, seed=14).to(dtype).to(DEVICE)
    f2d = ops.setup_filter(STYLEGAN_TAPS, device=DEVICE)  # 4 taps: 2-D, as NVIDIA's default
    f1d = ops.setup_filter(STYLEGAN_TAPS, device=DEVICE, separable=True)
    calls = {
        "upsample2d": lambda impl: ops.upsample2d(x, f2d, impl=impl),
        "upsample2d-separable": lambda impl: ops.upsample2d(x, f1d, impl=impl),
        "downsample2d": lambda impl: ops.downsample2d(x, f2d, impl=impl),
        "downsample2d-separable": lambda impl: ops.downsample2d(x, f1d, impl=impl),
        "filter2d": lambda impl: ops.filter2d(x, f2d, padding=1, gain=2, impl=impl),
        "upfirdn2d": lambda impl: ops.upfirdn2d(x, f1d, up=[1, 2], down=[2, 1],
                                                padding=[1, -1, 2, 0], flip_filter=True,
                                                impl=impl),
    }
    for what, call in calls.items():
        fast, ref = call("triton"), call("ref")
        tol = ULP[dtype] * 4 * ref.abs().max().item()
        assert fast.shape == ref.shape and fast.dtype == ref.dtype, what
        assert (fast.double() - ref.double()).abs().max().item() <= tol, what


def test_upfirdn2d_refuses_bad_input_with_a_clear_error(monkeypatch):
    x = torch.zeros(1, 1, 4, 4, device=DEVICE)
    f = torch.ones(2, 2, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32"):
        up2d.upfirdn2d(x.double(), f, 1, 1, 1, 1, 0, 0, 0, 0, False, 1.0)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        up2d.upfirdn2d(x[0], f, 1, 1, 1, 1, 0, 0, 0, 0, False, 1.0)
    with pytest.raises(ValueError, match="f must be a non-empty 2-D"):
        up2d.upfirdn2d(x, f[0], 1, 1, 1, 1, 0, 0, 0, 0, False, 1.0)
    with pytest.raises(ValueError, match="downy must be an int >= 1"):
        up2d.upfirdn2d(x, f, 1, 1, 1, 0, 0, 0, 0, 0, False, 1.0)
    with pytest.raises(ValueError, match="leaves no output pixel"):
        up2d.upfirdn2d(x, f, 1, 1, 1, 1, -2, -2, 0, 0, False, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        up2d.upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), 1, 1, 1, 1, 0, 0, 0, 0,
                       False, 1.0)


def test_upfirdn2d_empty_batch_gives_empty_output():
    x = torch.zeros(0, 3, 4, 4, device=DEVICE)
    y = up2d.upfirdn2d(x, torch.ones(2, 2, device=DEVICE), 2, 2, 1, 1, 0, 0, 0, 0, False, 1.0)
    assert y.shape == (0, 3, 7, 7)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine every test compiles the kernel for real")
def test_upfirdn2d_kernel_compiles_for_an_nvidia_gpu():
    compile_without_gpu("upfirdn2d", """
for dtype, (upx, upy, downx, downy, fh, fw), tile in [
        ("fp16", (2, 2, 1, 1, 4, 4), (1, 16)), ("bf16", (1, 1, 2, 2, 4, 4), (4, 4)),
        ("fp32", (3, 1, 1, 2, 1, 5), (1, 16)), ("fp16", (1, 2, 1, 1, 4, 1), (2, 8))]:
    types = dict(x_ptr="*" + dtype, f_ptr="*fp32", y_ptr="*" + dtype, planes="i32", in_h="i32",
                 in_w="i32", out_h="i32", out_w="i32", stride_xp="i64", stride_xh="i64",
                 stride_xw="i64", stride_fh="i32", stride_fw="i32", lead_x="i32", lead_y="i32",
                 skip_x="i32", skip_y="i32", gain="fp32")
    compile_for_sm90(kernels._upfirdn2d_kernel, types,
                     dict(UPX=upx, UPY=upy, DOWNX=downx, DOWNY=downy, FH=fh, FW=fw, FLIP=False,
                          PLANES=tile[0], PLANE_ROWS=tile[1], BLOCK_W=64), 4)
""")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: an output past 2**31 elements")
def test_upfirdn2d_indexes_past_two_to_the_31_elements():
    x = torch.zeros(8, 128, 512, 512, dtype=torch.float16, device="cuda")  # 2**28 elements
    x[-1, -1, -1, -1] = 1.0
    f = torch.ones(1, 4, device="cuda")
    y = up2d.upfirdn2d(x, f, 2, 4, 1, 1, 2, 1, 0, 0, False, 1.0)  # 2**31 outputs
    assert y.numel() >= 2 ** 31
    assert y[-1, -1, -4, -3:].tolist() == [1.0, 1.0, 1.0]
    assert y[-1, -1, -1].abs().sum().item() == 0.0


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: StyleGAN-sized images")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(stylegan_cases()))
def test_upfirdn2d_stylegan_resampling_on_full_size_images(name, dtype):
    case = dict(stylegan_cases()[name])
    f = case.pop("f").float()
    x = torch.randn(4, 64, 128, 128).to(dtype)
    assert_matches(run(x, f, **case), x, f, dtype, name, **case)
