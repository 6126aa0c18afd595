"""Property-based: any argument combination either gives the reference's answer or a clear error.

Hypothesis draws shapes, factors, paddings, filters and dtypes, including edge sizes (1x1
images, one channel, batch 1). The reference is checked against explicit loops; each fast
implementation that can run here is checked against the reference.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batikfast import ops
from tests._support import DEVICE, HAS_GPU, require
from tests.test_ops_reference import explicit_upfirdn2d

# A unit in the last place, relative to the output's largest value; two in bf16, which
# Triton's interpreter truncates to instead of rounding (a GPU rounds to nearest).
ULP = {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -6}
FAST_EXAMPLES = 60 if HAS_GPU else int(__import__("os").environ.get("FAST_EXAMPLES", 15))  # the Triton interpreter is slow on the CPU

factor = st.integers(1, 3)
pad = st.integers(-3, 4)


@st.composite
def upfirdn2d_calls(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)),
             draw(st.integers(1, 9)))
    separable = draw(st.booleans())
    taps = draw(st.integers(1, 4))
    fshape = (taps,) if separable else (taps, draw(st.integers(1, 4)))
    return dict(shape=shape, fshape=fshape, up=[draw(factor), draw(factor)],
                down=[draw(factor), draw(factor)], padding=[draw(pad) for _ in range(4)],
                flip_filter=draw(st.booleans()), gain=draw(st.sampled_from([1.0, 0.5, 3.0])),
                seed=draw(st.integers(0, 2 ** 31)))


def make_inputs(call, dtype=torch.float64):
    g = torch.Generator().manual_seed(call["seed"])
    x = torch.randn(call["shape"], generator=g, dtype=torch.float64)
    f = torch.randn(call["fshape"], generator=g, dtype=torch.float64).float()
    return x.to(DEVICE, dtype), f.to(DEVICE)


def output_is_empty(call):
    x_shape, f_shape = call["shape"], call["fshape"]
    fw = f_shape[-1]
    fh = f_shape[0]
    (upx, upy), (px0, px1, py0, py1) = call["up"], call["padding"]
    return x_shape[3] * upx + px0 + px1 < fw or x_shape[2] * upy + py0 + py1 < fh


def run(call, x, f, impl):
    return ops.upfirdn2d(x, f, up=call["up"], down=call["down"], padding=call["padding"],
                         flip_filter=call["flip_filter"], gain=call["gain"], impl=impl)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upfirdn2d_calls())
def test_reference_upfirdn2d_equals_explicit_loops_or_refuses_empty_outputs(call):
    x, f = make_inputs(call)
    if output_is_empty(call):
        with pytest.raises(ValueError, match="output would be empty"):
            run(call, x, f, "ref")
        return
    expected = explicit_upfirdn2d(x.cpu(), f.cpu(), call["up"], call["down"], call["padding"],
                                  call["flip_filter"], call["gain"])
    torch.testing.assert_close(run(call, x, f, "ref").cpu(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_fast_upfirdn2d_equals_the_reference_for_any_arguments(impl, dtype):
    require(impl, "upfirdn2d", dtype)

    @settings(max_examples=FAST_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(upfirdn2d_calls())
    def check(call):
        if output_is_empty(call):
            return
        x, f = make_inputs(call, dtype)
        fast = run(call, x, f, impl).double()
        same_dtype = run(call, x, f, "ref").double()
        truth = run(call, x.double(), f, "ref")
        # flash-attn's rule: at most 4x the reference's own error in the same dtype, or a
        # unit in the last place of the output's scale.
        scale = truth.abs().max().item() or 1.0
        allowed = max(4 * (same_dtype - truth).abs().max().item(), ULP[dtype] * scale)
        error = (fast - truth).abs().max().item()
        assert error <= allowed, f"{call}: error {error:.3g} > allowed {allowed:.3g}"

    check()


@st.composite
def bias_act_calls(draw):
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 6)) for _ in range(rank)]
    return dict(shape=shape, dim=draw(st.integers(0, rank - 1)),
                act=draw(st.sampled_from(sorted(ops.ACTIVATIONS))),
                with_bias=draw(st.booleans()),
                clamp=draw(st.sampled_from([None, -1, 0.0, 0.3, 2.0])),
                gain=draw(st.sampled_from([None, 0.5, 2.0])), seed=draw(st.integers(0, 2 ** 31)))


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_fast_bias_act_equals_the_reference_for_any_rank_axis_and_options(impl):
    require(impl, "bias_act")

    @settings(max_examples=FAST_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(bias_act_calls())
    def check(call):
        g = torch.Generator().manual_seed(call["seed"])
        x = (torch.randn(call["shape"], generator=g) * 2).to(DEVICE)
        b = torch.randn(call["shape"][call["dim"]], generator=g).to(DEVICE) \
            if call["with_bias"] else None
        kwargs = dict(dim=call["dim"], act=call["act"], gain=call["gain"], clamp=call["clamp"])
        fast = ops.bias_act(x, b, impl=impl, **kwargs)
        ref = ops.bias_act(x.double(), None if b is None else b.double(), impl="ref", **kwargs)
        torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)

    check()


# ----------------------------------------------------------------- regressions found by fuzzing

@pytest.mark.parametrize("impl", ["ref", "triton", "cuda"])
def test_bias_act_on_a_1d_x_gives_the_bias_its_per_element_gradient(impl):
    # The fast paths summed the bias gradient over "every axis but dim" with sum(dim=[]), which
    # sums over every axis: a scalar, refused by autograd for a [C] bias.
    require(impl, "bias_act")
    x = torch.linspace(-2, 2, 7, device=DEVICE, requires_grad=True)
    b = torch.linspace(1, -1, 7, device=DEVICE, requires_grad=True)
    y = ops.bias_act(x, b, dim=0, act="sigmoid", impl=impl)
    dy = torch.arange(7.0, device=DEVICE)
    dx, db = torch.autograd.grad(y, [x, b], dy)
    z = (x + b).detach()
    expected = dy * torch.sigmoid(z) * (1 - torch.sigmoid(z))
    torch.testing.assert_close(db, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["ref", "triton", "cuda"])
def test_a_clamp_past_the_fp16_range_clamps_nothing_finite(impl):
    # torch refuses 1e5 as an fp16 clamp bound ("cannot be converted to type c10::Half without
    # overflow"): the reference raised that, and the fast modulated convolution's backward took
    # log2(inf) of the clamp rounded to fp16 (OverflowError).
    require(impl, "bias_act", torch.float16)
    x = torch.tensor([60000.0, -1.0, float("inf"), -40000.0], dtype=torch.float16, device=DEVICE)
    y = ops.bias_act(x, act="linear", gain=2.0, clamp=1e5, impl=impl)
    expected = torch.tensor([float("inf"), -2.0, float("inf"), float("-inf")], dtype=torch.float16)
    torch.testing.assert_close(y.cpu(), expected)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=g).to(DEVICE, torch.float16).requires_grad_(True)
    weight = torch.randn(2, 2, 1, 1, generator=g).to(DEVICE, torch.float16)
    styles = torch.randn(1, 2, generator=g).to(DEVICE, torch.float16)
    y = ops.modulated_conv2d(x, weight, styles, act="lrelu", clamp=1e5, impl=impl)
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    unclamped = ops.modulated_conv2d(x, weight, styles, act="lrelu", impl=impl)
    (expected_dx,) = torch.autograd.grad(unclamped.float().sum(), x)
    torch.testing.assert_close(y, unclamped)
    torch.testing.assert_close(dx, expected_dx)


def _modconv_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 4, 4, generator=g).to(DEVICE),
            torch.randn(5, 3, 3, 3, generator=g).to(DEVICE), torch.randn(2, 3, generator=g).to(DEVICE))


def _bad_calls():
    x4 = torch.ones(2, 3, 4, 4, device=DEVICE)
    x, w, s = _modconv_inputs()
    t, schedule = torch.zeros(2, dtype=torch.long), torch.ones(3, device=DEVICE)
    modconv = lambda impl, **kw: ops.modulated_conv2d(x, w, s, padding=kw.pop("padding", 1), impl=impl, **kw)
    return {
        # The fast modulated convolution's single-pass test (up == 1) took True and 1.0 for 1,
        # and never looked at the resample filter; the reference refused them.
        "up=True": ("up", lambda impl: modconv(impl, up=True)),
        "up=1.0": ("up", lambda impl: modconv(impl, up=1.0)),
        "padding=True": ("padding", lambda impl: modconv(impl, padding=True)),
        "float64 filter": ("f must be float32", lambda impl: modconv(
            impl, resample_filter=torch.ones(2, dtype=torch.float64, device=DEVICE))),
        "3-D filter": ("f must have rank", lambda impl: modconv(
            impl, resample_filter=torch.ones(2, 2, 2, device=DEVICE))),
        # float('a') said "could not convert string to float: 'a'"; the reference modulated
        # convolution skipped alpha altogether when act was linear; a NaN gain gave NaN outputs.
        "modconv alpha='a'": ("alpha", lambda impl: modconv(impl, alpha="a")),
        "bias_act gain='a'": ("gain", lambda impl: ops.bias_act(x4, gain="a", impl=impl)),
        "bias_act gain=[1]": ("gain", lambda impl: ops.bias_act(x4, gain=[1], impl=impl)),
        "bias_act alpha=nan": ("alpha", lambda impl: ops.bias_act(x4, act="lrelu",
                                                                   alpha=float("nan"), impl=impl)),
        "bias_act gain=inf": ("gain", lambda impl: ops.bias_act(x4, gain=float("inf"), impl=impl)),
        "bias_act clamp='a'": ("clamp", lambda impl: ops.bias_act(x4, clamp="a", impl=impl)),
        # upsample2d multiplied gain by up ** 2 first: None was a TypeError, 'a' became 'aaaa'.
        "upsample2d gain=None": ("gain", lambda impl: ops.upsample2d(x4, None, gain=None,
                                                                     impl=impl)),
        "upsample2d gain='a'": ("got 'a'", lambda impl: ops.upsample2d(x4, None, gain="a",
                                                                       impl=impl)),
        # conv2d_resample resolved impl only on its resampling paths.
        "conv2d_resample impl='bogus'": ("impl", lambda impl: ops.conv2d_resample(x, w,
                                                                                  impl="bogus")),
        # A meta t: the range check read t.min() (RuntimeError from .item()).
        "meta diffusion_noise": (None, lambda impl: ops.diffusion_noise(
            x4.to("meta"), t.to("meta"), schedule.to("meta"), schedule.to("meta"), impl=impl)),
    }


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_arguments_found_by_fuzzing_are_refused_naming_them_on_every_path(impl, case):
    require(impl, "modulated_conv2d")
    naming, call = _bad_calls()[case]
    if naming is None:  # meta tensors: the reference gives metadata, a fast path says why not
        if impl == "ref":
            assert call(impl).device.type == "meta"
        else:
            with pytest.raises(RuntimeError, match="meta"):
                call(impl)
        return
    with pytest.raises((ValueError, TypeError), match=naming):
        call(impl)


def test_conv2d_resample_refuses_an_implementation_that_cannot_run_x_on_every_path():
    x = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    w = torch.ones(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="conv2d_resample: implementation 'cuda' cannot run"):
        ops.conv2d_resample(x, w, impl="cuda")  # no resampling: was taken silently
