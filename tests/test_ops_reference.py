"""The reference ops match independent float64 formulations written here, to every order.

The formulations below are deliberately different from batikfast's: explicit loops over taps
and samples, explicit piecewise activations, per-sample convolutions.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batikfast import ops

torch.set_printoptions(precision=6)
DOUBLE = torch.float64


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=DOUBLE):
    return torch.randn(*shape, generator=seeded(seed), dtype=dtype)


# ----------------------------------------------------------------------------- bias_act

def explicit_activation(z, act, alpha):
    sig = 1 / (1 + torch.exp(-z))
    table = {
        "linear": z,
        "relu": torch.where(z > 0, z, torch.zeros_like(z)),
        "lrelu": torch.where(z > 0, z, alpha * z),
        "tanh": (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
        "sigmoid": sig,
        "elu": torch.where(z > 0, z, torch.exp(z) - 1),
        "selu": 1.0507009873554805 * torch.where(z > 0, z, 1.6732632423543772 * (torch.exp(z) - 1)),
        "softplus": torch.log1p(torch.exp(z)),
        "swish": z * sig,
    }
    return table[act]


DEFAULT_GAIN = {"relu": math.sqrt(2), "lrelu": math.sqrt(2), "swish": math.sqrt(2)}


@pytest.mark.parametrize("act", list(ops.ACTIVATIONS))
@pytest.mark.parametrize("dim", [1, 0, 2, -1])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_bias_act_matches_the_explicit_formula_for_every_activation(act, dim, clamp):
    x = randn(3, 5, 4, seed=1) * 2
    b = randn(x.shape[dim], seed=2)
    y = ops.bias_act(x, b, dim=dim, act=act, clamp=clamp, impl="ref")
    shape = [1, 1, 1]
    shape[dim] = -1
    alpha = 0.2 if act == "lrelu" else 0.0
    expected = explicit_activation(x + b.reshape(shape), act, alpha) * DEFAULT_GAIN.get(act, 1.0)
    if clamp is not None:
        expected = expected.clamp(-clamp, clamp)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_bias_act_uses_the_given_alpha_gain_and_no_bias():
    x = randn(4, 6, seed=3)
    y = ops.bias_act(x, act="lrelu", alpha=0.1, gain=3.0, impl="ref")
    torch.testing.assert_close(y, torch.where(x > 0, x, 0.1 * x) * 3.0)


def test_bias_act_accepts_non_contiguous_input():
    x = randn(4, 6, 5, seed=4).transpose(1, 2)
    b = randn(5, seed=5)
    y = ops.bias_act(x, b, act="swish", impl="ref")
    expected = ops.bias_act(x.contiguous(), b, act="swish", impl="ref")
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("act", list(ops.ACTIVATIONS))
def test_bias_act_has_first_and_second_derivatives(act):
    x = (randn(2, 3, 3, seed=6) + 0.05).requires_grad_(True)
    b = randn(3, seed=7).requires_grad_(True)

    def f(x, b):
        return ops.bias_act(x, b, act=act, clamp=2.5, impl="ref")

    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))


# ----------------------------------------------------------------------------- upfirdn2d

def explicit_upfirdn2d(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """Loops over output pixels and taps, in numpy float64."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
    x = x.detach().double().numpy()
    f = f.double().numpy()
    if f.ndim == 1:
        f = np.outer(f, f)
        gain_f = gain
    else:
        gain_f = gain
    f = f * gain_f
    if not flip_filter:
        f = f[::-1, ::-1]
    n, c, h, w = x.shape
    up_img = np.zeros((n, c, h * upy, w * upx))
    up_img[:, :, ::upy, ::upx] = x
    big = np.zeros((n, c, h * upy + max(py0, 0) + max(py1, 0), w * upx + max(px0, 0) + max(px1, 0)))
    big[:, :, max(py0, 0):max(py0, 0) + h * upy, max(px0, 0):max(px0, 0) + w * upx] = up_img
    big = big[:, :, max(-py0, 0):big.shape[2] - max(-py1, 0), max(-px0, 0):big.shape[3] - max(-px1, 0)]
    fh, fw = f.shape
    out_h = (big.shape[2] - fh) // downy + 1
    out_w = (big.shape[3] - fw) // downx + 1
    out = np.zeros((n, c, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            window = big[:, :, oy * downy:oy * downy + fh, ox * downx:ox * downx + fw]
            out[:, :, oy, ox] = (window * f).sum(axis=(2, 3))
    return torch.from_numpy(out)


UPFIRDN_CASES = [
    # (up, down, padding, taps, separable)
    (1, 1, 0, 1, False),
    (2, 1, [2, 1], 4, True),
    (1, 2, [1, 1], 4, True),
    (2, 2, 1, 3, False),
    ([3, 1], [1, 2], [2, 0, 1, 3], 3, False),
    (1, 1, [-1, 0, 2, -2], 2, False),
    (4, 1, [3, 2], 5, True),
    (1, 3, [0, 0], 1, False),
    (1, 1, [1, 2, 0, 1], [2, 3], False),
]


@pytest.mark.parametrize("up,down,padding,taps,separable", UPFIRDN_CASES)
@pytest.mark.parametrize("flip_filter", [False, True])
def test_upfirdn2d_matches_explicit_loops_for_any_factors_padding_and_filter(
        up, down, padding, taps, separable, flip_filter):
    x = randn(2, 3, 5, 7, seed=8)
    if isinstance(taps, list):
        f = randn(*taps, seed=9).float()
    else:
        f = randn(taps, seed=9).float()
        if not separable:
            f = torch.outer(f, randn(taps, seed=10).float())
    y = ops.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter,
                      gain=1.7, impl="ref")
    up2 = up if isinstance(up, list) else [up, up]
    down2 = down if isinstance(down, list) else [down, down]
    pad4 = padding if isinstance(padding, list) and len(padding) == 4 else (
        [padding] * 4 if isinstance(padding, int) else [padding[0], padding[0], padding[1], padding[1]])
    expected = explicit_upfirdn2d(x, f, up2, down2, pad4, flip_filter, gain=1.7)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_upfirdn2d_output_size_follows_the_formula():
    x = randn(1, 1, 9, 6, seed=11)
    f = ops.setup_filter([1, 3, 3, 1])
    for up, down, pad in [(2, 1, 3), (1, 2, 1), (3, 2, [1, 2])]:
        y = ops.upfirdn2d(x, f, up=up, down=down, padding=pad, impl="ref")
        px = pad if isinstance(pad, int) else pad[0]
        py = pad if isinstance(pad, int) else pad[1]
        assert y.shape[2] == (9 * up + 2 * py - 4 + down) // down
        assert y.shape[3] == (6 * up + 2 * px - 4 + down) // down



@pytest.mark.parametrize("f", [[1, 3, 3, 1], [[1, 2, 1], [2, 4, 2]]], ids=["separable", "2d"])
def test_upfirdn2d_of_zero_channels_is_empty_with_the_formula_size(f):
    # conv2d refuses groups=0: the reference raised 'non-positive groups' (the kernels gave
    # the empty output).
    x = torch.zeros(2, 0, 5, 6, dtype=DOUBLE, requires_grad=True)
    f = torch.tensor(f, dtype=torch.float32)
    y = ops.upfirdn2d(x, f, up=2, down=[1, 2], padding=[1, 2, 0, 1], impl="ref")
    fh, fw = (f.shape[0], f.shape[-1])
    assert y.shape == (2, 0, (10 + 1 - fh + 2) // 2, 12 + 3 - fw + 1)
    assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_negative_gain_negates_the_output(separable):
    # gain ** (f.ndim / 2) of a separable filter is complex for gain < 0: its real part (~0)
    # was kept, so the output came out ~0 instead of negated.
    x = randn(1, 2, 4, 5, seed=13)
    f = ops.setup_filter([1, 3, 3, 1], separable=separable)
    y = ops.upfirdn2d(x, f, up=2, padding=1, gain=-2.0, impl="ref")
    expected = -2.0 * ops.upfirdn2d(x, f, up=2, padding=1, impl="ref")
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # The same gain given to setup_filter instead: a 2-D filter holds it; a separable one
    # cannot (its two passes cancel the sign) and returned a complex filter: now refused.
    if separable:
        with pytest.raises(ValueError, match="separable filter cannot carry a negative gain"):
            ops.setup_filter([1, 3, 3, 1], separable=True, gain=-2.0)
    else:
        g = ops.setup_filter([1, 3, 3, 1], gain=-2.0)
        torch.testing.assert_close(ops.upfirdn2d(x, g, up=2, padding=1, impl="ref"), expected,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gain", [float("inf"), float("nan"), True, "two", None])
def test_upfirdn2d_refuses_a_gain_that_is_not_a_finite_number(gain):
    # inf turned the zero padding into NaN in the reference and not in the polyphase kernels.
    with pytest.raises(ValueError, match="gain must be a finite number"):
        ops.upfirdn2d(randn(1, 1, 4, 4, seed=1), ops.setup_filter([1, 1]), gain=gain)
    with pytest.raises(ValueError, match="gain must be a finite number"):
        ops.setup_filter([1, 1], gain=gain)


def test_upfirdn2d_has_first_and_second_derivatives():
    x = randn(1, 2, 4, 5, seed=12).requires_grad_(True)
    f = ops.setup_filter([1, 2, 1])

    def g(x):
        return ops.upfirdn2d(x, f, up=2, down=[1, 2], padding=[1, 2, 0, 1], impl="ref")

    assert torch.autograd.gradcheck(g, (x,))
    assert torch.autograd.gradgradcheck(g, (x,))


def test_resampling_helpers_keep_a_constant_image_constant_inside():
    x = torch.ones(1, 1, 8, 8, dtype=DOUBLE)
    f = ops.setup_filter([1, 3, 3, 1])
    up = ops.upsample2d(x, f)
    down = ops.downsample2d(x, f)
    same = ops.filter2d(x, f)
    assert up.shape[2:] == (16, 16) and down.shape[2:] == (4, 4) and same.shape[2:] == (8, 8)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones_like(up[..., 2:-2, 2:-2]))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones_like(down[..., 1:-1, 1:-1]))
    torch.testing.assert_close(same[..., 2:-2, 2:-2], torch.ones_like(same[..., 2:-2, 2:-2]))


def test_setup_filter_normalises_flips_and_separates():
    f = ops.setup_filter([1, 2, 3])
    assert f.shape == (3, 3) and f.dtype == torch.float32
    torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    g = ops.setup_filter([1, 2, 3], flip_filter=True, gain=4)
    torch.testing.assert_close(g, f.flip([0, 1]) * 4)
    s = ops.setup_filter(list(range(1, 9)))
    assert s.ndim == 1 and s.shape[0] == 8


# ----------------------------------------------------------------------------- conv2d_resample

def explicit_conv2d_resample(x, w, f, up, down, padding, groups=1, flip_weight=True):
    """The definition: upfirdn2d up (gain up^2), convolve, upfirdn2d down."""
    fw = fh = 1 if f is None else f.shape[-1]
    px0, px1, py0, py1 = [padding] * 4 if isinstance(padding, int) else padding
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    f_up = f if up > 1 else torch.ones(1, 1)
    x = explicit_upfirdn2d(x, f_up, [up, up], [1, 1], [px0, px1, py0, py1], gain=up ** 2)
    if not flip_weight:
        w = w.flip([2, 3])
    x = F.conv2d(x, w.double(), groups=groups)
    if down > 1:
        x = explicit_upfirdn2d(x, f, [1, 1], [down, down], [0, 0, 0, 0])
    return x


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("groups,flip_weight,padding", [
    (1, True, 0), (1, False, 1), (2, True, 1),
    # Uneven and cropping padding without resampling filtered the image with f as well
    # (a smaller, blurred output).
    (1, True, [1, 0, 2, 1]), (1, True, [-1, 2, 0, 1])])
def test_conv2d_resample_matches_its_definition_on_every_path(kernel, up, down, groups,
                                                              flip_weight, padding):
    x = randn(2, 4, 6, 5, seed=13)
    w = randn(6, 4 // groups, kernel, kernel, seed=14)
    f = ops.setup_filter([1, 3, 3, 1]).double().float()
    y = ops.conv2d_resample(x, w, f=f, up=up, down=down, padding=padding, groups=groups,
                            flip_weight=flip_weight, impl="ref")
    expected = explicit_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("padding", [0, -1, [1, -2, 0, -1]])
def test_conv2d_resample_refuses_exactly_the_inputs_that_leave_no_output_pixel(kernel, up, down,
                                                                               padding):
    # Was torch's "Kernel size can't be greater than actual input size" on some paths, an
    # upfirdn2d padding error naming the wrong sizes on others.
    f = ops.setup_filter([1, 3, 3, 1]).double().float()
    w = randn(2, 2, kernel, kernel, seed=17)
    for size in range(1, 6):
        x = randn(1, 2, size, size + 1, seed=18)
        try:
            expected = explicit_conv2d_resample(x, w, f, up, down, padding)
            fits = expected.numel() > 0
        except (RuntimeError, ValueError):  # torch's refusals of the empty / negative size
            fits = False
        if fits:
            torch.testing.assert_close(ops.conv2d_resample(x, w, f=f, up=up, down=down,
                                                           padding=padding, impl="ref"),
                                       expected, rtol=1e-9, atol=1e-9)
        else:
            expect_error(ValueError, "leaves no output pixel", ops.conv2d_resample, x, w, f=f,
                         up=up, down=down, padding=padding, impl="ref")


def test_conv2d_resample_has_a_double_backward():
    x = randn(1, 2, 4, 4, seed=15).requires_grad_(True)
    w = randn(3, 2, 3, 3, seed=16).requires_grad_(True)
    f = ops.setup_filter([1, 3, 3, 1])

    def g(x, w):
        return ops.conv2d_resample(x, w, f=f, up=2, padding=1, impl="ref")

    assert torch.autograd.gradgradcheck(g, (x, w))


# ----------------------------------------------------------------------------- modulated_conv2d

def explicit_modulated_conv2d(x, weight, styles, noise, up, down, padding, f, demodulate,
                              flip_weight=True):
    """One sample at a time, with its own weights."""
    outs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / torch.sqrt(w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
        outs.append(explicit_conv2d_resample(x[n:n + 1], w, f, up, down, padding,
                                             flip_weight=flip_weight))
    y = torch.cat(outs)
    return y if noise is None else y + noise


@pytest.mark.parametrize("fused_modconv", [True, False])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("up,down,kernel", [(1, 1, 3), (2, 1, 3), (1, 2, 3), (1, 1, 1)])
def test_modulated_conv2d_matches_per_sample_convolutions(fused_modconv, demodulate, up, down,
                                                          kernel):
    x = randn(3, 5, 7, 6, seed=17)
    weight = randn(4, 5, kernel, kernel, seed=18)
    styles = randn(3, 5, seed=19) + 1
    f = ops.setup_filter([1, 3, 3, 1])
    padding = kernel // 2
    probe = explicit_modulated_conv2d(x, weight, styles, None, up, down, padding, f, demodulate)
    noise = randn(3, 1, *probe.shape[2:], seed=20)
    y = ops.modulated_conv2d(x, weight, styles, noise=noise, up=up, down=down, padding=padding,
                             resample_filter=f, demodulate=demodulate,
                             fused_modconv=fused_modconv, impl="ref")
    expected = explicit_modulated_conv2d(x, weight, styles, noise, up, down, padding, f, demodulate)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)



@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
def test_modulated_conv2d_of_an_empty_batch_is_empty(up, down):
    # fused_modconv ran a grouped convolution with groups = batch = 0: "groups must be an
    # int >= 1, got 0", an argument the caller never passed.
    x = torch.zeros(0, 2, 4, 4, requires_grad=True)
    y = ops.modulated_conv2d(x, randn(3, 2, 3, 3, seed=30).float(), torch.zeros(0, 2), up=up,
                             down=down, padding=1, resample_filter=ops.setup_filter([1, 1]),
                             fused_modconv=True, impl="ref")
    size = 4 * up // down
    assert y.shape == (0, 3, size, size)
    assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("fused_modconv", [True, False])
@pytest.mark.parametrize("shape", [(4, 4, 4), (2, 1, 3, 3), (1, 1, 1, 4, 4)])
def test_modulated_conv2d_refuses_noise_that_does_not_broadcast_to_the_output(fused_modconv,
                                                                             shape):
    # A mismatch was torch's "The size of tensor a must match ..." from the addition; a noise
    # of higher rank broadcast the output itself up to 5-D.
    x = torch.randn(2, 2, 4, 4)
    expect_error(ValueError, r"noise must broadcast to the output's shape \[2, 3, 4, 4\]",
                 ops.modulated_conv2d, x, torch.randn(3, 2, 3, 3), torch.ones(2, 2),
                 noise=torch.zeros(shape), padding=1, fused_modconv=fused_modconv, impl="ref")


@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (3, 2, 0, 0), (3, 2, 3, 0)])
def test_an_empty_convolution_weight_is_refused_naming_it(shape):
    # torch's convolution failed on it inside ('could not create a primitive descriptor',
    # 'expected weight to be at least 1 at dimension 0').
    x = torch.randn(1, 2, 4, 4)
    expect_error(ValueError, "weight must not be empty", ops.modulated_conv2d, x,
                 torch.zeros(shape), torch.ones(1, 2), padding=1, impl="ref")
    expect_error(ValueError, "w must not be empty", ops.conv2d_resample, x, torch.zeros(shape),
                 padding=1, impl="ref")

