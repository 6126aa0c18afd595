"""The Triton fused modulated convolution against an independent float64 formulation.

Truth: x * in_scale, F.conv2d, * out_scale, + noise + bias, activation, gain, clamp, all in
float64. The kernel's error may be at most a small multiple of the error torch makes doing the
same computation in the kernel's dtype, plus a floor fitted to the dtype (tf32 on the GPU for
fp32). Without a GPU the kernel runs in Triton's interpreter, so the shapes stay tiny.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batikfast import backends  # noqa: E402
from tests._support import compile_without_gpu  # noqa: E402
from tests._support import modconv_layer_reference as reference

mc = backends.triton_kernels("modulated_conv2d")

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error floor relative to the output's scale. fp32 runs as tf32 on the GPU (10-bit mantissa).
FLOOR = {torch.float32: 3e-3 if HAS_GPU else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype, *, out_scale=True,
                noise=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = height + 2 * padding - k + 1, width + 2 * padding - k + 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    args = dict(
        x=rand(batch, in_ch, height, width).to(dtype),
        weight=rand(out_ch, in_ch, k, k).to(dtype),
        in_scale=rand(batch, in_ch) + 1,
        out_scale=rand(batch, out_ch).abs() / math.sqrt(in_ch * k * k) + 0.1 if out_scale else None,
        noise=rand(batch, 1, out_h, out_w) * 0.5 if noise else None,
        bias=rand(out_ch) * 0.5 if bias else None)
    return {name: t.to(DEVICE) if t is not None else None for name, t in args.items()}


def check_against_reference(args, act="lrelu", alpha=0.2, gain=1.4, clamp=None, padding=1):
    y = mc.modulated_conv2d_forward(args["x"], args["weight"], args["in_scale"],
                                    args["out_scale"], args["noise"], args["bias"], act, alpha,
                                    gain, clamp, padding)
    dtype = args["x"].dtype
    truth, scale = reference(**args, act=act, alpha=alpha, gain=gain, clamp=clamp,
                             padding=padding)
    same_dtype, _ = reference(**args, act=act, alpha=alpha, gain=gain, clamp=clamp,
                              padding=padding, dtype=dtype)
    assert y.dtype == dtype
    assert y.shape == truth.shape
    assert torch.isfinite(y).all()
    error = (y.double() - truth).abs().max().item()
    torch_error = (same_dtype.double() - truth).abs().max().item()
    allowed = 2 * torch_error + FLOOR[dtype] * max(scale, 1e-6)
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g} (torch {torch_error:.3g})"
    return y


# (N, I, O, H, W, k, padding): channel counts not multiples of any block, odd and 1-pixel images,
# row tiles spanning samples, and padding wider than the kernel reach (border = epilogue only).
SHAPES = [
    (1, 3, 5, 1, 1, 1, 0),
    (2, 5, 17, 5, 5, 3, 1),
    (3, 17, 40, 7, 6, 3, 1),
    (2, 40, 3, 7, 6, 3, 0),
    (1, 17, 5, 5, 7, 1, 0),
    (2, 3, 17, 1, 1, 3, 1),
    (1, 5, 3, 3, 3, 1, 2),
    (6, 5, 17, 2, 3, 3, 1),
    (2, 32, 17, 8, 4, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_I{}_O{}_{}x{}_k{}_p{}".format(*s))
def test_forward_matches_float64_reference_for_odd_shapes_with_full_epilogue(shape, dtype):
    batch, in_ch, out_ch, height, width, k, padding = shape
    args = make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype)
    unclamped, _ = reference(**args, act="lrelu", alpha=0.2, gain=1.4, clamp=None,
                             padding=padding)
    # A clamp that bites on part of the output, not all of it.
    clamp = 0.5 * unclamped.abs().max().item()
    check_against_reference(args, clamp=clamp, padding=padding)


EPILOGUES = [  # (out_scale, noise, bias, act, alpha, gain, clamp)
    (False, False, False, "linear", 0.0, 1.0, None),
    (True, False, False, "linear", 0.0, 1.0, None),
    (False, True, False, "relu", 0.0, math.sqrt(2), None),
    (False, False, True, "lrelu", 0.2, math.sqrt(2), None),
    (True, True, True, "lrelu", 0.3, 1.0, 0.25),
    (True, True, True, "relu", 0.0, 2.0, 0.0),
    (False, True, True, "linear", 0.0, 0.5, 0.7),
]


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(map(str, e)))
def test_each_epilogue_option_is_applied_in_order(epilogue):
    out_scale, noise, bias, act, alpha, gain, clamp = epilogue
    args = make_inputs(2, 5, 17, 5, 5, 3, 1, torch.float32, out_scale=out_scale, noise=noise,
                       bias=bias, seed=1)
    y = check_against_reference(args, act=act, alpha=alpha, gain=gain, clamp=clamp)
    if clamp == 0.0:
        assert (y == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_gradient_call_with_flipped_transposed_weight_matches_autograd(dtype):
    # How batikfast.ops builds dx: the same kernel with the weight transposed and flipped,
    # in_scale and out_scale swapped (so in_scale has O channels), padding k - 1 - p, no epilogue.
    batch, in_ch, out_ch, height, width, k, padding = 2, 5, 17, 5, 7, 3, 1
    args = make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype, noise=False,
                       bias=False, seed=2)
    x = args["x"].double().requires_grad_()
    y, _ = reference(x, args["weight"], args["in_scale"], args["out_scale"], None, None,
                     "linear", 0.0, 1.0, None, padding)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (dx_truth,) = torch.autograd.grad(y, x, dy)
    dy = dy.to(dtype)
    flipped = args["weight"].transpose(0, 1).flip(2, 3)
    dx = mc.modulated_conv2d_forward(dy, flipped, args["out_scale"], args["in_scale"], None,
                                     None, "linear", 0.0, 1.0, None, k - 1 - padding)
    dx_same_dtype, scale = reference(dy, flipped, args["out_scale"], args["in_scale"], None,
                                     None, "linear", 0.0, 1.0, None, k - 1 - padding,
                                     dtype=dtype)
    assert dx.shape == x.shape and dx.dtype == dtype
    error = (dx.double() - dx_truth).abs().max().item()
    allowed = 2 * (dx_same_dtype.double() - dx_truth).abs().max().item() + FLOOR[dtype] * scale
    assert error <= allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_in_scale_it_is_a_plain_convolution_with_the_fused_epilogue(dtype):
    args = make_inputs(3, 17, 5, 5, 7, 3, 1, dtype, seed=12)
    args["in_scale"] = None
    check_against_reference(args, act="lrelu", alpha=0.2, gain=math.sqrt(2), clamp=1.0)


def test_non_square_even_kernel_matches_reference():
    args = make_inputs(2, 5, 17, 5, 6, 3, 1, torch.float32, seed=10)
    args["weight"] = args["weight"][:, :, :2, :]  # 2x3: even height, non-square
    args["noise"] = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    check_against_reference(args, padding=1)


def test_non_contiguous_and_broadcast_inputs_give_the_same_result():
    args = make_inputs(2, 5, 17, 5, 7, 3, 1, torch.float32, seed=4)
    expected = mc.modulated_conv2d_forward(*args.values(), "lrelu", 0.2, 1.4, None, 1)
    wide = torch.zeros(2, 10, 5, 14, device=DEVICE)
    wide[:, ::2, :, ::2] = args["x"]
    weight_t = args["weight"].transpose(0, 1).contiguous().transpose(0, 1)
    in_scale_t = args["in_scale"].t().contiguous().t()
    out_scale_t = args["out_scale"].t().contiguous().t()
    bias_strided = torch.stack([args["bias"], args["bias"]], 1)[:, 0]
    noise_one = args["noise"][:1]
    y = mc.modulated_conv2d_forward(wide[:, ::2, :, ::2], weight_t, in_scale_t, out_scale_t,
                                    args["noise"], bias_strided, "lrelu", 0.2, 1.4, None, 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # A noise map shared by the batch broadcasts like the reference's addition.
    y_shared = mc.modulated_conv2d_forward(*[args[n] for n in ("x", "weight", "in_scale",
                                                             "out_scale")],
                                           noise_one, args["bias"], "lrelu", 0.2, 1.4, None, 1)
    args["noise"] = noise_one.expand_as(args["noise"])
    y_expanded = check_against_reference(args, act="lrelu", alpha=0.2, gain=1.4)
    torch.testing.assert_close(y_shared, y_expanded, rtol=0, atol=0)


def test_channels_last_input_gives_channels_last_output_with_the_same_values():
    args = make_inputs(2, 17, 5, 5, 7, 3, 1, torch.float16, seed=5)
    expected = mc.modulated_conv2d_forward(*args.values(), "relu", 0.0, 1.0, None, 1)
    x_cl = args["x"].contiguous(memory_format=torch.channels_last)
    y = mc.modulated_conv2d_forward(x_cl, *list(args.values())[1:], "relu", 0.0, 1.0, None, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert mc.output_memory_format(x_cl) == torch.channels_last
    assert expected.is_contiguous()
    assert mc.output_memory_format(args["x"]) == torch.contiguous_format
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weight_is_cast_to_the_input_dtype(dtype):
    args = make_inputs(1, 5, 17, 5, 5, 3, 1, dtype, seed=6)
    expected = mc.modulated_conv2d_forward(*args.values(), "linear", 0.0, 1.0, None, 1)
    args["weight"] = args["weight"].float()
    y = mc.modulated_conv2d_forward(*args.values(), "linear", 0.0, 1.0, None, 1)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("config", [(16, 16, 16, 4, 1), (64, 128, 64, 8, 3)],
                         ids=lambda c: "x".join(map(str, c[:3])))
def test_every_output_element_is_written_for_other_tile_sizes(config):
    args = make_inputs(3, 17, 40, 5, 7, 3, 1, torch.float32, seed=7)
    truth, scale = reference(**args, act="lrelu", alpha=0.2, gain=1.0, clamp=None, padding=1)
    y = torch.full(truth.shape, float("nan"), device=DEVICE)
    w_kkio = args["weight"].permute(2, 3, 1, 0).contiguous()
    mc._launch(args["x"], w_kkio, args["in_scale"], args["out_scale"], args["noise"],
               args["bias"], y, "lrelu", 0.2, 1.0, None, 1, mc._Config(*config))
    assert torch.isfinite(y).all()
    assert (y.double() - truth).abs().max().item() <= FLOOR[torch.float32] * scale


def test_a_config_too_big_for_shared_memory_falls_back_to_a_smaller_one(monkeypatch):
    launch = mc._launch
    tried = []

    def launch_with_small_shared_memory(*args, config):
        tried.append(config)
        if config.num_stages > 2:
            raise mc.OutOfResources(200_000, 100_000, "shared memory")
        launch(*args, config=config)

    monkeypatch.setattr(mc, "_launch", launch_with_small_shared_memory)
    monkeypatch.setattr(mc, "_fitting_configs", {})
    args = make_inputs(2, 5, 17, 3, 3, 3, 1, torch.float32, seed=9)
    truth, scale = reference(**args, act="linear", alpha=0.0, gain=1.0, clamp=None, padding=1)
    y = torch.full(truth.shape, float("nan"), device=DEVICE)
    w_kkio = args["weight"].permute(2, 3, 1, 0).contiguous()
    big = mc._Config(32, 32, 16, 4, 3)
    for _ in range(2):
        mc._launch_fitting(args["x"], w_kkio, args["in_scale"], args["out_scale"], args["noise"],
                           args["bias"], y, "linear", 0.0, 1.0, None, 1, config=big)
    assert [c.num_stages for c in tried] == [3, 2, 2]  # the fitting config is remembered
    assert (y.double() - truth).abs().max().item() <= FLOOR[torch.float32] * scale


@pytest.mark.parametrize("case", [
    # (N, I, O, Ho, Wo, dtype) -> (BLOCK_M, BLOCK_N, BLOCK_K)
    ((8, 64, 64, 256, 256, torch.float16), (128, 64, 64)),  # bandwidth-bound: all O in one tile
    ((8, 512, 512, 32, 32, torch.bfloat16), (128, 128, 64)),  # matmul-bound, enough tiles
    ((8, 512, 512, 8, 8, torch.float16), (64, 64, 64)),  # few rows: fill the SMs
    ((64, 512, 512, 8, 8, torch.float16), (64, 128, 64)),  # 64 rows = one 8x8 sample
    ((4, 128, 3, 128, 128, torch.float32), (128, 16, 32)),  # toRGB; fp32 takes BLOCK_K 32
    ((8, 3, 40, 65, 63, torch.float16), (128, 64, 16)),  # few input channels: small BLOCK_K
], ids=str)
def test_tile_choice_follows_the_layer_regime_on_a_132_sm_gpu(monkeypatch, case):
    (batch, in_ch, out_ch, out_h, out_w, dtype), expected = case
    monkeypatch.setenv("BATIKFAST_INTERPRET_DEVICE_TILES", "1")
    monkeypatch.setattr(mc, "_sm_count", lambda device: 132)
    config = mc._choose_config(batch * out_h * out_w, out_h * out_w, in_ch, out_ch, dtype,
                               torch.device("cuda", 0))
    assert (config.block_m, config.block_n, config.block_k) == expected


def test_empty_batch_gives_an_empty_output():
    args = make_inputs(0, 5, 17, 5, 5, 3, 1, torch.float32)
    y = mc.modulated_conv2d_forward(*args.values(), "linear", 0.0, 1.0, None, 1)
    assert y.shape == (0, 17, 5, 5)


@pytest.mark.parametrize("act", ["relu", "lrelu"])
def test_a_nan_input_stays_nan_through_relu_and_clamp(act):
    # Triton's default min / max return the non-NaN operand: the fused relu and clamp turned the
    # NaN outputs of a diverging layer into 0 or -clamp.
    args = make_inputs(1, 2, 3, 4, 4, 3, 1, torch.float32, seed=3)
    args["x"][0, 0, 1, 1] = float("nan")
    y = mc.modulated_conv2d_forward(*args.values(), act, 0.2, 1.0, 0.5, 1)
    nan_at = torch.zeros(4, 4, dtype=torch.bool)
    nan_at[0:3, 0:3] = True  # every output whose 3x3 window reads the NaN pixel
    assert torch.equal(y.isnan().cpu(), nan_at.expand(1, 3, 4, 4))

def _good_args():
    args = make_inputs(1, 3, 5, 4, 4, 3, 1, torch.float32, seed=8)
    return dict(args, act="linear", alpha=0.0, gain=1.0, clamp=None, padding=1)


@pytest.mark.parametrize("change, error, words", [
    (dict(x=torch.zeros(1, 3, 4, 4, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(x=torch.zeros(1, 3, 4, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(weight=torch.zeros(5, 3, 3, 3, dtype=torch.float16)), TypeError, "weight must be"),
    (dict(weight=torch.zeros(5, 4, 3, 3)), ValueError, "weight must be [O, 3"),
    (dict(in_scale=torch.zeros(1, 5)), ValueError, "in_scale must be"),
    (dict(out_scale=torch.zeros(1, 3)), ValueError, "out_scale must be"),
    (dict(bias=torch.zeros(3)), ValueError, "bias must be"),
    (dict(noise=torch.zeros(1, 1, 3, 4)), ValueError, "noise must broadcast"),
    (dict(act="tanh"), ValueError, "act must be one of"),
    (dict(clamp=-1.0), ValueError, "clamp must be"),
    (dict(padding=-1), ValueError, "padding must be"),
    (dict(padding=0, x=torch.zeros(1, 3, 2, 2)), ValueError, "leaves no output pixel"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_raise_errors_naming_the_argument(change, error, words):
    args = _good_args()
    args.update({name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                 for name, v in change.items()})
    with pytest.raises(error, match=words.replace("[", r"\[")):
        mc.modulated_conv2d_forward(**args)


def test_cpu_tensors_are_refused_unless_triton_is_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _good_args()
    args.update({n: v.cpu() for n, v in args.items() if isinstance(v, torch.Tensor)})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mc.modulated_conv2d_forward(**args)


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_fp32_tiles_multiply_in_tf32_only_when_torch_allows_it_for_convolutions(monkeypatch,
                                                                                 allow_tf32):
    monkeypatch.setattr(mc, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    assert mc.dot_precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
    assert mc.dot_precision(torch.float16) == "ieee"  # 16-bit operands: the flag is moot


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine every test compiles the kernel for real")
def test_modulated_conv2d_kernel_compiles_for_an_nvidia_gpu():
    """The GPU's tiles and every dtype / precision, including full-fp32 (TF32 off) tiles."""
    compile_without_gpu("modulated_conv2d", """
for dtype, precision, (bm, bn, bk, warps), scale_samples, even_k in [
        ("fp16", "ieee", (128, 128, 64, 8), 1, True), ("bf16", "ieee", (64, 64, 64, 4), 3, False),
        ("fp32", "tf32", (128, 64, 32, 8), 1, True), ("fp32", "ieee", (64, 128, 32, 8), 9, True),
        ("fp16", "ieee", (128, 16, 16, 4), 0, False)]:
    types = dict(x_ptr="*" + dtype, w_ptr="*" + dtype, in_scale_ptr="*fp32",
                 out_scale_ptr="*fp32", noise_ptr="*" + dtype, bias_ptr="*" + dtype,
                 y_ptr="*" + dtype, alpha="fp32", gain="fp32", clamp="fp32")
    for name in kernels._modulated_conv2d_fwd_kernel.arg_names:
        types.setdefault(name, "i64" if name.startswith("stride") or name == "M" else "i32")
    compile_for_sm90(kernels._modulated_conv2d_fwd_kernel, types, dict(
        KH=3, KW=3, HAS_OUT_SCALE=True, HAS_NOISE=True, HAS_BIAS=True, ACT=2, HAS_CLAMP=True,
        DOT_PRECISION=precision, DOT_IN_FP32=False, SCALE_SAMPLES=scale_samples,
        EVEN_K=even_k, STORE_ROWS_FASTEST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps)
""")


