"""The CUDA kernels of batikfast._C against independent float64 formulations (GPU only).

Each kernel runs in float32, float16 and bfloat16 and is compared with the same computation done
in float64 on the same (already rounded) inputs, so the tolerance only has to cover the kernel's
fp32 arithmetic and the final rounding to the output dtype.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

from batikfast import _cuda
from tests._support import documented_eps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"]
# |kernel - truth| <= atol * scale + rtol * |truth|: a few units of the dtype's rounding.
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-3, 1.6e-2)}


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, reason = _cuda.available()
    if not ok:
        pytest.skip(f"batikfast._C is not available: {reason}")


def _close(actual, truth, dtype, scale=1.0, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), truth.double().cpu(), atol=atol * scale,
                               rtol=rtol, msg=lambda m: f"{what}: {m}")


def _randn(shape, dtype, generator, scale=1.0, contiguous=True):
    if contiguous:
        return (torch.randn(shape, generator=generator) * scale).to("cuda", dtype)
    # A view with a transposed layout and a gap between rows: neither contiguous nor dense.
    big = torch.randn(*shape[:-1], shape[-1] * 2, generator=generator) * scale
    return big.to("cuda", dtype)[..., ::2]


# ---- bias_act --------------------------------------------------------------------------------

def _act64(name, z, alpha):
    funcs = {
        "linear": lambda: z,
        "relu": lambda: torch.relu(z),
        "lrelu": lambda: F.leaky_relu(z, alpha),
        "tanh": lambda: torch.tanh(z),
        "sigmoid": lambda: torch.sigmoid(z),
        # Written out rather than F.elu / F.selu: on the H100 (torch 2.11) autograd's second
        # derivative of those disagreed with exp(z) on ~14% of elements; torch.where + expm1
        # differentiates plainly.
        "elu": lambda: torch.where(z > 0, z, torch.expm1(z)),
        "selu": lambda: 1.0507009873554805 * torch.where(z > 0, z, 1.6732632423543772 * torch.expm1(z)),
        "softplus": lambda: F.softplus(z),
        "swish": lambda: z * torch.sigmoid(z),
    }
    return funcs[name]()


def _bias_act_truth(x, b, dim, act, alpha, gain, clamp, dy=None, order=0):
    """float64: y (order 0) or dy * gain * act^(order)(z) * mask, derivatives by autograd."""
    z = x.double()
    if b is not None:
        shape = [-1 if axis == dim else 1 for axis in range(x.ndim)]
        z = z + b.to(x.dtype).double().reshape(shape)  # the kernel adds b in x's dtype
    z = z.detach().requires_grad_(True)
    y = _act64(act, z, alpha)
    value = y
    for _ in range(order):
        grad = None
        if value.requires_grad:  # a constant derivative (linear) has no graph left
            (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True, allow_unused=True)
        value = torch.zeros_like(z) if grad is None else grad
    if order == 2 and act in ("elu", "selu"):
        # torch's elu double backward multiplies by (z < 0): 0 at z = 0, the reference's value.
        value = value * (z != 0)
    y = (y * gain).detach()
    if order == 0:
        out = y if clamp is None else y.clamp(-clamp, clamp)
    else:
        out = dy.double() * gain * value.detach()
        if clamp is not None:
            out = out * (y.abs() <= clamp)
    return out, y


def _away_from_clamp(y, clamp, dtype):
    """Elements whose output is clearly inside or outside the clamp (the mask is not ambiguous)."""
    if clamp is None:
        return torch.ones_like(y, dtype=torch.bool)
    return (y.abs() - clamp).abs() > 4 * TOL[dtype][1] * clamp


# (shape, dim): channels in the middle, on the last axis (changes every element), a 1-D
# tensor, sizes that are not multiples of the vector width, and a single element.
BIAS_ACT_SHAPES = [((3, 5, 7, 9), 1), ((4, 33), 1), ((2, 3, 13), 2), ((37,), 0),
                   ((2, 8, 4, 4), 1), ((1, 1, 1, 1), 3), ((5, 6, 7), 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,dim", BIAS_ACT_SHAPES)
def test_bias_act_forward_and_derivatives_match_float64_for_every_activation(shape, dim, act,
                                                                           dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dim, act)).encode()))
    x = _randn(shape, dtype, gen, scale=2.0)
    x.view(-1)[::7] = 0  # the kinks: first derivatives at exactly 0 take the z <= 0 branch
    b = _randn((shape[dim],), torch.float32, gen)
    dy = _randn(shape, dtype, gen)
    alpha, gain = 0.2, 1.7
    for bias in (None, b):
        for clamp in (None, 0.9):
            truth, y64 = _bias_act_truth(x, bias, dim, act, alpha, gain, clamp)
            keep = _away_from_clamp(y64, clamp, dtype)
            y = _cuda.bias_act_forward(x, bias, dim, act, alpha, gain, clamp)
            assert y.dtype == dtype and y.shape == x.shape
            _close(y[keep], truth[keep], dtype, what=f"forward bias={bias is not None} clamp={clamp}")
            for order in (1, 2):
                truth, _ = _bias_act_truth(x, bias, dim, act, alpha, gain, clamp, dy, order)
                dx = _cuda.bias_act_backward(dy, x, bias, dim, act, alpha, gain, clamp, order)
                _close(dx[keep], truth[keep], dtype, scale=4.0,
                       what=f"order {order} bias={bias is not None} clamp={clamp}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_act_handles_non_contiguous_and_misaligned_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _randn((4, 6, 5, 3), dtype, gen, contiguous=False).transpose(1, 3)  # [4, 3, 5, 6] view
    dy = _randn((4, 3, 5, 6), dtype, gen).transpose(2, 3).contiguous().transpose(2, 3)
    flat = _randn((1 + x.numel(),), dtype, gen)
    misaligned = flat[1:].view(x.shape)  # starts one element past a 16-byte boundary
    b = _randn((3,), dtype, gen)
    for inp in (x, misaligned):
        truth, _ = _bias_act_truth(inp, b, 1, "swish", 0.0, 1.4, None)
        _close(_cuda.bias_act_forward(inp, b, 1, "swish", 0.0, 1.4, None), truth, dtype)
        truth, _ = _bias_act_truth(inp, b, 1, "swish", 0.0, 1.4, None, dy, 2)
        _close(_cuda.bias_act_backward(dy, inp, b, 1, "swish", 0.0, 1.4, None, 2), truth, dtype,
               scale=4.0)


def _saturating_derivative64(act, z, order):
    """Closed forms that stay accurate in float64 where autograd's 1 - tanh(z)**2 would cancel."""
    sig = torch.sigmoid
    dsig = torch.exp(-z.abs()) / (1 + torch.exp(-z.abs())) ** 2
    first = {"tanh": 1 / torch.cosh(z) ** 2, "sigmoid": dsig, "softplus": sig(z),
             "swish": sig(z) * (1 + z * sig(-z))}
    second = {"tanh": -2 * torch.tanh(z) / torch.cosh(z) ** 2, "sigmoid": -dsig * torch.tanh(z / 2),
              "softplus": dsig, "swish": dsig * (2 - z * torch.tanh(z / 2))}
    return (first if order == 1 else second)[act]