def test_modulated_conv2d_epilogue_equals_bias_act_after_the_convolution():
    x = randn(2, 3, 5, 5, seed=21)
    weight = randn(4, 3, 3, 3, seed=22)
    styles = randn(2, 3, seed=23)
    bias = randn(4, seed=24)
    y = ops.modulated_conv2d(x, weight, styles, padding=1, impl="ref", bias=bias, act="lrelu",
                             gain=0.7, clamp=0.3)
    conv = explicit_modulated_conv2d(x, weight, styles, None, 1, 1, 1, None, True)
    expected = explicit_activation(conv + bias.reshape(1, -1, 1, 1), "lrelu", 0.2)
    expected = (expected * 0.7).clamp(-0.3, 0.3)  # gain replaces the default, as in bias_act
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


def test_modulated_conv2d_in_fp16_stays_close_to_float64_despite_large_styles():
    x = randn(2, 8, 6, 6, seed=25)
    weight = randn(8, 8, 3, 3, seed=26)
    styles = randn(2, 8, seed=27) * 300
    expected = explicit_modulated_conv2d(x, weight, styles, None, 1, 1, 1, None, True)
    y = ops.modulated_conv2d(x.half(), weight.float(), styles.float(), padding=1, impl="ref")
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fused_modconv", [True, False])
def test_modulated_conv2d_has_a_double_backward_in_every_input(fused_modconv):
    x = randn(2, 3, 4, 4, seed=28).requires_grad_(True)
    weight = randn(2, 3, 3, 3, seed=29).requires_grad_(True)
    styles = (randn(2, 3, seed=30) + 1).requires_grad_(True)
    noise = randn(2, 1, 4, 4, seed=31).requires_grad_(True)

    def g(x, weight, styles, noise):
        return ops.modulated_conv2d(x, weight, styles, noise=noise, padding=1,
                                    fused_modconv=fused_modconv, impl="ref")

    assert torch.autograd.gradcheck(g, (x, weight, styles, noise))
    assert torch.autograd.gradgradcheck(g, (x, weight, styles, noise))


