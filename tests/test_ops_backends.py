"""Every fast implementation (Triton, CUDA) matches the reference op: forward, gradients of every
input, and the double backward, on odd sizes, non-contiguous inputs, fp32 / fp16 / bf16.

Tolerances follow flash-attn's rule: against a float64 truth, the kernel's error may be at most
a small multiple of the reference op's own error in the same low precision (plus a floor scaled
to the output). modulated_conv2d's reference has two formulations (demodulation folded into
per-sample weights, or applied to the output as the fast kernels and NVIDIA's training path
do); in 16 bits their second derivatives differ in accuracy by up to ~10x, and the kernel is
held to the less accurate of the two. On a machine without a GPU the Triton kernels run in the
interpreter (TRITON_INTERPRET=1, set by conftest.py) and the CUDA tests skip, saying so.
"""
import contextlib

import pytest
import torch

from batikfast import backends, ops
from tests._support import (DEVICE, FAST_IMPLS as FAST, HAS_GPU, REPLAY, fresh_generator, rand,
                            require, schedule)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The convolution kernels multiply fp32 on tensor cores in TF32 (10-bit mantissa), as cuDNN
# does by default; the interpreter multiplies in full fp32.
TF32_FLOOR = 4e-3 if HAS_GPU else FLOOR[torch.float32]
OP_FILES = {"bias_act", "upfirdn2d", "modulated_conv2d", "diffusion_noise"}


def assert_matches_truth(fast, ref_lowp, truth, factor=4.0, what="output", tf32=False,
                         scale=None):
    """max|fast - truth| <= max(factor * max|ref_lowp - truth|, floor * scale).

    ``ref_lowp`` may be a list: the reference computed in several equally valid ways (the
    largest error counts). ``scale`` defaults to max|truth|."""
    refs = ref_lowp if isinstance(ref_lowp, (list, tuple)) else [ref_lowp]
    fast, truth = fast.double(), truth.double()
    assert fast.shape == truth.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    scale = (truth.abs().max().item() if scale is None else scale) or 1.0
    fast_err = (fast - truth).abs().max().item()
    ref_err = max((ref.double() - truth).abs().max().item() for ref in refs)
    floor = TF32_FLOOR if tf32 and _lowp_dtype == torch.float32 else FLOOR[_lowp_dtype]
    allowed = max(factor * ref_err, floor * scale)
    assert fast_err <= allowed, (f"{what}: kernel error {fast_err:.3g} > allowed {allowed:.3g} "
                                 f"(reference error {ref_err:.3g}, scale {scale:.3g})")


_lowp_dtype = torch.float32


@pytest.fixture(params=DTYPES, ids=["fp32", "fp16", "bf16"])
def dtype(request):
    global _lowp_dtype
    _lowp_dtype = request.param
    return request.param


def run_three_ways(fn, impl, inputs, dtype, upstream_seed=99, second_order=True,
                   upstream=None, other_references=()):
    """fn under impl, the reference in the same dtypes, and the reference in float64.

    ``upstream``: None for a fixed contiguous gradient of the output; else a function
    ``(shape, dtype) -> (leaf, gradient)`` making the gradient (any layout) from a leaf that
    requires grad, so that the second derivatives include the one with respect to the upstream
    gradient (how R1's penalty reaches the layers after the one being differentiated): with
    respect to the leaf and, where the gradient is a view of it, per element of the view.

    ``other_references``: more functions computing the same in another valid way, run on the
    reference in the same dtypes (results["other refs"])."""
    runs = [("fast", fn, impl, False), ("ref", fn, "ref", False), ("truth", fn, "ref", True)]
    runs += [(k, other, "ref", False) for k, other in enumerate(other_references)]
    results = {"other refs": []}
    for name, run_fn, run_impl, to_double in runs:
        leaves = [_fresh_leaf(t, to_double) for t in inputs]
        diff_leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        out = run_fn(*leaves, impl=run_impl)
        upstream_tensors = []
        if upstream is None:
            grad_out = rand(*out.shape, seed=upstream_seed, dtype=out.dtype)
        else:
            upstream_leaf, grad_out = upstream(out.shape, out.dtype)
            upstream_tensors = [upstream_leaf] + ([grad_out] if grad_out is not upstream_leaf
                                                  else [])
        first = torch.autograd.grad(out, diff_leaves, grad_out, create_graph=second_order)
        second = None
        if second_order:
            weights = [rand(*g.shape, seed=upstream_seed + 1 + k, dtype=g.dtype)
                       for k, g in enumerate(first)]
            total = sum((g.double() * w.double()).sum() for g, w in zip(first, weights))
            wrt = diff_leaves + upstream_tensors
            # Where no first derivative depends on an input (linear ops), there is no second.
            second = torch.autograd.grad(total, wrt, allow_unused=True) \
                if total.requires_grad else [None] * len(wrt)
        if isinstance(name, int):
            results["other refs"].append((out, first, second))
        else:
            results[name] = (out, first, second)
    return results


def _fresh_leaf(t, to_double):
    if not isinstance(t, torch.Tensor):
        return t
    value = t.detach().double() if to_double and t.is_floating_point() else t.detach()
    return value.requires_grad_(t.requires_grad)


