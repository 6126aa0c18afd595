"""The CUDA fused modulated convolution (batikfast._C) against an independent float64 formulation.

Truth: x * in_scale, F.conv2d, * out_scale, + noise + bias, activation, gain, clamp, all in
float64 on the same (already rounded) inputs. The kernel's error may be at most twice the error
torch makes doing the same computation in the kernel's dtype, plus a floor fitted to the dtype
relative to the output's scale (fp32 runs on tensor cores as tf32, as cuDNN does for fp32
convolutions by default). GPU only: without one every test skips.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from batikfast import _cuda
from tests._support import modconv_layer_reference as reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error floor relative to the output's scale: tf32 and fp16 keep 10 mantissa bits, bf16 7.
FLOOR = {torch.float32: 3e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, reason = _cuda.available()
    if not ok:
        pytest.skip(f"batikfast._C is not available: {reason}")


def raw_op():
    """The registered op itself, past the Python wrapper's checks (to test the C++ checks)."""
    _cuda.load()
    return torch.ops.batikfast_cuda.modulated_conv2d_forward


def make_inputs(batch, in_ch, out_ch, height, width, kh, padding, dtype, *, kw=None,
                out_scale=True, noise=True, bias=True, seed=0):
    """Inputs shaped like a synthesis layer: weight at unit scale, styles around 1, demodulation
    coefficients near 1/sqrt(fan_in), so outputs are O(1) in every dtype."""
    kw = kh if kw is None else kw
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    fan_in = in_ch * kh * kw

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    args = dict(
        x=rand(batch, in_ch, height, width).to(dtype),
        weight=rand(out_ch, in_ch, kh, kw).to(dtype),
        in_scale=rand(batch, in_ch) * 0.5 + 1,
        out_scale=(rand(batch, out_ch).abs() * 0.5 + 0.75) / math.sqrt(fan_in) if out_scale else None,
        noise=(rand(batch, 1, out_h, out_w) * 0.5).to(dtype) if noise else None,
        bias=(rand(out_ch) * 0.5).to(dtype) if bias else None)
    return {name: t.cuda() if t is not None else None for name, t in args.items()}


def run(args, act="lrelu", alpha=0.2, gain=1.4, clamp=None, padding=1):
    return _cuda.modulated_conv2d_forward(args["x"], args["weight"], args["in_scale"],
                                          args["out_scale"], args["noise"], args["bias"], act,
                                          alpha, gain, clamp, padding)


def poison_allocator(numel=1 << 22):
    """Leave NaNs in the caching allocator's free blocks, so an output element the kernel never
    writes shows up as NaN instead of as a plausible leftover."""
    junk = torch.full((numel,), float("nan"), device="cuda")
    del junk


def check_against_reference(args, act="lrelu", alpha=0.2, gain=1.4, clamp=None, padding=1,
                            floor_factor=1.0):
    poison_allocator()
    y = run(args, act, alpha, gain, clamp, padding)
    dtype = args["x"].dtype
    truth, scale = reference(**args, act=act, alpha=alpha, gain=gain, clamp=clamp, padding=padding)
    same_dtype, _ = reference(**args, act=act, alpha=alpha, gain=gain, clamp=clamp,
                              padding=padding, dtype=dtype)
    assert y.dtype == dtype
    assert y.shape == truth.shape
    assert y.is_contiguous()
    assert torch.isfinite(y).all(), "non-finite output (an element left unwritten?)"
    error = (y.double() - truth).abs().max().item()
    torch_error = (same_dtype.double() - truth).abs().max().item()
    allowed = 2 * torch_error + floor_factor * FLOOR[dtype] * max(scale, 1e-6)
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g} (torch {torch_error:.3g})"
    return y


def clamp_that_bites(args, padding, act="lrelu", alpha=0.2, gain=1.4):
    """A clamp level that cuts part of the output, not all of it."""
    unclamped, _ = reference(**args, act=act, alpha=alpha, gain=gain, clamp=None, padding=padding)
    return 0.5 * unclamped.abs().max().item()