# ----------------------------------------------------------------------------- diffusion_noise

def linear_schedule(steps=10):
    betas = torch.linspace(1e-4, 2e-2, steps, dtype=DOUBLE)
    alpha_bar = torch.cat([torch.ones(1, dtype=DOUBLE), torch.cumprod(1 - betas, 0)])
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def test_diffusion_noise_with_given_noise_is_the_closed_form():
    sab, s1mab = linear_schedule()
    x = randn(4, 3, 5, 5, seed=32)
    noise = randn(4, 3, 5, 5, seed=33)
    t = torch.tensor([0, 3, 10, 7])
    y = ops.diffusion_noise(x, t, sab, s1mab, noise_std=0.05, noise=noise, impl="ref")
    expected = torch.stack([sab[k] * x[i] + s1mab[k] * 0.05 * noise[i] for i, k in enumerate(t)])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y[0], x[0])



@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_diffusion_noise_takes_steps_of_every_integer_dtype(dtype):
    # A uint8 t indexed the schedule as a boolean mask (with as many samples as steps: every
    # sample got a different step, silently); int8 / int16 ones raised IndexError.
    sab, s1mab = linear_schedule()
    x = torch.randn(len(sab), 3, dtype=DOUBLE)
    t = torch.ones(len(sab), dtype=torch.int64)
    expected = ops.diffusion_noise(x, t, sab, s1mab, noise=x, impl="ref")
    torch.testing.assert_close(
        ops.diffusion_noise(x, t.to(dtype), sab, s1mab, noise=x, impl="ref"), expected)