def test_bias_act_saturating_derivatives_keep_their_relative_accuracy_for_large_inputs():
    z = torch.cat([torch.linspace(-30, -8, 2201), torch.linspace(8, 30, 2201)]).cuda()
    dy = torch.ones_like(z)
    for act in ("tanh", "sigmoid", "softplus", "swish"):
        for order in (1, 2):
            truth = _saturating_derivative64(act, z.double().cpu(), order)
            dx = _cuda.bias_act_backward(dy, z, None, 0, act, 0.0, 1.0, None, order)
            torch.testing.assert_close(dx.double().cpu(), truth, rtol=3e-5, atol=1e-37,
                                       msg=lambda m: f"{act} order {order}: {m}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 1.0])
def test_bias_act_keeps_a_nan_input_nan_as_torch_does(act, clamp):
    # fminf / fmaxf and 'z > 0 ? z : 0' turned a NaN (a diverging layer) into -clamp or 0,
    # hiding it from the training loop's non-finite check.
    z = torch.tensor([[float("nan"), 1.0, -1.0, float("inf"), -float("inf")]])
    y = _cuda.bias_act_forward(z.cuda(), None, 1, act, 0.2, 1.0, clamp).cpu()
    truth = _act64(act, z.double(), 0.2)
    if clamp is not None:
        truth = truth.clamp(-clamp, clamp)
    assert torch.equal(y.isnan(), truth.isnan()), (act, clamp, y, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clamp", [None, 0.9])
@pytest.mark.parametrize("act", ACTS)
def test_bias_act_nan_and_inf_in_inputs_and_gradients_follow_the_reference(act, clamp, dtype):
    # The Triton test's cases and rules (see tests/test_triton_bias_act.py), through ops.bias_act
    # with impl="cuda" against impl="ref" on the GPU. The kernel zeroed the gradient wherever the
    # clamp mask was off, a NaN z included (torch: 0 * act'(NaN) = NaN for the smooth
    # activations), took relu's derivative at a NaN z as 0 (torch passes dy) and multiplied a
    # NaN dy by relu's 0 (torch selects 0); its second derivative of linear, relu and lrelu was
    # NaN for a NaN ddx or dy (torch: exactly 0) and of elu / selu 1 at z = 0 (torch: 0).
    from tests.test_triton_bias_act import NONFINITE_CLAMP, check_nonfinite_values_follow_the_reference
    assert clamp in (None, NONFINITE_CLAMP)
    check_nonfinite_values_follow_the_reference("cuda", act, clamp, dtype, torch.device("cuda"))


def test_bias_act_rejects_a_bias_of_the_wrong_size_and_a_bad_activation():
    x = torch.zeros(2, 3, device="cuda")
    with pytest.raises(ValueError, match="b must be 1-D with x.shape"):
        _cuda.bias_act_forward(x, torch.zeros(4, device="cuda"), 1, "relu", 0.0, 1.0, None)
    with pytest.raises(ValueError, match="act must be one of"):
        _cuda.bias_act_forward(x, None, 1, "gelu", 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="act must be one of"):
        torch.ops.batikfast_cuda.bias_act_forward(x, None, 1, "gelu", 0.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        _cuda.bias_act_backward(x, x, None, 1, "relu", 0.0, 1.0, None, 3)


# ---- upfirdn2d -------------------------------------------------------------------------------

def _upfirdn2d_truth(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip, gain):
    """float64, straight from the definition: insert zeros, pad or crop, convolve, subsample."""
    x = x.detach().double().cpu()
    f = f.detach().double().cpu()
    n, c, h, w = x.shape
    u = x.new_zeros(n, c, h * upy, w * upx)
    u[:, :, ::upy, ::upx] = x
    u = F.pad(u, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    u = u[:, :, max(-pady0, 0):u.shape[2] - max(-pady1, 0), max(-padx0, 0):u.shape[3] - max(-padx1, 0)]
    kernel = f if flip else f.flip([0, 1])  # conv2d correlates; a true convolution flips
    y = F.conv2d(u.reshape(n * c, 1, u.shape[2], u.shape[3]), kernel[None, None])
    y = y.reshape(n, c, y.shape[2], y.shape[3])[:, :, ::downy, ::downx]
    return y * gain


# (x shape, filter shape, up (x, y), down (x, y), pad [x0, x1, y0, y1], flip, gain)
UPFIRDN_CASES = [
    # StyleGAN's separable passes (the specialised kernels), with odd sizes and extra padding.
    ((2, 3, 9, 11), (1, 4), (2, 1), (1, 1), [2, 1, 0, 0], False, 2.0),
    ((2, 3, 9, 11), (4, 1), (1, 2), (1, 1), [0, 0, 2, 1], False, 2.0),
    ((2, 3, 10, 13), (1, 4), (1, 1), (2, 1), [1, 1, 0, 0], False, 1.0),
    ((2, 3, 13, 10), (4, 1), (1, 1), (1, 2), [0, 0, 1, 1], True, 1.0),
    ((1, 5, 7, 300), (1, 4), (1, 1), (1, 1), [2, 1, 3, -2], False, 1.0),
    ((1, 5, 300, 7), (4, 1), (1, 1), (1, 1), [-1, 2, 2, 1], True, 0.5),
    ((3, 2, 70, 129), (1, 4), (2, 1), (1, 1), [-3, 5, 1, 0], False, 2.0),
    ((3, 2, 129, 70), (4, 1), (1, 2), (1, 1), [0, 0, 2, 1], False, 2.0),
    ((1, 2, 65, 200), (1, 4), (1, 1), (2, 1), [1, 1, -2, 3], False, 1.0),
    ((1, 2, 200, 65), (4, 1), (1, 1), (1, 2), [4, -1, 1, 1], False, 1.0),
    # General factors and filters (the runtime-parameter tiled kernel).
    ((2, 3, 8, 8), (4, 4), (2, 2), (1, 1), [2, 1, 2, 1], False, 4.0),
    ((2, 3, 16, 15), (4, 4), (1, 1), (2, 2), [1, 1, 1, 1], False, 1.0),
    ((1, 2, 11, 7), (3, 5), (3, 2), (2, 3), [-2, 4, 3, -1], False, 1.3),
    ((1, 2, 11, 7), (5, 3), (1, 3), (3, 1), [0, 0, 0, 0], True, 0.7),
    ((2, 1, 19, 23), (1, 1), (1, 1), (1, 1), [-3, -4, -5, -6], False, 1.0),
    ((1, 1, 6, 5), (7, 2), (4, 1), (1, 2), [6, 6, 1, 1], False, 1.0),
    ((1, 3, 40, 33), (12, 12), (1, 1), (4, 4), [5, 5, 5, 5], True, 1.0),
    ((1, 3, 33, 40), (1, 4), (2, 1), (1, 2), [2, 1, 0, 0], False, 2.0),
    # Filter window too large for shared memory: the direct kernel.
    ((1, 2, 70, 70), (33, 33), (1, 1), (16, 16), [0, 0, 0, 0], False, 1.0),
    ((1, 1, 20, 20), (40, 40), (3, 3), (1, 1), [0, 0, 0, 0], True, 1.0),
]


def _case_id(case):
    shape, fshape, up, down, pad, flip, gain = case
    return f"x{shape}-f{fshape}-up{up}-down{down}-pad{pad}-flip{int(flip)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UPFIRDN_CASES, ids=[_case_id(c) for c in UPFIRDN_CASES])
def test_upfirdn2d_matches_the_definition_for_any_factors_padding_and_filter(case, dtype):
    shape, fshape, (upx, upy), (downx, downy), pad, flip, gain = case
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    f = torch.rand(fshape, generator=gen).cuda() + 0.1
    f[0, -1] += 1.0  # asymmetric, so a missing or extra flip shows
    for contiguous in (True, False):
        x = _randn(shape, dtype, gen, contiguous=contiguous)
        y = _cuda.upfirdn2d(x, f, upx, upy, downx, downy, *pad, flip, gain)
        truth = _upfirdn2d_truth(x, f, upx, upy, downx, downy, *pad, flip, gain)
        assert y.shape == truth.shape and y.dtype == dtype
        scale = gain * f.abs().sum().item() * x.abs().max().item()
        _close(y, truth, dtype, scale=scale, what=f"contiguous={contiguous}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upfirdn2d_accepts_channels_last_input(dtype):
    gen = torch.Generator().manual_seed(3)
    x = _randn((2, 5, 12, 9), dtype, gen).to(memory_format=torch.channels_last)
    f = torch.tensor([[1.0, 3.0, 3.0, 1.0]], device="cuda") / 8
    for args in [(2, 1, 1, 1, 2, 1, 0, 0), (1, 1, 2, 1, 1, 1, 0, 0)]:
        y = _cuda.upfirdn2d(x, f, *args, False, 2.0)
        truth = _upfirdn2d_truth(x, f, *args, False, 2.0)
        _close(y, truth, dtype, scale=2.0 * x.abs().max().item())


def test_upfirdn2d_covers_more_planes_than_one_grid_dimension():
    gen = torch.Generator().manual_seed(4)
    x = _randn((2, 40000, 3, 3), torch.float32, gen)  # 80000 planes > 65535 grid rows
    f = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device="cuda")
    for ff, args in [(f, (2, 1, 1, 1, 2, 1, 0, 0)), (f.reshape(2, 2), (1, 1, 1, 1, 1, 0, 1, 1))]:
        y = _cuda.upfirdn2d(x, ff, *args, False, 1.0)
        scale = ff.abs().sum().item() * x.abs().max().item()
        _close(y, _upfirdn2d_truth(x, ff, *args, False, 1.0), torch.float32, scale=scale)


@pytest.mark.parametrize("fshape", [(1, 4), (4, 1), (3, 2)])
def test_upfirdn2d_takes_a_down_factor_far_larger_than_the_image(fshape):
    # Down factors past the image keep one output along that axis. (TW - 1) * down overflowed
    # int in the tile-window size (10**8), and factors past 2**31 were truncated to negative
    # ints: a negative or too small shared-memory window, read out of bounds.
    gen = torch.Generator().manual_seed(12)
    x = _randn((2, 3, 5, 7), torch.float32, gen)
    f = torch.rand(fshape, generator=gen).cuda() + 0.1
    pad = [1, 2, 2, 1]
    for up, down in [((1, 1), (10**8, 2)), ((1, 1), (2, 10**8)), ((2, 1), (10**8, 1)),
                     ((1, 1), (2**32 - 1, 2**32 - 1)), ((1, 2), (3 * 10**9, 1))]:
        y = _cuda.upfirdn2d(x, f, *up, *down, *pad, False, 1.0)
        truth = _upfirdn2d_truth(x, f, *up, *down, *pad, False, 1.0)
        assert y.shape == truth.shape, (up, down)
        scale = f.abs().sum().item() * x.abs().max().item()
        _close(y, truth, torch.float32, scale=scale, what=f"up {up} down {down}")


def test_upfirdn2d_rejects_an_empty_output_and_a_non_float32_filter():
    x = torch.zeros(1, 1, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="output would be empty"):
        _cuda.upfirdn2d(x, torch.ones(1, 4, device="cuda"), 1, 1, 1, 1, -2, -2, 0, 0, False, 1.0)
    with pytest.raises(TypeError, match="f must be one of float32"):
        _cuda.upfirdn2d(x, torch.ones(1, 4, device="cuda", dtype=torch.float16), 1, 1, 1, 1,
                        0, 0, 0, 0, False, 1.0)


# ---- diffusion_noise -------------------------------------------------------------------------

def _scales(n, gen):
    return (torch.rand(n, generator=gen) + 0.1).cuda(), (torch.rand(n, generator=gen) + 0.1).cuda()


def _per_sample(v, x):
    return v.double().cpu().reshape([-1] + [1] * (x.ndim - 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3), (5,), (2, 1, 1, 4), (2, 3, 64, 64)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), (2**63 - 1, 2**40 + 6)])
def test_diffusion_noise_draws_the_documented_philox_normals(shape, seed, offset, dtype):
    gen = torch.Generator().manual_seed(len(shape) + offset % 7)
    for contiguous in (True, False):
        x = _randn(shape, dtype, gen, contiguous=contiguous)
        x_scale, noise_scale = _scales(shape[0], gen)
        y = _cuda.diffusion_noise_forward(x, x_scale, noise_scale, None, seed, offset)
        eps = documented_eps(seed, offset, x.numel()).reshape(shape)
        truth = _per_sample(x_scale, x) * x.double().cpu() + _per_sample(noise_scale, x) * eps
        assert y.shape == x.shape and y.dtype == dtype
        _close(y, truth, dtype, scale=8.0, what=f"contiguous={contiguous}")


def test_diffusion_noise_draws_the_same_stream_as_the_triton_kernel():
    try:
        from batikfast.backends import triton_kernels

        triton_noise = triton_kernels("diffusion_noise")
    except Exception as error:  # noqa: BLE001 - any import problem means no comparison
        pytest.skip(f"the Triton diffusion_noise kernel is not importable: {error}")
    gen = torch.Generator().manual_seed(11)
    x = _randn((3, 3, 17, 19), torch.float32, gen)
    x_scale, noise_scale = _scales(3, gen)
    for seed, offset in [(5, 0), (2**40 + 1, 7)]:
        ours = _cuda.diffusion_noise_forward(x, x_scale, noise_scale, None, seed, offset)
        theirs = triton_noise.diffusion_noise_forward(x, x_scale, noise_scale, None, seed, offset)
        # Triton may lower log/sin/cos to the approximate hardware instructions.
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diffusion_noise_uses_given_noise_and_scales_alone_without_noise_scale(dtype):
    gen = torch.Generator().manual_seed(7)
    x = _randn((3, 4, 5, 7), dtype, gen, contiguous=False)
    noise = _randn((3, 4, 5, 7), dtype, gen)
    x_scale, noise_scale = _scales(3, gen)
    y = _cuda.diffusion_noise_forward(x, x_scale, noise_scale, noise, 1, 0)
    truth = _per_sample(x_scale, x) * x.double().cpu() + _per_sample(noise_scale, x) * noise.double().cpu()
    _close(y, truth, dtype, scale=4.0)
    y = _cuda.diffusion_noise_forward(x, x_scale, None, None, 1, 0)
    _close(y, _per_sample(x_scale, x) * x.double().cpu(), dtype, scale=4.0)


def test_diffusion_noise_is_reproducible_from_seed_and_offset():
    x = torch.zeros(1, 1000, device="cuda")
    ones = torch.ones(1, device="cuda")
    full = _cuda.diffusion_noise_forward(x, ones, ones, None, 42, 0)
    again = _cuda.diffusion_noise_forward(x, ones, ones, None, 42, 0)
    assert torch.equal(full, again)
    assert not torch.equal(full, _cuda.diffusion_noise_forward(x, ones, ones, None, 43, 0))
    for shift in (1, 2, 3, 5, 8):
        rest = _cuda.diffusion_noise_forward(x[:, shift:], ones, ones, None, 42, shift)
        assert torch.equal(rest, full[:, shift:]), f"offset {shift} does not continue the stream"


def test_diffusion_noise_is_standard_normal():
    x = torch.zeros(4, 2**18, device="cuda")
    ones = torch.ones(4, device="cuda")
    eps = _cuda.diffusion_noise_forward(x, ones, ones, None, 2024, 0).double()
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.std().item() - 1) < 5e-3
    assert abs(((eps > 1.959964).double().mean().item()) - 0.025) < 2e-3
    lag = (eps[:, 1:] * eps[:, :-1]).mean().item()  # neighbours share Philox calls
    assert abs(lag) < 5e-3


def test_diffusion_noise_rejects_per_sample_scales_of_the_wrong_shape():
    x = torch.zeros(3, 4, device="cuda")
    with pytest.raises(ValueError, match=r"x_scale must have shape \[3\]"):
        _cuda.diffusion_noise_forward(x, torch.ones(2, device="cuda"), None, None, 0, 0)
    with pytest.raises(TypeError, match="noise_scale must be one of float32"):
        _cuda.diffusion_noise_forward(x, torch.ones(3, device="cuda"),
                                      torch.ones(3, device="cuda", dtype=torch.float16), None, 0, 0)


# ---- beyond 32-bit indexing ------------------------------------------------------------------

def _needs_gib(gib):
    if not torch.cuda.is_available():
        return pytest.mark.skip(reason="needs a CUDA GPU")
    free, _ = torch.cuda.mem_get_info()
    return pytest.mark.skipif(free < gib * 2**30, reason=f"needs {gib} GiB of free GPU memory")


ROWS, COLS = 2**21 + 1, 1024  # 2**31 + 1024 elements: flat indices past int32


@pytest.mark.slow
@_needs_gib(20)
def test_bias_act_and_diffusion_noise_index_past_two_billion_elements():
    x = torch.zeros(ROWS, COLS, dtype=torch.float16, device="cuda")
    x[-1] = -1.0
    b = torch.linspace(0, 1, COLS, device="cuda")
    y = _cuda.bias_act_forward(x, b, 1, "lrelu", 0.2, 2.0, None)
    truth, _ = _bias_act_truth(x[-1:], b, 1, "lrelu", 0.2, 2.0, None)
    _close(y[-1:], truth, torch.float16, what="last row")
    del y
    ones = torch.ones(ROWS, device="cuda")
    y = _cuda.diffusion_noise_forward(x, ones, ones, None, 9, 0)
    eps = documented_eps(9, (ROWS - 1) * COLS, COLS)
    _close(y[-1], -1.0 + eps, torch.float16, scale=8.0, what="last row of noise")


@pytest.mark.slow
@_needs_gib(20)
def test_upfirdn2d_addresses_outputs_past_two_billion_elements():
    x = torch.zeros(2**18 + 3, 1, 64, 64, dtype=torch.float16, device="cuda")
    x[-1, 0, 10, 10] = 1.0
    f = torch.tensor([[1.0, 3.0, 3.0, 1.0]], device="cuda")
    y = _cuda.upfirdn2d(x, f, 2, 1, 1, 1, 2, 1, 0, 0, False, 1.0)
    assert y.numel() > 2**31
    truth = _upfirdn2d_truth(x[-1:], f, 2, 1, 1, 1, 2, 1, 0, 0, False, 1.0)
    torch.testing.assert_close(y[-1:].double().cpu(), truth, atol=0, rtol=0)
    assert y[:-1].count_nonzero().item() == 0