# (N, I, O, H, W, k, padding): channel counts that are multiples of no tile size, 1-pixel and odd
# images, row tiles spanning several samples, padding wider than the kernel's reach (a border
# computed by the epilogue alone), reductions split over blocks (few rows, many channels), many
# rows of an odd-sized image (small tiles), and 48x48 images with enough rows for the large
# tiles (style on the weight tile), with ragged channels, alone and with a split reduction.
SHAPES = [
    (1, 3, 5, 1, 1, 1, 0),
    (2, 5, 17, 5, 5, 3, 1),
    (3, 17, 40, 7, 6, 3, 1),
    (2, 40, 3, 7, 6, 3, 0),
    (1, 17, 5, 5, 7, 1, 0),
    (2, 3, 17, 1, 1, 3, 1),
    (1, 5, 3, 3, 3, 1, 2),
    (6, 5, 17, 2, 3, 3, 1),
    (7, 33, 65, 4, 4, 3, 1),
    (1, 64, 129, 13, 11, 3, 1),
    (2, 70, 66, 17, 19, 1, 0),
    (1, 200, 70, 3, 5, 3, 1),
    (3, 45, 130, 37, 41, 3, 1),
    (3, 43, 130, 48, 48, 3, 1),
    (2, 43, 130, 48, 48, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_I{}_O{}_{}x{}_k{}_p{}".format(*s))
def test_forward_matches_float64_reference_for_odd_shapes_with_full_epilogue(shape, dtype):
    batch, in_ch, out_ch, height, width, k, padding = shape
    args = make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype)
    check_against_reference(args, clamp=clamp_that_bites(args, padding), padding=padding)


EPILOGUES = [  # (out_scale, noise, bias, act, alpha, gain, clamp)
    (False, False, False, "linear", 0.0, 1.0, None),
    (True, False, False, "linear", 0.0, 1.0, None),
    (False, True, False, "relu", 0.0, math.sqrt(2), None),
    (False, False, True, "lrelu", 0.2, math.sqrt(2), "bites"),
    (True, True, True, "relu", 0.0, 1.0, "bites"),
    (True, True, False, "lrelu", 0.05, 0.5, None),
    (False, True, True, "linear", 0.0, 2.0, "bites"),
    (True, True, True, "lrelu", 0.2, math.sqrt(2), 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES,
                         ids=lambda e: "os{:d}_noise{:d}_bias{:d}_{}_a{}_g{:.2f}_c{}".format(*e))
def test_every_epilogue_combination_matches_reference(epilogue, dtype):
    use_out_scale, use_noise, use_bias, act, alpha, gain, clamp = epilogue
    args = make_inputs(3, 19, 21, 9, 7, 3, 1, dtype, out_scale=use_out_scale, noise=use_noise,
                       bias=use_bias, seed=1)
    if clamp == "bites":
        clamp = clamp_that_bites(args, 1, act, alpha, gain)
    y = check_against_reference(args, act, alpha, gain, clamp, padding=1)
    if clamp == 0.0:
        assert (y == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,padding", [((1, 3), 1), ((3, 1), 0), ((5, 5), 2), ((2, 2), 1),
                                            ((3, 3), 0), ((3, 3), 2)],
                         ids=lambda v: str(v))
def test_any_kernel_size_and_padding_match_reference(kernel, padding, dtype):
    kh, kw = kernel
    args = make_inputs(2, 11, 13, 8, 9, kh, padding, dtype, kw=kw, seed=2)
    check_against_reference(args, "lrelu", 0.2, 1.0, None, padding=padding)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_different_samples_in_one_tile_use_their_own_scales(dtype):
    # 2x2 images: a 64- or 128-row tile holds 16..32 samples. Styles and demodulation differ
    # wildly between samples, so a scale taken from the wrong sample shows at once.
    args = make_inputs(37, 24, 20, 2, 2, 3, 1, dtype, seed=3)
    args["in_scale"] = args["in_scale"] * torch.linspace(0.1, 3.0, 37, device="cuda")[:, None]
    args["out_scale"] = args["out_scale"] * torch.linspace(3.0, 0.2, 37, device="cuda")[:, None]
    check_against_reference(args, padding=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_input_channels_give_the_epilogue_of_zero(dtype):
    args = make_inputs(2, 0, 5, 4, 3, 3, 1, dtype, out_scale=False, seed=11)
    y = run(args, act="lrelu", alpha=0.2, gain=1.4, clamp=None, padding=1)
    z = (args["noise"].double() + args["bias"].double()[None, :, None, None])
    expected = torch.where(z > 0, z, 0.2 * z) * 1.4
    torch.testing.assert_close(y.double(), expected, rtol=FLOOR[dtype], atol=FLOOR[dtype])


@pytest.mark.parametrize("act", ["relu", "lrelu"])
def test_a_nan_input_stays_nan_through_the_fused_relu_and_clamp(act):
    # fminf / fmaxf and 'v > 0 ? v : 0' turned the NaN outputs of a diverging layer into
    # -clamp or 0.
    args = make_inputs(1, 2, 3, 4, 4, 3, 1, torch.float32, seed=3)
    args["x"][0, 0, 1, 1] = float("nan")
    y = run(args, act=act, alpha=0.2, gain=1.0, clamp=0.5, padding=1)
    nan_at = torch.zeros(4, 4, dtype=torch.bool)
    nan_at[0:3, 0:3] = True  # every output whose 3x3 window reads the NaN pixel
    assert torch.equal(y.isnan().cpu(), nan_at.expand(1, 3, 4, 4))


def _strided(t, kind):
    """The same values in a layout the kernel must not assume away."""
    if kind == "channels_last" and t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]  # a gap after every element: neither contiguous nor dense


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["strided", "channels_last"])
def test_non_contiguous_inputs_give_the_contiguous_result(kind, dtype):
    args = make_inputs(2, 9, 10, 7, 5, 3, 1, dtype, seed=4)
    clamp = clamp_that_bites(args, 1)
    expected = run(args, clamp=clamp)
    views = {name: _strided(t, kind) if t is not None else None for name, t in args.items()}
    views["in_scale"] = args["in_scale"].t().contiguous().t()  # [N, I] with transposed strides
    assert not views["x"].is_contiguous() and not views["weight"].is_contiguous()
    check_against_reference(views, clamp=clamp, padding=1)
    torch.testing.assert_close(run(views, clamp=clamp), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weight_bias_noise_are_cast_to_x_dtype_at_entry(dtype):
    args = make_inputs(2, 12, 9, 6, 6, 3, 1, dtype, seed=5)
    full = dict(args, weight=args["weight"].float(), bias=args["bias"].float(),
                noise=args["noise"].float())
    torch.testing.assert_close(run(full), run(args), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_calls_are_bitwise_identical(dtype):
    args = make_inputs(4, 64, 96, 16, 16, 3, 1, dtype, seed=6)
    first = run(args)
    assert torch.equal(run(args), first)


def test_runs_on_the_current_stream():
    args = make_inputs(2, 32, 48, 16, 16, 3, 1, torch.float16, seed=7)
    expected = run(args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = run(args)
    stream.synchronize()
    assert torch.equal(y, expected)


# ---- the paper256 generator's layers (N=4): 512 channels at 4..32 px, then fewer, wider -----

PAPER256 = [  # (I, O, resolution, k)
    (512, 512, 4, 3), (512, 512, 8, 3), (512, 512, 16, 3), (512, 512, 32, 3),
    (512, 256, 64, 3), (256, 128, 128, 3), (128, 128, 128, 3), (128, 64, 256, 3),
    (64, 64, 256, 3), (512, 3, 4, 1), (128, 3, 128, 1), (64, 3, 256, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", PAPER256, ids=lambda s: "I{}_O{}_{}px_k{}".format(*s))
def test_paper256_generator_layers_match_reference(layer, dtype):
    in_ch, out_ch, res, k = layer
    padding = k // 2
    args = make_inputs(4, in_ch, out_ch, res, res, k, padding, dtype, seed=8)
    check_against_reference(args, "lrelu", 0.2, math.sqrt(2), 256.0, padding=padding)


# ---- the op itself refuses bad input with a message naming the argument ---------------------
#
# These call the registered op directly, past the Python wrapper's checks. They run in a child
# process: should a bad argument ever crash the op instead of raising (as a segfault once did on
# the GPU machine), the crash fails the case it happened in and no other test's result is lost.

def _good():
    return dict(x=torch.randn(2, 3, 5, 5, device="cuda"), weight=torch.randn(4, 3, 3, 3, device="cuda"),
                in_scale=torch.ones(2, 3, device="cuda"), out_scale=torch.ones(2, 4, device="cuda"),
                noise=torch.zeros(2, 1, 5, 5, device="cuda"), bias=torch.zeros(4, device="cuda"))


def _call(args, act="lrelu", padding=1):
    return raw_op()(args["x"], args["weight"], args["in_scale"], args["out_scale"],
                    args["noise"], args["bias"], act, 0.2, 1.0, -1.0, padding)


def _replace(name, make):
    return lambda: _call(dict(_good(), **{name: make()}))


def _empty_output():
    args = _good()
    return _call(dict(args, x=args["x"][:, :, :1, :1], noise=None), padding=0)


# (case id, the call, the message the error must contain)
BAD_CALLS = [
    ("x_cpu", _replace("x", lambda: torch.randn(2, 3, 5, 5)), "x must be a CUDA tensor"),
    ("x_float64", _replace("x", lambda: torch.randn(2, 3, 5, 5, device="cuda", dtype=torch.float64)),
     "x must be float32"),
    ("x_3d", _replace("x", lambda: torch.randn(2, 3, 5, device="cuda")), "x must be 4-D"),
    ("weight_cpu", _replace("weight", lambda: torch.randn(4, 3, 3, 3)),
     "weight must be a CUDA tensor"),
    ("weight_channels", _replace("weight", lambda: torch.randn(4, 2, 3, 3, device="cuda")),
     "weight must be [O, 3, kh, kw]"),
    ("in_scale_cpu", _replace("in_scale", lambda: torch.ones(2, 3)), "in_scale must be a CUDA tensor"),
    ("in_scale_shape", _replace("in_scale", lambda: torch.ones(2, 4, device="cuda")),
     "in_scale must be [2, 3]"),
    ("in_scale_dtype", _replace("in_scale", lambda: torch.ones(2, 3, device="cuda", dtype=torch.float16)),
     "in_scale must be float32"),
    ("out_scale_cpu", _replace("out_scale", lambda: torch.ones(2, 4)), "out_scale must be a CUDA tensor"),
    ("out_scale_shape", _replace("out_scale", lambda: torch.ones(2, 3, device="cuda")),
     "out_scale must be [2, 4]"),
    ("noise_cpu", _replace("noise", lambda: torch.zeros(2, 1, 5, 5)), "noise must be a CUDA tensor"),
    ("noise_shape", _replace("noise", lambda: torch.zeros(2, 1, 4, 5, device="cuda")),
     "noise must be [2, 1, 5, 5]"),
    ("bias_cpu", _replace("bias", lambda: torch.zeros(4)), "bias must be a CUDA tensor"),
    ("bias_shape", _replace("bias", lambda: torch.zeros(5, device="cuda")), "bias must be [4]"),
    ("bias_dtype", _replace("bias", lambda: torch.zeros(4, device="cuda", dtype=torch.int32)),
     "bias must be float32, float16 or bfloat16"),
    ("act", lambda: _call(_good(), act="tanh"), "act must be one of linear, relu, lrelu"),
    ("padding", lambda: _call(_good(), padding=-1), "padding must be >= 0"),
    ("empty_output", _empty_output, "output would be empty"),
]


def _run_bad_calls():
    """Child process: each case's outcome as one JSON line, written as soon as it is known."""
    for case, call, _ in BAD_CALLS:
        try:
            call()
            torch.cuda.synchronize()
            outcome = {"case": case, "error": None}
        except Exception as error:  # the test checks the type
            outcome = {"case": case, "type": type(error).__name__, "error": str(error)}
        print(json.dumps(outcome), flush=True)


@pytest.fixture(scope="module")
def bad_call_outcomes():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(here), here] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    child = subprocess.run(
        [sys.executable, "-c", "import test_cuda_modulated_conv2d as t; t._run_bad_calls()"],
        cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for line in child.stdout.splitlines():
        if line.startswith("{"):
            outcome = json.loads(line)
            outcomes[outcome["case"]] = outcome
    return outcomes, child


@pytest.mark.parametrize("case,message", [(case, message) for case, _, message in BAD_CALLS],
                         ids=[case for case, _, _ in BAD_CALLS])
def test_bad_arguments_raise_an_error_naming_them(bad_call_outcomes, case, message):
    outcomes, child = bad_call_outcomes
    assert case in outcomes, (
        f"the child process ended (exit status {child.returncode}) before case {case!r} reported; "
        f"it crashed in the first unreported case, not raising.\nstderr tail:\n{child.stderr[-3000:]}")
    outcome = outcomes[case]
    assert outcome["error"] is not None, f"{case}: the op accepted the bad argument"
    assert outcome["type"] == "RuntimeError", f"{case}: {outcome['type']}: {outcome['error']}"
    assert message in outcome["error"], f"{case}: message {outcome['error']!r}"


def test_op_schema_passes_opcheck():
    args = make_inputs(2, 5, 6, 4, 4, 3, 1, torch.float16, seed=10)
    torch.library.opcheck(raw_op(), (args["x"], args["weight"], args["in_scale"],
                                     args["out_scale"], args["noise"], args["bias"], "lrelu",
                                     0.2, 1.0, -1.0, 1), test_utils=("test_schema",))


# Last in the file: the largest allocation of the suite (about 5 GiB), so it cannot starve or
# disturb the tests above.
def test_inputs_beyond_two_giga_elements_use_64_bit_offsets():
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 24 * 2 ** 30:
        pytest.skip(f"needs a GPU with >= 24 GiB (this one has {total / 2 ** 30:.0f} GiB)")
    # 3 x 48 x 4096 x 4096 bf16 = 2.4e9 elements: the last sample starts below 2**31 and ends
    # above it. k = 1 keeps the output rows local, so a crop of x gives the truth for a crop of y.
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(3, 48, 4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(4, 48, 1, 1, device="cuda", dtype=torch.bfloat16, generator=gen)
    in_scale = torch.rand(3, 48, device="cuda", generator=gen) + 0.5
    y = _cuda.modulated_conv2d_forward(x, weight, in_scale, None, None, None, "linear", 0.0, 1.0,
                                       None, 0)
    for n, rows in ((0, slice(0, 4)), (2, slice(4088, 4096))):
        crop = dict(x=x[n:n + 1, :, rows], weight=weight, in_scale=in_scale[n:n + 1],
                    out_scale=None, noise=None, bias=None)
        truth, scale = reference(**crop, act="linear", alpha=0.0, gain=1.0, clamp=None, padding=0)
        error = (y[n:n + 1, :, rows].double() - truth).abs().max().item()
        assert error <= FLOOR[torch.bfloat16] * scale, f"sample {n}: error {error:.3g}"
    del x, y