def test_diffusion_noise_refuses_a_boolean_seed_naming_seed():
    # True passed the int check: the fast paths took it as seed 1, the reference failed in
    # torch.Generator.manual_seed ('expected a long, but got bool').
    sab, s1mab = linear_schedule()
    expect_error(ValueError, "seed must be None or an int", ops.diffusion_noise,
                 torch.zeros(2, 3), torch.tensor([1, 2]), sab, s1mab, seed=True, impl="ref")

@pytest.mark.parametrize("noise_std", [None, -0.1, float("nan"), True, "0.05"])
def test_diffusion_noise_refuses_a_noise_std_that_is_not_a_finite_non_negative_number(noise_std):
    # None was torch's "float() argument must be ..."; -0.1 and NaN gave an answer.
    sab, s1mab = linear_schedule()
    expect_error(ValueError, "noise_std must be a finite number >= 0", ops.diffusion_noise,
                 torch.zeros(2, 3), torch.tensor([1, 2]), sab, s1mab, noise_std=noise_std,
                 impl="ref")


def test_diffusion_noise_is_reproducible_from_a_seed_and_varies_with_it():
    sab, s1mab = linear_schedule(1000)
    x = torch.zeros(64, 3, 16, 16)
    t = torch.full((64,), 1000)
    a = ops.diffusion_noise(x, t, sab.float(), s1mab.float(), noise_std=1.0, seed=5, impl="ref")
    b = ops.diffusion_noise(x, t, sab.float(), s1mab.float(), noise_std=1.0, seed=5, impl="ref")
    c = ops.diffusion_noise(x, t, sab.float(), s1mab.float(), noise_std=1.0, seed=6, impl="ref")
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = a / s1mab[1000].float()
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02