# paper256 generator layers: matmul-bound small images with 512 channels, bandwidth-bound large
# images with few channels, the 1x1 toRGB layer, and the input-gradient call of a 3x3 layer.
GPU_SHAPES = [
    (8, 512, 512, 4, 4, 3, 1),
    (8, 512, 512, 16, 16, 3, 1),
    (4, 512, 256, 32, 32, 3, 1),
    (2, 128, 128, 128, 128, 3, 1),
    (2, 64, 64, 256, 256, 3, 1),
    (3, 64, 3, 255, 257, 1, 0),
    (2, 96, 131, 33, 31, 3, 0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="paper256-sized shapes need a GPU (interpreter too slow)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "N{}_I{}_O{}_{}x{}_k{}_p{}".format(*s))
def test_generator_sized_layers_match_reference_on_gpu(shape, dtype):
    batch, in_ch, out_ch, height, width, k, padding = shape
    args = make_inputs(batch, in_ch, out_ch, height, width, k, padding, dtype)
    check_against_reference(args, clamp=256.0, padding=padding)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="paper256-sized shapes need a GPU (interpreter too slow)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generator_sized_channels_last_layer_equals_nchw_layer_on_gpu(dtype):
    args = make_inputs(2, 128, 128, 64, 64, 3, 1, dtype)
    expected = mc.modulated_conv2d_forward(*args.values(), "lrelu", 0.2, math.sqrt(2), 256.0, 1)
    args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
    y = mc.modulated_conv2d_forward(*args.values(), "lrelu", 0.2, math.sqrt(2), 256.0, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="paper256-sized shapes need a GPU (interpreter too slow)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generator_sized_input_gradient_call_matches_autograd_on_gpu(dtype):
    args = make_inputs(4, 512, 256, 16, 16, 3, 1, dtype, noise=False, bias=False)
    x = args["x"].double().requires_grad_()
    y, _ = reference(x, args["weight"], args["in_scale"], args["out_scale"], None, None,
                     "linear", 0.0, 1.0, None, 1)
    dy = torch.randn(y.shape, device=DEVICE, dtype=torch.float64)
    (dx_truth,) = torch.autograd.grad(y, x, dy)
    flipped = args["weight"].transpose(0, 1).flip(2, 3)
    dx = mc.modulated_conv2d_forward(dy.to(dtype), flipped, args["out_scale"], args["in_scale"],
                                     None, None, "linear", 0.0, 1.0, None, 1)
    dx_same_dtype, scale = reference(dy.to(dtype), flipped, args["out_scale"], args["in_scale"],
                                     None, None, "linear", 0.0, 1.0, None, 1, dtype=dtype)
    error = (dx.double() - dx_truth).abs().max().item()
    allowed = 2 * (dx_same_dtype.double() - dx_truth).abs().max().item() + FLOOR[dtype] * scale
    assert error <= allowed
