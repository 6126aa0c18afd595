"""The Triton kernels launched with the tiles a GPU gets, checked on any machine.

The other Triton tests run in Triton's interpreter on small tiles, so that tiny tensors span
several programs. A GPU launches with bigger ones: 4096-element blocks for bias_act and the
diffusion noise, 1024-output upfirdn2d tiles that stack several planes, 64- and 128-row matmul
tiles whose rows cross sample boundaries. ``BATIKFAST_INTERPRET_DEVICE_TILES=1`` makes the
interpreter launch exactly those, so their index arithmetic and masks are checked in CI too.
On a GPU the variable changes nothing and these tests run on the device.

Each test checks against the same float64 truths as the kernel's own test module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batikfast import backends  # noqa: E402
from tests import test_triton_bias_act as bias_act_tests  # noqa: E402
from tests import test_triton_diffusion_noise as noise_tests  # noqa: E402
from tests import test_triton_modulated_conv2d as modconv_tests  # noqa: E402
from tests import test_triton_upfirdn2d as upfirdn2d_tests  # noqa: E402

DEVICE_TILES = "BATIKFAST_INTERPRET_DEVICE_TILES"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def device_tiles(monkeypatch):
    monkeypatch.setenv(DEVICE_TILES, "1")


def test_the_switch_selects_the_gpu_tiles_only_inside_the_interpreter(monkeypatch):
    up2d = backends.triton_kernels("upfirdn2d")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(DEVICE_TILES, raising=False)
    assert up2d._tile(300, 300) == (1, 8, 32, 1)
    monkeypatch.setenv(DEVICE_TILES, "1")
    assert up2d._tile(300, 300) == (1, 16, 64, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert up2d._tile(300, 300) == (1, 16, 64, 4)


# ---- upfirdn2d: planes stacked in one tile, rows wider than 64, several row blocks ----------

WIDE_CASES = [
    dict(shape=(2, 3, 37, 70), taps=(4, 4), up=(2, 2), down=(1, 1), pad=(2, 1, 2, 1),
         flip_filter=False, gain=4.0),
    dict(shape=(1, 2, 40, 150), taps=(1, 4), up=(1, 1), down=(2, 1), pad=(1, 1, 0, 0),
         flip_filter=True, gain=1.0),
    dict(shape=(3, 5, 9, 131), taps=(5, 3), up=(3, 1), down=(1, 2), pad=(-2, 3, 1, -1),
         flip_filter=False, gain=0.5),
]


@pytest.mark.parametrize("case", upfirdn2d_tests.random_cases(24, seed=0) + WIDE_CASES,
                         ids=lambda c: "{}x{}-up{}-down{}-pad{}-f{}".format(
                             c["shape"][2], c["shape"][3], *[c[k] for k in (
                                 "up", "down", "pad", "taps")]).replace(" ", ""))
def test_upfirdn2d_with_gpu_tiles_matches_float64(device_tiles, case):
    x = upfirdn2d_tests.rand(*case["shape"], seed=1).float()
    f = upfirdn2d_tests.rand(*case["taps"], seed=2).float()
    kwargs = {k: case[k] for k in ("up", "down", "pad", "flip_filter", "gain")}
    out = upfirdn2d_tests.run(x, f, **kwargs)
    upfirdn2d_tests.assert_matches(out, x, f, torch.float32, str(case), **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(upfirdn2d_tests.stylegan_cases()))
def test_upfirdn2d_stylegan_resampling_with_gpu_tiles_matches_float64(device_tiles, name, dtype):
    case = dict(upfirdn2d_tests.stylegan_cases()[name])
    f = case.pop("f").float()
    x = upfirdn2d_tests.rand(2, 3, 17, 40, seed=3).to(dtype)
    upfirdn2d_tests.assert_matches(upfirdn2d_tests.run(x, f, **case), x, f, dtype, name, **case)


# ---- bias_act: 4096-element blocks, inner sizes above and below the block -------------------

BIAS_ACT_LAYOUTS = [
    ((3, 5, 37, 41), 1),  # inner 1517: two rows per block, the last block half empty
    ((2, 3, 70, 70), 1),  # inner 4900: one row spans two blocks
    ((6, 700), -1),  # bias along the last axis: many rows of 700 per block
    ((5000,), 0),  # rank 1 over one block boundary
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["lrelu", "swish", "softplus"])
@pytest.mark.parametrize("layout", BIAS_ACT_LAYOUTS, ids=lambda l: "x".join(map(str, l[0])))
def test_bias_act_with_gpu_blocks_matches_float64_to_the_second_derivative(device_tiles, layout,
                                                                           act, dtype):
    shape, dim = layout
    t = bias_act_tests
    x = t.rand(*shape, seed=1, scale=3).to(dtype)
    b = t.rand(shape[dim], seed=2).to(dtype)
    dy = t.rand(*shape, seed=3).to(dtype)
    device = t.DEVICE
    alpha, gain, clamp = 0.3, 1.7, 2.5
    y = t.ba.bias_act_forward(x.to(device), b.to(device), dim, act, alpha, gain, clamp)
    t.assert_close(y, t.truth_forward(x, b, dim, act, alpha, gain, clamp),
                   t.same_dtype_forward(x, b, dim, act, alpha, gain, clamp), dtype, "forward")
    ignore = t.near_clamp(x, b, dim, act, alpha, gain, clamp, dtype)
    z_low = t.with_bias(x, b, dim).to(dtype).double()
    inside = ((t.derivative(z_low, act, alpha, 0) * gain).abs() <= clamp).to(dtype)
    for order in (1, 2):
        dx = t.ba.bias_act_backward(dy.to(device), x.to(device), b.to(device), dim, act, alpha,
                                    gain, clamp, order)
        baseline = (dy.double() * gain * t.derivative(z_low, act, alpha, order)).to(dtype)
        t.assert_close(dx, t.truth_backward(dy, x, b, dim, act, alpha, gain, clamp, order),
                       baseline * inside, dtype, f"order {order}", ignore=ignore)


# ---- diffusion noise: the drawn stream must not depend on the block size --------------------

@pytest.mark.parametrize("offset", [0, 3, 4097])
@pytest.mark.parametrize("shape", [(3, 5000), (5, 3, 17, 19), (2, 4096), (7, 33)], ids=str)
def test_diffusion_noise_draws_the_same_eps_with_gpu_and_interpreter_blocks(monkeypatch, shape,
                                                                             offset):
    monkeypatch.delenv(DEVICE_TILES, raising=False)
    small_blocks = noise_tests.draw(shape, seed=11, offset=offset)
    monkeypatch.setenv(DEVICE_TILES, "1")
    gpu_blocks = noise_tests.draw(shape, seed=11, offset=offset)
    assert torch.equal(small_blocks, gpu_blocks)
    assert small_blocks.std().item() > 0.5  # eps was drawn, not left at zero


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diffusion_noise_formula_with_gpu_blocks_matches_float64(device_tiles, dtype):
    t = noise_tests
    x = t.rand(3, 2, 50, 41, seed=1).to(dtype)  # 4100 elements a sample: at most two per block
    noise = t.rand(3, 2, 50, 41, seed=2).to(dtype)
    x_scale, noise_scale = t.rand(3, seed=3).float(), t.rand(3, seed=4).float()
    y = t.dn.diffusion_noise_forward(x.to(t.DEVICE), x_scale.to(t.DEVICE),
                                     noise_scale.to(t.DEVICE), noise.to(t.DEVICE), 0, 0)
    truth = t.per_sample(x_scale.double(), x) * x.double() + \
        t.per_sample(noise_scale.double(), x) * noise.double()
    baseline = (t.per_sample(x_scale.to(dtype), x) * x +
                t.per_sample(noise_scale.to(dtype), x) * noise)
    t.assert_close(y, truth, baseline, dtype, "given noise")


# ---- modulated convolution: the configs _choose_config gives a GPU --------------------------

# (N, I, O, H, W, k, padding, streaming multiprocessors): a one-SM GPU keeps 128-row and
# 128-column tiles on these small layers; 132 SMs (an H100) shrinks them to fill the SMs.
MODCONV_CASES = [
    (3, 20, 24, 7, 9, 3, 1, 1),  # 63 pixels: 128-row tiles cross samples
    (2, 70, 130, 8, 8, 3, 1, 1),  # 64 pixels: 64-row tiles; I not a multiple of BLOCK_K
    (3, 64, 40, 5, 6, 3, 1, 132),  # K blocks divide I exactly
    (2, 5, 3, 11, 13, 1, 0, 1),  # toRGB-like: 1x1 kernel, few channels
    (1, 33, 17, 4, 4, 3, 0, 132),  # no padding: output smaller than input
    (10, 12, 20, 3, 3, 3, 1, 1),  # 9-pixel images: a 128-row tile gathers 10 samples' styles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", MODCONV_CASES,
                         ids=lambda c: "N{}_I{}_O{}_{}x{}_k{}_p{}_{}sm".format(*c))
def test_modulated_conv2d_with_gpu_tiles_matches_float64(device_tiles, monkeypatch, case, dtype):
    batch, in_ch, out_ch, height, width, k, padding, sms = case
    monkeypatch.setattr(modconv_tests.mc, "_sm_count", lambda device: sms)
    args = modconv_tests.make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype)
    unclamped, _ = modconv_tests.reference(**args, act="lrelu", alpha=0.2, gain=1.4,
                                           clamp=None, padding=padding)
    clamp = 0.5 * unclamped.abs().max().item()
    modconv_tests.check_against_reference(args, clamp=clamp, padding=padding)


def test_modulated_conv2d_gpu_tile_cases_cover_both_row_tile_sizes(device_tiles, monkeypatch):
    """The cases above must keep exercising 64- and 128-row tiles and uneven K blocks."""
    mc = modconv_tests.mc
    seen = set()
    for batch, in_ch, out_ch, height, width, k, padding, sms in MODCONV_CASES:
        monkeypatch.setattr(mc, "_sm_count", lambda device, sms=sms: sms)
        out_h, out_w = height + 2 * padding - k + 1, width + 2 * padding - k + 1
        config = mc._choose_config(batch * out_h * out_w, out_h * out_w, in_ch, out_ch,
                                   torch.float16, torch.device(modconv_tests.DEVICE))
        seen.add((config.block_m, in_ch % config.block_k == 0, config.block_n == 128))
    assert {block_m for block_m, _, _ in seen} == {64, 128}
    assert {even_k for _, even_k, _ in seen} == {True, False}
    assert any(wide_n for _, _, wide_n in seen)