def test_diffusion_noise_gradient_scales_by_sqrt_alpha_bar():
    sab, s1mab = linear_schedule()
    x = randn(3, 2, 4, seed=34).requires_grad_(True)
    t = torch.tensor([1, 5, 9])
    y = ops.diffusion_noise(x, t, sab, s1mab, seed=0, impl="ref")
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, sab[t].reshape(3, 1, 1).expand_as(x).to(grad.dtype))


# ----------------------------------------------------------------------------- bad input

def expect_error(kind, pattern, fn, *args, **kwargs):
    with pytest.raises(kind, match=pattern):
        fn(*args, **kwargs)


def test_bad_arguments_raise_errors_that_name_the_argument():
    x = torch.randn(1, 2, 4, 4)
    f = ops.setup_filter([1, 1])
    expect_error(ValueError, "x must have rank 4", ops.upfirdn2d, torch.randn(2, 4, 4), f)
    expect_error(ValueError, "f must have rank", ops.upfirdn2d, x, torch.ones(1, 1, 2))
    expect_error(TypeError, "f must be float32", ops.upfirdn2d, x, f.double())
    expect_error(ValueError, "up must be >= 1", ops.upfirdn2d, x, f, up=0)
    expect_error(ValueError, "down must be >= 1", ops.upfirdn2d, x, f, down=[1, -2])
    expect_error(ValueError, "output would be empty", ops.upfirdn2d, x, f, padding=-2)
    expect_error(ValueError, "act must be one of", ops.bias_act, x, act="gelu")
    expect_error(ValueError, "b must have x.shape", ops.bias_act, x, torch.zeros(3))
    expect_error(ValueError, "dim must be an axis", ops.bias_act, x, torch.zeros(2), dim=4)
    expect_error(TypeError, "x must be a floating-point", ops.bias_act, x.long())
    expect_error(ValueError, "channels", ops.conv2d_resample, x, torch.randn(3, 3, 3, 3))
    expect_error(ValueError, "styles must have shape", ops.modulated_conv2d, x,
                 torch.randn(3, 2, 3, 3), torch.randn(2, 2))
    expect_error(ValueError, "weight expects 5 input channels", ops.modulated_conv2d, x,
                 torch.randn(3, 5, 3, 3), torch.randn(1, 2))
    sab, s1mab = linear_schedule()
    expect_error(ValueError, r"t must lie in \[0, 10\]", ops.diffusion_noise, x,
                 torch.tensor([11]), sab, s1mab)
    expect_error(TypeError, "t must be an integer", ops.diffusion_noise, x,
                 torch.tensor([1.0]), sab, s1mab)
    expect_error(ValueError, "noise must have x's shape", ops.diffusion_noise, x,
                 torch.tensor([1]), sab, s1mab, noise=torch.zeros(1, 2, 4))