def upstream_gradient(layout, seed, dtype):
    """An ``upstream`` for run_three_ways: the output's gradient, rounded to ``dtype``, laid
    out as a backward kernel may receive it: contiguous, strided (a view with a gap after every
    element) or broadcast (all strides 0: what ``out.sum()`` hands the backward)."""
    def make(shape, out_dtype):
        if layout == "broadcast":
            leaf = rand(1, seed=seed, dtype=dtype).reshape(()).to(out_dtype)
            leaf.requires_grad_(True)
            return leaf, leaf.expand(shape)
        if layout == "strided":
            leaf = rand(*shape[:-1], 2 * shape[-1], seed=seed, dtype=dtype).to(out_dtype)
            leaf.requires_grad_(True)
            return leaf, leaf[..., ::2]
        leaf = rand(*shape, seed=seed, dtype=dtype).to(out_dtype).requires_grad_(True)
        return leaf, leaf
    return make


def fresh_seed(*salt):
    """A seed for ``rand`` that changes every run (see tests/_support.py)."""
    return fresh_generator(*salt).initial_seed() % 2 ** 31


def strided(t):
    """The same values as a view with a gap after every element of the last axis."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def check_three_ways(results, names, tf32=False):
    """Forward, first and second derivatives of the fast run against the float64 truth, each
    allowed a multiple of the largest low-precision reference error (see assert_matches_truth)."""
    fast, truth = results["fast"], results["truth"]
    refs = [results["ref"]] + results.get("other refs", [])
    assert_matches_truth(fast[0], [r[0] for r in refs], truth[0], what="forward", tf32=tf32)
    for k, name in enumerate(names):
        assert_matches_truth(fast[1][k], [r[1][k] for r in refs], truth[1][k], what=f"d/d{name}",
                             tf32=tf32)
    if fast[2] is None:
        return
    upstream_names = ["the upstream gradient", "the upstream gradient, per element"]
    second_names = names + upstream_names[:len(truth[2]) - len(names)]
    for k, name in enumerate(second_names):
        c = truth[2][k]
        if c is None:
            continue
        a = torch.zeros_like(c) if fast[2][k] is None else fast[2][k]
        b = [torch.zeros_like(c) if r[2][k] is None else r[2][k] for r in refs]
        scale = _reduction_scale(c, truth[2][k + 1]) if name == upstream_names[0] and \
            len(second_names) > k + 1 else None
        assert_matches_truth(a, b, c, what=f"second derivative wrt {name}", tf32=tf32,
                             scale=scale)
    assert any(c is not None for c in truth[2]), "no second derivative was compared"


def _reduction_scale(leaf_grad, per_element_grad):
    """The scale of a leaf's gradient that sums ``k`` per-element terms (a broadcast upstream
    gradient: one scalar summing every output element's term). Each term carries its own
    rounding error, and independent errors add in quadrature: sqrt(k) * max|term|, not the
    sum's own size, which cancellation can make arbitrarily small. (The terms themselves are
    checked element by element.)"""
    if per_element_grad is None:
        return None
    terms_per_element = max(per_element_grad.numel() / max(leaf_grad.numel(), 1), 1.0)
    return max(leaf_grad.abs().max().item(),
               terms_per_element ** 0.5 * per_element_grad.abs().max().item())


def gap_midpoint(values, dtype, from_quantile):
    """A point no value comes near, above the given quantile: a clamp or an activation kink
    placed there cannot be crossed by low-precision rounding (the fused kernel, like NVIDIA's,
    reads the slope and the clamp mask off its rounded output)."""
    values = values.flatten().sort().values.double()
    scale = values.abs().max().item()
    needed = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype] * scale
    for k in range(int(len(values) * from_quantile), len(values) - 1):
        low, high = values[k].item(), values[k + 1].item()
        if high - low > needed:
            return torch.tensor((low + high) / 2)
    pytest.fail("no gap between the outputs to place a kink in; change the test's seed")


# ----------------------------------------------------------------------------- bias_act

@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("act", list(ops.ACTIVATIONS))
def test_bias_act_kernels_match_the_reference_to_second_order(impl, act, dtype):
    require(impl, "bias_act", dtype)
    x = rand(3, 7, 5, seed=1, dtype=dtype, scale=2).requires_grad_(True)
    b = rand(7, seed=2, dtype=dtype).requires_grad_(True)

    def fn(x, b, impl):
        return ops.bias_act(x, b, act=act, clamp=1.5, impl=impl)

    results = run_three_ways(fn, impl, [x, b], dtype,
                             upstream=upstream_gradient("contiguous", 99, dtype))
    check_three_ways(results, ["x", "b"])


@pytest.mark.parametrize("impl", FAST)
def test_bias_act_kernels_accept_non_contiguous_input_and_any_dim(impl, dtype):
    require(impl, "bias_act", dtype)
    x = rand(5, 6, 9, seed=3, dtype=dtype).transpose(1, 2)[:, ::2]
    b = rand(x.shape[2], seed=4, dtype=dtype)
    fast = ops.bias_act(x, b, dim=2, act="lrelu", impl=impl)
    ref = ops.bias_act(x, b, dim=2, act="lrelu", impl="ref")
    truth = ops.bias_act(x.double(), b.double(), dim=2, act="lrelu", impl="ref")
    assert_matches_truth(fast, ref, truth)



@pytest.mark.parametrize("impl", FAST)
def test_bias_act_casts_a_float64_bias_to_x_dtype_like_the_reference(impl):
    # The kernels take 16/32-bit tensors only: a float64 bias (documented as cast to x.dtype,
    # which the reference does) was refused by the kernel module with a TypeError.
    require(impl, "bias_act")
    x = rand(2, 3, 4, seed=5)
    b = rand(3, seed=6, dtype=torch.float64).requires_grad_(True)
    fast = ops.bias_act(x, b, act="lrelu", impl=impl)
    ref = ops.bias_act(x, b, act="lrelu", impl="ref")
    torch.testing.assert_close(fast, ref)
    (db,) = torch.autograd.grad(fast.sum(), b)
    assert db.dtype == torch.float64

@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("act", ["tanh", "lrelu", "linear"])
def test_bias_act_third_derivative_exists_on_the_fast_paths_too(impl, act):
    require(impl, "bias_act")
    x = rand(4, 3, seed=34, dtype=torch.float64).float().requires_grad_(True)

    def third(impl):
        value = ops.bias_act(x, act=act, impl=impl)
        for _ in range(3):
            if not value.requires_grad:  # a constant derivative: the next one is zero
                return torch.zeros_like(x)
            (value,) = torch.autograd.grad(value.sum(), x, create_graph=True, allow_unused=True)
            value = torch.zeros_like(x) if value is None else value
        return value

    torch.testing.assert_close(third(impl), third("ref"), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- upfirdn2d

UPFIRDN_CASES = [
    (2, 1, [2, 1], [1, 3, 3, 1]),
    (1, 2, [1, 1], [1, 3, 3, 1]),
    (1, 1, 1, "2d"),
    ([3, 1], [1, 2], [2, 0, 1, 3], [1, 2, 1]),
    (1, 1, [-1, 0, 2, -2], [1, 1]),
    (2, 2, 0, "2d"),
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("up,down,padding,taps", UPFIRDN_CASES)
@pytest.mark.parametrize("flip_filter", [False, True])
def test_upfirdn2d_kernels_match_the_reference_to_second_order(impl, up, down, padding, taps,
                                                               flip_filter, dtype):
    require(impl, "upfirdn2d", dtype)
    if taps == "2d":
        f = rand(3, 4, seed=5).float()
    else:
        f = ops.setup_filter(taps, device=DEVICE, separable=True)
    x = rand(2, 3, 7, 5, seed=6, dtype=dtype).requires_grad_(True)

    def fn(x, impl):
        return ops.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter,
                             gain=2.0, impl=impl)

    results = run_three_ways(fn, impl, [x], dtype,
                             upstream=upstream_gradient("contiguous", 99, dtype))
    check_three_ways(results, ["x"])



FILTER_GRADIENT_CASES = [  # (up, down, padding, taps, flip_filter, gain)
    (2, 1, [2, 1, 2, 1], "2d", False, 1.0),
    (1, 2, [1, 1, 0, -1], [1, 3, 3, 1], True, 1.0),
    ([2, 1], [1, 2], [0, 2, 1, 1], "2d", True, -1.5),
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("up,down,padding,taps,flip_filter,gain", FILTER_GRADIENT_CASES)
def test_upfirdn2d_kernels_give_a_filter_that_requires_grad_its_gradient_to_second_order(
        impl, up, down, padding, taps, flip_filter, gain, dtype):
    # The fast paths returned no gradient for the filter (None) where the reference gives one.
    require(impl, "upfirdn2d", dtype)
    if taps == "2d":
        f = rand(3, 4, seed=60).float()
    else:
        f = ops.setup_filter(taps, device=DEVICE, separable=True) + rand(4, seed=61).float() / 8
    x = rand(2, 3, 6, 5, seed=62, dtype=dtype).requires_grad_(True)
    f.requires_grad_(True)

    def fn(x, f, impl):
        # The truth's float64 filter, rounded back to float32 exactly (upfirdn2d takes float32).
        return ops.upfirdn2d(x, f.float(), up=up, down=down, padding=padding,
                             flip_filter=flip_filter, gain=gain, impl=impl)

    results = run_three_ways(fn, impl, [x, f], dtype)
    check_three_ways(results, ["x", "f"])


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", [(1, 2, 0, 3), (2, 1, 3, 0), (1, 1, 0, 0)])
def test_upfirdn2d_of_an_image_without_pixels_gives_the_padding_s_zeros(impl, shape):
    # Padding around an empty image leaves a zero output; the separable filter's first pass
    # (and the gradient) was an empty image the kernels refused ('leaves no output pixel').
    require(impl, "upfirdn2d")
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    f = torch.tensor([1.0, 2.0, 1.0], device=DEVICE)
    y = ops.upfirdn2d(x, f, up=2, padding=[2, 1, 3, 1], impl=impl)
    assert torch.equal(y, ops.upfirdn2d(x, f, up=2, padding=[2, 1, 3, 1], impl="ref"))
    assert torch.autograd.grad(y.sum(), x)[0].shape == shape


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_kernels_take_a_negative_gain(impl, separable):
    # The separable path ran each pass with gain ** 0.5: complex for gain < 0, which the
    # custom op refused with an internal 'Expected a value of type float' error.
    require(impl, "upfirdn2d")
    x = rand(1, 2, 4, 5, seed=7).requires_grad_(True)
    f = ops.setup_filter([1, 3, 3, 1], separable=separable, device=DEVICE)
    results = []
    for which in (impl, "ref"):
        y = ops.upfirdn2d(x, f, up=2, down=[1, 2], padding=1, gain=-1.5, impl=which)
        results.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("flip_filter", [None, 1, "yes", torch.tensor(True)])
def test_upfirdn2d_takes_flip_filter_by_its_truth_value_like_the_reference(impl, flip_filter):
    # The custom op's schema wants a bool: a truthy string failed deep in torch.library.
    require(impl, "upfirdn2d")
    x = rand(1, 2, 4, 5, seed=8)
    f = rand(3, 2, seed=9)
    fast = ops.upfirdn2d(x, f, flip_filter=flip_filter, impl=impl)
    torch.testing.assert_close(fast, ops.upfirdn2d(x, f, flip_filter=flip_filter, impl="ref"))

@pytest.mark.parametrize("impl", FAST)
def test_upfirdn2d_kernels_accept_non_contiguous_input(impl, dtype):
    require(impl, "upfirdn2d", dtype)
    x = rand(2, 4, 9, 6, seed=7, dtype=dtype).transpose(2, 3)[:, 1:3]
    f = ops.setup_filter([1, 3, 3, 1], device=DEVICE)
    fast = ops.upsample2d(x, f, impl=impl)
    ref = ops.upsample2d(x, f, impl="ref")
    truth = ops.upsample2d(x.double(), f, impl="ref")
    assert_matches_truth(fast, ref, truth)


# ----------------------------------------------------------------------------- modulated_conv2d

MODCONV_CASES = [
    # (kernel, up, demodulate, act, with noise, with bias, clamp)
    (3, 1, True, "lrelu", True, True, 0.8),
    (3, 1, True, "linear", False, False, None),
    (1, 1, False, "linear", False, True, None),
    (3, 1, False, "relu", True, True, None),
    (3, 2, True, "lrelu", True, True, 0.8),
    (3, 1, True, "swish", True, True, None),
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kernel,up,demodulate,act,with_noise,with_bias,clamp", MODCONV_CASES)
def test_modulated_conv2d_kernels_match_the_reference_to_second_order(
        impl, kernel, up, demodulate, act, with_noise, with_bias, clamp, dtype):
    require(impl, "modulated_conv2d", dtype)
    n, i, o_, h, w = 2, 5, 3, 5, 6
    x = rand(n, i, h, w, seed=8, dtype=dtype).requires_grad_(True)
    weight = rand(o_, i, kernel, kernel, seed=9).requires_grad_(True)
    styles = (rand(n, i, seed=10) + 1).requires_grad_(True)
    f = ops.setup_filter([1, 3, 3, 1], device=DEVICE)
    out_h, out_w = h * up, w * up
    noise = rand(n, 1, out_h, out_w, seed=11).requires_grad_(True) if with_noise else None
    bias = rand(o_, seed=12).requires_grad_(True) if with_bias else None

    def conv(x, weight, styles, noise, bias, impl, clamp, fused_modconv=True):
        return ops.modulated_conv2d(x, weight, styles, noise=noise, up=up,
                                    padding=kernel // 2, resample_filter=f,
                                    demodulate=demodulate, impl=impl, bias=bias, act=act,
                                    clamp=clamp, fused_modconv=fused_modconv)

    if act in ("relu", "lrelu"):
        # Keep every pre-activation clear of the kink, so rounding cannot flip a slope.
        with torch.no_grad():
            pre = ops.modulated_conv2d(*[_fresh_leaf(t, True) for t in (x, weight, styles, noise)],
                                       up=up, padding=kernel // 2, resample_filter=f,
                                       demodulate=demodulate, impl="ref")
        bias = torch.stack([-gap_midpoint(pre[:, o], dtype, 0.3) for o in range(o_)]).float()
        bias = bias.to(DEVICE).requires_grad_(True)
    if clamp is not None:
        with torch.no_grad():
            unclamped = conv(*[_fresh_leaf(t, True) for t in (x, weight, styles, noise, bias)],
                             impl="ref", clamp=None)
        clamp = gap_midpoint(unclamped.abs(), dtype, 0.6)

    def fn(x, weight, styles, noise, bias, impl):
        return conv(x, weight, styles, noise, bias, impl, clamp)

    def demodulating_the_output(x, weight, styles, noise, bias, impl):
        return conv(x, weight, styles, noise, bias, impl, clamp, fused_modconv=False)

    names = ["x", "weight", "styles"] + (["noise"] if with_noise else []) + (
        ["bias"] if with_bias else [])
    check_three_ways(run_three_ways(fn, impl, [x, weight, styles, noise, bias], dtype,
                                    other_references=[demodulating_the_output]),
                     names, tf32=True)


@pytest.mark.parametrize("impl", FAST)
def test_modulated_conv2d_style_and_weight_gradients_stay_accurate_under_large_noise_and_bias(
        impl, dtype):
    """The demodulation's gradient needs each output's convolution before noise and bias. Read
    back off a 16-bit output, where noise + bias outweigh it, that loses the convolution's low
    bits (the styles' gradient came out 10x less accurate than the reference's)."""
    require(impl, "modulated_conv2d", dtype)
    x = rand(2, 6, 4, 5, seed=50, dtype=dtype).requires_grad_(True)
    weight = rand(3, 6, 3, 3, seed=51).requires_grad_(True)
    styles = (rand(2, 6, seed=52) + 1).requires_grad_(True)
    noise = rand(2, 1, 4, 5, seed=53, scale=8)
    bias = rand(3, seed=54, scale=8)

    def fn(x, weight, styles, impl):
        return ops.modulated_conv2d(x, weight, styles, noise=noise, padding=1, impl=impl,
                                    bias=bias, gain=1.4)

    results = run_three_ways(fn, impl, [x, weight, styles], dtype, second_order=False)
    check_three_ways(results, ["x", "weight", "styles"], tf32=True)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("impl", FAST)
def test_fp32_modulated_conv2d_is_fp32_accurate_when_tf32_is_off_for_convolutions(
        impl, up, monkeypatch):
    """Training turns TF32 off (as NVIDIA's does); the kernels must then not use it either."""
    require(impl, "modulated_conv2d")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setitem(globals(), "_lowp_dtype", torch.float32)  # the tolerance's dtype
    # 216 products per output (24 channels x 9 taps) show TF32's 10-bit mantissa; few output
    # channels keep the interpreted up-sampling on the CPU short.
    x = rand(2, 24, 6, 7, seed=40).requires_grad_(True)
    weight = rand(5, 24, 3, 3, seed=41).requires_grad_(True)
    styles = (rand(2, 24, seed=42) + 1).requires_grad_(True)
    f = ops.setup_filter([1, 3, 3, 1], device=DEVICE)

    def fn(x, weight, styles, impl):
        return ops.modulated_conv2d(x, weight, styles, up=up, padding=1, resample_filter=f,
                                    impl=impl, act="lrelu", bias=None)

    results = run_three_ways(fn, impl, [x, weight, styles], torch.float32, second_order=False)
    check_three_ways(results, ["x", "weight", "styles"], tf32=False)



@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("shape", [(4, 4, 4), (1, 1, 1, 4, 4)])
def test_modulated_conv2d_kernels_refuse_noise_that_does_not_broadcast_to_the_output(impl, up,
                                                                                    shape):
    # Was torch's "The size of tensor a must match ..." (or a 5-D output for 5-D noise).
    require(impl, "modulated_conv2d")
    x = rand(2, 2, 4 // up, 4 // up, seed=10)
    with pytest.raises(ValueError, match="noise must broadcast to the output's shape"):
        ops.modulated_conv2d(x, rand(3, 2, 3, 3, seed=11), rand(2, 2, seed=12),
                             noise=torch.zeros(shape, device=DEVICE), up=up, padding=1,
                             resample_filter=ops.setup_filter([1, 1], device=DEVICE),
                             impl=impl)

@pytest.mark.parametrize("impl", FAST)
def test_modulated_conv2d_kernels_accept_non_contiguous_input(impl, dtype):
    require(impl, "modulated_conv2d", dtype)
    x = rand(2, 6, 7, 5, seed=13, dtype=dtype).transpose(2, 3)
    weight = rand(4, 6, 3, 3, seed=14)
    styles = rand(2, 6, seed=15) + 1
    fast = ops.modulated_conv2d(x, weight, styles, padding=1, impl=impl)
    ref = ops.modulated_conv2d(x, weight, styles, padding=1, impl="ref")
    truth = ops.modulated_conv2d(x.double(), weight.double(), styles.double(), padding=1,
                                 impl="ref")
    assert_matches_truth(fast, ref, truth, tf32=True)


# ----------------------------------------------------------------------------- diffusion_noise

@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_kernels_match_the_reference_with_given_noise(impl, dtype):
    require(impl, "diffusion_noise", dtype)
    sab, s1mab = schedule()
    x = rand(3, 3, 5, 7, seed=16, dtype=dtype).requires_grad_(True)
    noise = rand(3, 3, 5, 7, seed=17, dtype=dtype).requires_grad_(True)
    t = torch.tensor([0, 7, 20], device=DEVICE)

    def fn(x, noise, impl):
        return ops.diffusion_noise(x, t, sab, s1mab, noise_std=0.5, noise=noise, impl=impl)

    results = run_three_ways(fn, impl, [x, noise], dtype,
                             upstream=upstream_gradient("contiguous", 99, dtype))
    check_three_ways(results, ["x", "noise"])



@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_kernels_take_float64_noise_like_the_reference(impl):
    # The kernels take 16/32-bit noise: float64 noise (which the reference accepts) was a
    # TypeError from the kernel module.
    require(impl, "diffusion_noise")
    sab = torch.linspace(1, 0.1, 10, device=DEVICE)
    s1mab = (1 - sab.square()).sqrt()
    x = rand(2, 3, 4, seed=13)
    noise = rand(2, 3, 4, seed=14, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([2, 9], device=DEVICE)
    fast = ops.diffusion_noise(x, t, sab, s1mab, noise=noise, impl=impl)
    torch.testing.assert_close(fast, ops.diffusion_noise(x, t, sab, s1mab, noise=noise,
                                                         impl="ref"))
    assert torch.autograd.grad(fast.sum(), noise)[0].dtype == torch.float64


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_diffusion_noise_gives_float32_noise_under_a_16_bit_x_an_unrounded_gradient(impl,
                                                                                    x_dtype):
    # The reference computes in float32, so the noise's gradient is dy * scale in float32; the
    # fast paths computed it in x's dtype and rounded it (1 ulp of bf16 off).
    require(impl, "diffusion_noise", x_dtype)
    sab = torch.linspace(1, 0.1, 10, device=DEVICE)
    s1mab = (1 - sab.square()).sqrt()
    x = rand(2, 3, 5, seed=15, dtype=x_dtype)
    noise = rand(2, 3, 5, seed=16).requires_grad_(True)
    upstream = rand(2, 3, 5, seed=17, dtype=x_dtype)
    t = torch.tensor([3, 8], device=DEVICE)
    grads = [torch.autograd.grad(ops.diffusion_noise(x, t, sab, s1mab, noise_std=0.3,
                                                     noise=noise, impl=impl), noise,
                                 upstream)[0] for impl in (impl, "ref")]
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)

@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_kernels_draw_reproducible_standard_normal_noise(impl):
    require(impl, "diffusion_noise")
    sab, s1mab = schedule()
    x = torch.zeros(8, 3, 32, 33, device=DEVICE)
    t = torch.full((8,), 20, device=DEVICE)
    a = ops.diffusion_noise(x, t, sab, s1mab, noise_std=1.0, seed=11, impl=impl)
    b = ops.diffusion_noise(x, t, sab, s1mab, noise_std=1.0, seed=11, impl=impl)
    c = ops.diffusion_noise(x, t, sab, s1mab, noise_std=1.0, seed=12, impl=impl)
    assert torch.equal(a, b), "the same seed must give the same noise"
    assert not torch.equal(a, c), "different seeds must give different noise"
    eps = (a / s1mab[20]).double()
    assert abs(eps.mean().item()) < 0.03 and abs(eps.std().item() - 1) < 0.03
    # Neighbouring elements must not be correlated (a common counter-indexing mistake).
    flat = eps.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.03


@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_gradient_ignores_the_drawn_noise(impl):
    require(impl, "diffusion_noise")
    sab, s1mab = schedule()
    x = rand(4, 2, 3, 5, seed=18).requires_grad_(True)
    t = torch.tensor([1, 4, 9, 20], device=DEVICE)
    (grad,) = torch.autograd.grad(ops.diffusion_noise(x, t, sab, s1mab, seed=3, impl=impl).sum(), x)
    torch.testing.assert_close(grad, sab[t].reshape(4, 1, 1, 1).expand_as(x))


@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_kernels_give_the_schedules_their_gradient_to_second_order(impl, dtype):
    # The fast paths returned no gradient for the schedules where the reference gives one.
    require(impl, "diffusion_noise", dtype)
    sab, s1mab = schedule()
    sab, s1mab = sab.requires_grad_(True), s1mab.requires_grad_(True)
    x = rand(3, 2, 4, 5, seed=63, dtype=dtype).requires_grad_(True)
    noise = rand(3, 2, 4, 5, seed=64, dtype=dtype).requires_grad_(True)
    t = torch.tensor([3, 20, 3], device=DEVICE)  # two samples share a step

    def fn(x, noise, sab, s1mab, impl):
        return ops.diffusion_noise(x, t, sab, s1mab, noise_std=0.5, noise=noise, impl=impl)

    results = run_three_ways(fn, impl, [x, noise, sab, s1mab], dtype)
    check_three_ways(results, ["x", "noise", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"])


@pytest.mark.parametrize("impl", FAST)
def test_diffusion_noise_schedule_gradient_uses_the_noise_the_kernel_drew(impl):
    # The drawn eps is not stored: the backward draws it again from the seed. Its gradient
    # must equal the one computed with that eps handed over as noise.
    require(impl, "diffusion_noise")
    sab, s1mab = schedule()
    x = rand(3, 2, 4, 5, seed=65)
    t = torch.tensor([3, 20, 7], device=DEVICE)
    upstream = rand(3, 2, 4, 5, seed=66)
    ones = torch.ones(21, device=DEVICE)
    eps = ops.diffusion_noise(torch.zeros_like(x), t, ones, ones, noise_std=1.0, seed=9,
                              impl=impl)
    grads = []
    for noise, seed in ((None, 9), (eps, None)):
        leaf = s1mab.clone().requires_grad_(True)
        y = ops.diffusion_noise(x, t, sab, leaf, noise_std=0.7, noise=noise, seed=seed,
                                impl=impl)
        grads.append(torch.autograd.grad(y, leaf, upstream)[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fresh inputs, any layout

# Inputs drawn afresh every run, non-contiguous, with the output's gradient strided or
# broadcast, to second order including the derivative with respect to that gradient. Smooth
# activations only and no clamp: fresh values cannot be kept clear of kinks (the tests above
# place them, on fixed inputs).
LAYOUTS = ["strided", "broadcast"]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["swish", "tanh"])
def test_bias_act_kernels_match_on_fresh_strided_inputs_with_any_upstream_layout(
        impl, act, layout, dtype):
    require(impl, "bias_act", dtype)
    seed = fresh_seed("bias_act", act, layout, str(dtype))
    x = strided(rand(5, 3, 7, seed=seed, dtype=dtype, scale=2)).transpose(0, 2)
    b = strided(rand(3, seed=seed + 1, dtype=dtype))
    x.requires_grad_(True), b.requires_grad_(True)

    def fn(x, b, impl):
        return ops.bias_act(x, b, act=act, gain=1.3, impl=impl)

    results = run_three_ways(fn, impl, [x, b], dtype, upstream_seed=seed + 2,
                             upstream=upstream_gradient(layout, seed + 3, dtype))
    with _replay_note():
        check_three_ways(results, ["x", "b"])


FRESH_UPFIRDN_CASES = [  # (up, down, padding, taps, upstream layout)
    (2, 1, [2, 1, 1, 2], [1, 3, 3, 1], "strided"),
    ([1, 2], 2, [1, 0, 2, -1], "2d", "broadcast"),
]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("up,down,padding,taps,layout", FRESH_UPFIRDN_CASES)
def test_upfirdn2d_kernels_match_on_fresh_strided_inputs_with_any_upstream_layout(
        impl, up, down, padding, taps, layout, dtype):
    require(impl, "upfirdn2d", dtype)
    seed = fresh_seed("upfirdn2d", up, down, layout, str(dtype))
    if taps == "2d":
        f = rand(3, 4, seed=seed).float()
    else:
        f = ops.setup_filter(taps, device=DEVICE, separable=True)
    x = strided(rand(2, 5, 3, 6, seed=seed + 1, dtype=dtype)).transpose(1, 3)
    x.requires_grad_(True)

    def fn(x, impl):
        return ops.upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.5, impl=impl)

    results = run_three_ways(fn, impl, [x], dtype, upstream_seed=seed + 2,
                             upstream=upstream_gradient(layout, seed + 3, dtype))
    with _replay_note():
        check_three_ways(results, ["x"])


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_modulated_conv2d_kernels_match_on_fresh_strided_inputs_with_any_upstream_layout(
        impl, layout, dtype):
    """The single-pass kernel's path: 3x3, stride 1, demodulated, noise, bias, gain."""
    require(impl, "modulated_conv2d", dtype)
    seed = fresh_seed("modulated_conv2d", layout, str(dtype))
    x = strided(rand(2, 6, 5, 4, seed=seed, dtype=dtype)).transpose(2, 3)
    weight = strided(rand(6, 3, 3, 3, seed=seed + 1)).transpose(0, 1)
    styles = strided(rand(2, 6, seed=seed + 2) + 1)
    noise = strided(rand(2, 1, 4, 5, seed=seed + 3))
    bias = strided(rand(3, seed=seed + 4))
    for t in (x, weight, styles, noise, bias):
        t.requires_grad_(True)

    def fn(x, weight, styles, noise, bias, impl, fused_modconv=True):
        return ops.modulated_conv2d(x, weight, styles, noise=noise, padding=1, impl=impl,
                                    bias=bias, gain=1.4, fused_modconv=fused_modconv)

    def demodulating_the_output(*args, impl):
        return fn(*args, impl=impl, fused_modconv=False)

    results = run_three_ways(fn, impl, [x, weight, styles, noise, bias], dtype,
                             upstream_seed=seed + 5,
                             upstream=upstream_gradient(layout, seed + 6, dtype),
                             other_references=[demodulating_the_output])
    with _replay_note():
        check_three_ways(results, ["x", "weight", "styles", "noise", "bias"], tf32=True)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusion_noise_kernels_match_on_fresh_strided_inputs_with_any_upstream_layout(
        impl, layout, dtype):
    require(impl, "diffusion_noise", dtype)
    seed = fresh_seed("diffusion_noise", layout, str(dtype))
    sab, s1mab = schedule()
    x = strided(rand(3, 5, 2, 7, seed=seed, dtype=dtype)).transpose(1, 3)
    noise = strided(rand(3, 7, 2, 5, seed=seed + 1, dtype=dtype))
    t = torch.randint(0, 21, (3,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    x.requires_grad_(True), noise.requires_grad_(True)

    def fn(x, noise, impl):
        return ops.diffusion_noise(x, t, sab, s1mab, noise_std=0.7, noise=noise, impl=impl)

    results = run_three_ways(fn, impl, [x, noise], dtype, upstream_seed=seed + 2,
                             upstream=upstream_gradient(layout, seed + 3, dtype))
    with _replay_note():
        check_three_ways(results, ["x", "noise"])


@contextlib.contextmanager
def _replay_note():
    """A failure on fresh inputs says how to replay them."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{error}\n({REPLAY})") from None


# ----------------------------------------------------------------------------- refusals

def _op_calls(dtype):
    """One call per op on CPU tensors of ``dtype``: op name -> call(impl)."""
    x = torch.zeros(2, 3, 5, 4, dtype=dtype)
    sab, s1mab = (s.cpu() for s in schedule())
    f = ops.setup_filter([1, 3, 3, 1])
    return {
        "bias_act": lambda impl: ops.bias_act(x, torch.zeros(3, dtype=dtype), impl=impl),
        "upfirdn2d": lambda impl: ops.upsample2d(x, f, impl=impl),
        "modulated_conv2d": lambda impl: ops.modulated_conv2d(
            x, torch.ones(4, 3, 3, 3, dtype=dtype), torch.ones(2, 3, dtype=dtype), padding=1,
            impl=impl),
        "diffusion_noise": lambda impl: ops.diffusion_noise(x, torch.tensor([1, 2]), sab, s1mab,
                                                            seed=1, impl=impl),
    }


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("op_name", sorted(OP_FILES))
def test_fast_ops_asked_by_name_refuse_what_they_cannot_run_saying_why(impl, op_name,
                                                                       monkeypatch):
    """float64, and CPU tensors (Triton without its interpreter; CUDA always): one clear error
    naming the op, the reason and the way out, never a kernel failure."""
    with pytest.raises(backends.BackendUnavailableError,
                       match=rf"{op_name}: implementation '{impl}' cannot run") as refused:
        _op_calls(torch.float64)[op_name](impl)
    # The CUDA backend names the CPU tensors first (these are); Triton names the dtype first.
    assert ("float32, float16 and bfloat16" if impl == "triton" else "needs CUDA tensors") \
        in str(refused.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expected = "TRITON_INTERPRET=1" if impl == "triton" else "needs CUDA tensors"
    with pytest.raises(backends.BackendUnavailableError, match=expected):
        _op_calls(torch.float32)[op_name](impl)


# ----------------------------------------------------------------------------- registration

def _custom_op_samples():
    sab, s1mab = schedule()
    x4 = rand(2, 3, 5, 4, seed=19)
    yield "bias_act", torch.ops.batikfast.bias_act.default, (
        rand(2, 3, 4, seed=20).requires_grad_(True), rand(3, seed=21), 1, "lrelu", 0.2, 1.4, 0.9)
    yield "upfirdn2d", torch.ops.batikfast.upfirdn2d.default, (
        x4.clone().requires_grad_(True), ops.setup_filter([1, 3, 3, 1], device=DEVICE),
        2, 2, 1, 1, 2, 1, 2, 1, False, 4.0)
    yield "modulated_conv2d", torch.ops.batikfast.modulated_conv2d.default, (
        x4.clone().requires_grad_(True), rand(4, 3, 3, 3, seed=22), rand(2, 3, seed=23) + 1,
        rand(2, 4, seed=24).abs() + 0.5, rand(2, 1, 5, 4, seed=25), rand(4, seed=26), "lrelu",
        0.2, 1.4, -1.0, 1)
    yield "diffusion_noise", torch.ops.batikfast.diffusion_noise.default, (
        x4.clone().requires_grad_(True), sab[:2].contiguous(), s1mab[:2].contiguous(),
        rand(2, 3, 5, 4, seed=27), torch.tensor(5))


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("op_name", ["bias_act", "upfirdn2d", "modulated_conv2d", "diffusion_noise"])
def test_custom_ops_pass_torch_library_opcheck(impl, op_name):
    require(impl, op_name)
    for name, op, args in _custom_op_samples():
        if name == op_name:
            torch.library.opcheck(op, args + (impl,))


@pytest.mark.parametrize("impl", FAST)
def test_ops_compile_with_fullgraph_and_no_graph_break(impl):
    for op in OP_FILES:
        require(impl, op)
    torch._dynamo.reset()
    sab, s1mab = schedule()
    f = ops.setup_filter([1, 3, 3, 1], device=DEVICE)
    weight = rand(4, 3, 3, 3, seed=28)

    def block(x, styles, t):
        y = ops.modulated_conv2d(x, weight, styles, padding=1, impl=impl, bias=None, act="lrelu")
        y = ops.upfirdn2d(y, f, up=2, padding=[2, 1], gain=4, impl=impl)
        y = ops.bias_act(y, act="lrelu", impl=impl)
        return ops.diffusion_noise(y, t, sab, s1mab, seed=1, impl=impl)

    x = rand(2, 3, 5, 5, seed=29).requires_grad_(True)
    styles = rand(2, 3, seed=30) + 1
    t = torch.tensor([3, 9], device=DEVICE)
    # Inductor on the CPU too: it generates C++ around the ops, and checks their fake strides.
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    out = compiled(x, styles, t)
    torch.testing.assert_close(out, block(x, styles, t), rtol=TF32_FLOOR, atol=TF32_FLOOR)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", FAST)
def test_compiled_bias_act_keeps_working_on_channels_last_and_transposed_inputs(impl):
    """The fake implementation must promise the strides the kernel really returns (the Triton
    kernel keeps a dense input's layout); inductor checks them at run time."""
    require(impl, "bias_act")
    torch._dynamo.reset()
    b = rand(3, seed=34)
    layouts = {"channels-last": rand(2, 3, 4, 5, seed=35).contiguous(
                   memory_format=torch.channels_last),
               "transposed": rand(2, 5, 4, 3, seed=36).transpose(1, 3),
               "strided slice": rand(2, 3, 8, 5, seed=37)[:, :, ::2]}

    def layer(x):
        return ops.bias_act(x, b, act="lrelu", clamp=0.8, impl=impl) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="inductor", dynamic=False)
    for name, x in layouts.items():
        x = x.requires_grad_(True)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        expected = layer(x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(out, expected, msg=name)
        torch.testing.assert_close(grad, expected_grad, msg=name)


@pytest.mark.parametrize("impl", FAST)
def test_ops_work_under_torch_func_grad(impl):
    for op in OP_FILES:
        require(impl, op)
    weight = rand(4, 3, 3, 3, seed=31)
    x = rand(2, 3, 5, 5, seed=32)
    styles = rand(2, 3, seed=33) + 1

    def loss(styles, impl):
        y = ops.modulated_conv2d(x, weight, styles, padding=1, impl=impl, act="lrelu")
        return ops.bias_act(y, act="tanh", impl=impl).square().sum()

    fast = torch.func.grad(loss)(styles, impl)
    ref = torch.func.grad(loss)(styles, "ref")
    tolerance = 10 * TF32_FLOOR if HAS_GPU else 1e-3
    torch.testing.assert_close(fast, ref, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: checks that a host t causes no "
                    "device sync")
@pytest.mark.parametrize("impl", ["ref"] + FAST)
def test_diffusion_noise_takes_steps_drawn_on_the_host_without_waiting_for_the_gpu(impl):
    require(impl, "diffusion_noise")
    sab, s1mab = schedule()
    x = rand(4, 3, 8, 9, seed=18, dtype=torch.float32)
    host_t = torch.tensor([0, 3, 20, 11])
    on_device = ops.diffusion_noise(x, host_t.to(DEVICE), sab, s1mab, seed=3, impl=impl)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        from_host = ops.diffusion_noise(x, host_t, sab, s1mab, seed=3, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(from_host, on_device)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 20\]"):
        ops.diffusion_noise(x, torch.tensor([0, 3, 21, 11]), sab, s1mab, seed=3, impl=impl)


@pytest.mark.parametrize("impl", FAST)
def test_compiled_diffusion_noise_of_gpu_images_takes_steps_drawn_on_the_host(impl):
    """Dynamo traces GPU code on fake CUDA tensors (which need no GPU); fake tensors cannot be
    pinned, so the host t's pinned copy must stay out of compiled code."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = torch.device("cuda")
    reason = backends.unavailable_reason(impl, gpu, torch.float16)
    if reason is not None:
        pytest.skip(f"{impl} cannot run on a GPU here: {reason}")
    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, 5, 4, device=gpu, dtype=torch.float16)
        sab, s1mab = (s.to(gpu) for s in schedule())
        host_t = torch.tensor([3, 9])

    def noise(x, t):
        return ops.diffusion_noise(x, t, sab, s1mab, seed=1, impl=impl)

    graph = torch._dynamo.export(noise)(x, host_t).graph_module.graph
    assert torch.ops.batikfast.diffusion_noise.default in {node.target for node in graph.nodes}