@pytest.mark.parametrize("helper", ["filter2d", "upsample2d", "downsample2d"])
def test_resampling_helpers_refuse_a_non_tensor_x_naming_x(helper):
    # They checked the filter against x.device first: AttributeError "'list' object has no
    # attribute 'device'".
    expect_error(TypeError, "x must be a torch.Tensor", getattr(ops, helper), [[1.0, 2.0]],
                 ops.setup_filter([1, 1]))

@pytest.mark.parametrize("padding", [True, [True, 1], [0, 1, False, 2]])
def test_boolean_padding_is_refused_naming_padding(padding):
    # bool is an int subclass: True passed as padding 1 on the fast paths and failed inside
    # F.pad ("must be tuple of ints, but found element of type bool") in the reference.
    x = torch.randn(1, 2, 4, 4)
    expect_error(ValueError, "padding must be", ops.upfirdn2d, x, ops.setup_filter([1, 1]),
                 padding=padding, impl="ref")

@pytest.mark.parametrize("op", ["bias_act", "modulated_conv2d"])
def test_a_nan_clamp_is_refused_not_taken_as_a_clamp(op):
    # float("nan") < 0 is False, so a NaN clamp passed the check and clamped every output to NaN.
    x = torch.randn(1, 2, 4, 4)
    call = (lambda: ops.bias_act(x, torch.zeros(2), clamp=float("nan"))) if op == "bias_act" \
        else (lambda: ops.modulated_conv2d(x, torch.randn(3, 2, 3, 3), torch.ones(1, 2),
                                           padding=1, clamp=float("nan"), impl="ref"))
    expect_error(ValueError, "clamp must be None, -1 or >= 0", call)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to place tensors on two devices")
def test_tensors_on_different_devices_are_rejected():
    x = torch.randn(1, 2, 4, 4, device="cuda")
    expect_error(ValueError, "same device", ops.bias_act, x, torch.zeros(2))


def test_nvidia_code_switches_by_changing_its_ops_import_alone():
    """NVIDIA's networks call ops through their modules (``bias_act.bias_act(...)``); the same
    names imported from batikfast.ops.compat run those calls unchanged, on batikfast's ops."""
    from batikfast.ops.compat import bias_act, conv2d_resample, upfirdn2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=DOUBLE, generator=gen)
    b = torch.randn(3, dtype=DOUBLE, generator=gen)
    w = torch.randn(4, 3, 3, 3, dtype=DOUBLE, generator=gen)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    assert torch.equal(f, ops.setup_filter([1, 3, 3, 1]))
    gain = bias_act.activation_funcs["lrelu"].def_gain
    assert gain == pytest.approx(math.sqrt(2))
    assert torch.equal(bias_act.bias_act(x, b, act="lrelu", gain=gain),
                       ops.bias_act(x, b, act="lrelu", gain=gain))
    for name in ("upsample2d", "downsample2d", "filter2d"):
        assert torch.equal(getattr(upfirdn2d, name)(x, f), getattr(ops, name)(x, f))
    assert torch.equal(upfirdn2d.upfirdn2d(x, f, up=2, padding=1),
                       ops.upfirdn2d(x, f, up=2, padding=1))
    assert torch.equal(conv2d_resample.conv2d_resample(x, w, f, down=2, padding=1),
                       ops.conv2d_resample(x, w, f, down=2, padding=1))
