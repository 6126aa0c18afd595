"""The Triton bias_act kernels against an independent float64 formulation.

Truth: the activation written out in float64 PyTorch; its first and second derivatives come from
torch.autograd (grad and grad of grad), so the kernel's hand-written derivatives are checked
against differentiation, not against a second copy of the same formulas. The kernel's error may
be at most a small multiple of the error PyTorch makes computing the same forward in the
kernel's dtype, plus a floor fitted to the dtype. Without a GPU the kernels run in Triton's
interpreter, so the tensors stay tiny.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batikfast import backends, ops  # noqa: E402
from tests._support import compile_without_gpu  # noqa: E402

ba = backends.triton_kernels("bias_act")

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Error floor relative to the largest true value: a few units in the last place of the dtype.
FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

ACTIVATIONS = {
    "linear": lambda z, a: z,
    "relu": lambda z, a: torch.where(z > 0, z, torch.zeros_like(z)),
    "lrelu": lambda z, a: torch.where(z > 0, z, z * a),
    "tanh": lambda z, a: torch.tanh(z),
    "sigmoid": lambda z, a: 1 / (1 + torch.exp(-z)),
    "elu": lambda z, a: torch.where(z > 0, z, torch.expm1(z)),
    "selu": lambda z, a: 1.0507009873554805 * torch.where(
        z > 0, z, 1.6732632423543772 * torch.expm1(z)),
    # Two smooth branches, so that autograd differentiates correctly at z == 0 (abs and clamp
    # would give a derivative of 0 or 1 there instead of 1/2).
    "softplus": lambda z, a: torch.where(z > 0, z + torch.log1p(torch.exp(-z)),
                                         torch.log1p(torch.exp(z))),
    "swish": lambda z, a: z / (1 + torch.exp(-z)),
}


def rand(*shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def with_bias(x, b, dim):
    if b is None:
        return x
    dim %= x.ndim
    return x + b.reshape([-1 if axis == dim else 1 for axis in range(x.ndim)])


def derivative(z, act, alpha, order):
    """act^(order)(z) in float64 by autograd; order 0 is the activation itself."""
    z = z.detach().double().requires_grad_(True)
    value = ACTIVATIONS[act](z, alpha)
    for _ in range(order):
        if not value.requires_grad:
            # Piecewise constant (linear, relu, lrelu): the next derivative is 0 off the kinks.
            return torch.zeros_like(z).detach()
        (value,) = torch.autograd.grad(value.sum(), z, create_graph=True)
    return value.detach()


def truth_forward(x, b, dim, act, alpha, gain, clamp):
    y = derivative(with_bias(x.double(), None if b is None else b.double(), dim), act, alpha, 0)
    y = y * gain
    return y if clamp is None else y.clamp(-clamp, clamp)


def truth_backward(dy, x, b, dim, act, alpha, gain, clamp, order):
    z = with_bias(x.double(), None if b is None else b.double(), dim)
    dx = dy.double() * gain * derivative(z, act, alpha, order)
    if clamp is not None:
        dx = dx * ((derivative(z, act, alpha, 0) * gain).abs() <= clamp)
    return dx


def same_dtype_forward(x, b, dim, act, alpha, gain, clamp):
    """The forward done by PyTorch in x's dtype: the baseline error for the tolerance."""
    z = with_bias(x, None if b is None else b.to(x.dtype), dim)
    y = ACTIVATIONS[act](z, alpha) * gain
    return y if clamp is None else y.clamp(-clamp, clamp)


def assert_close(out, truth, baseline, dtype, what, factor=4.0, ignore=None):
    """max|out - truth| <= max(factor * max|baseline - truth|, FLOOR * max|truth|)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out, truth = out.double().cpu(), truth.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    error = (out - truth).abs()
    base_error = (baseline.double().cpu() - truth).abs() if baseline is not None else error * 0
    if ignore is not None:
        error, base_error = error[~ignore], base_error[~ignore]
    scale = truth.abs().max().item() or 1.0
    err = error.max().item() if error.numel() else 0.0
    allowed = max(factor * (base_error.max().item() if base_error.numel() else 0.0),
                  FLOOR[dtype] * scale)
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g})"


def near_clamp(x, b, dim, act, alpha, gain, clamp, dtype):
    """Elements whose |act(z) * gain| lies within rounding of the clamp: their mask is ambiguous
    in low precision, so they are left out of the derivative comparison."""
    if clamp is None:
        return None
    y = truth_forward(x, b, dim, act, alpha, gain, None).abs()
    return (y - clamp).abs() <= 4 * FLOOR[dtype] * max(1.0, clamp)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bias_act_forward_and_both_derivative_orders_match_float64_for_every_activation(
        act, dtype):
    x = rand(3, 5, 7, seed=1, scale=3).to(dtype)
    b = rand(5, seed=2).to(dtype)
    dy = rand(3, 5, 7, seed=3).to(dtype)
    alpha, gain, clamp = 0.3, 1.7, 2.5
    for use_clamp in (None, clamp):
        x_d, b_d = x.to(DEVICE), b.to(DEVICE)
        y = ba.bias_act_forward(x_d, b_d, 1, act, alpha, gain, use_clamp)
        assert_close(y, truth_forward(x, b, 1, act, alpha, gain, use_clamp),
                     same_dtype_forward(x, b, 1, act, alpha, gain, use_clamp), dtype,
                     f"{act} forward clamp={use_clamp}")
        ignore = near_clamp(x, b, 1, act, alpha, gain, use_clamp, dtype)
        for order in (1, 2):
            dx = ba.bias_act_backward(dy.to(DEVICE), x_d, b_d, 1, act, alpha, gain, use_clamp,
                                      order)
            truth = truth_backward(dy, x, b, 1, act, alpha, gain, use_clamp, order)
            # The baseline: the float64 derivative of low-precision inputs, rounded to dtype.
            z_low = with_bias(x, b, 1).to(dtype).double()
            baseline = (dy.double() * gain * derivative(z_low, act, alpha, order)).to(dtype)
            if use_clamp is not None:
                baseline = baseline * ((derivative(z_low, act, alpha, 0) * gain).abs()
                                       <= use_clamp).to(dtype)
            assert_close(dx, truth, baseline, dtype, f"{act} order {order} clamp={use_clamp}",
                         ignore=ignore)


def test_bias_act_derivatives_at_zero_take_the_left_branch():
    x = torch.tensor([-1.0, 0.0, 1.0], device=DEVICE)
    dy = torch.ones(3, device=DEVICE)
    relu = ba.bias_act_backward(dy, x, None, 0, "relu", 0.0, 1.0, None, 1)
    lrelu = ba.bias_act_backward(dy, x, None, 0, "lrelu", 0.25, 1.0, None, 1)
    assert relu.tolist() == [0.0, 0.0, 1.0]
    assert lrelu.tolist() == [0.25, 0.25, 1.0]


@pytest.mark.parametrize("act", ["tanh", "elu", "selu", "softplus"])
def test_bias_act_keeps_relative_precision_for_tiny_and_huge_inputs(act):
    x = torch.tensor([1e-6, -1e-6, 3e-4, -3e-4, -30.0, 30.0, -120.0, 120.0],
                     dtype=torch.float64)
    y = ba.bias_act_forward(x.float().to(DEVICE), None, 0, act, 0.2, 1.0, None).cpu().double()
    truth = truth_forward(x.float(), None, 0, act, 0.2, 1.0, None)
    assert torch.isfinite(y).all()
    assert ((y - truth).abs() <= 1e-6 * truth.abs() + 1e-30).all(), (y, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bias_act_handles_any_dim_layout_and_odd_sizes(dtype):
    cases = [
        # (x, dim): a strided slice, a transposed tensor, channels-last, a 1-element axis,
        # bias along the last axis (FC layers), a rank-1 tensor.
        (rand(4, 6, 9, seed=4)[:, ::2].to(dtype), 1),
        (rand(3, 7, 5, seed=5).to(dtype).transpose(1, 2), 2),
        (rand(2, 3, 5, 4, seed=6).to(dtype).contiguous(memory_format=torch.channels_last), 1),
        (rand(2, 1, 3, 3, seed=7).to(dtype), 1),
        (rand(5, 11, seed=8).to(dtype), -1),
        (rand(13, seed=9).to(dtype), 0),
    ]
    for x, dim in cases:
        b = rand(x.shape[dim], seed=10).to(dtype)
        dy = rand(*x.shape, seed=11).to(dtype)
        x_d = x.to(DEVICE)
        if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4:
            x_d = x_d.contiguous(memory_format=torch.channels_last)
        y = ba.bias_act_forward(x_d, b.to(DEVICE), dim, "swish", 0.2, 1.4, 1.0)
        what = f"shape {tuple(x.shape)} strides {x_d.stride()} dim {dim}"
        assert_close(y, truth_forward(x, b, dim, "swish", 0.2, 1.4, 1.0),
                     same_dtype_forward(x, b, dim, "swish", 0.2, 1.4, 1.0), dtype, what)
        dx = ba.bias_act_backward(dy.to(DEVICE), x_d, b.to(DEVICE), dim, "lrelu", 0.2, 1.4,
                                  None, 1)
        assert_close(dx, truth_backward(dy, x, b, dim, "lrelu", 0.2, 1.4, None, 1), None,
                     dtype, what)


def test_bias_act_output_keeps_a_dense_input_layout():
    x = rand(2, 3, 4, 5, seed=12).float().to(DEVICE).contiguous(memory_format=torch.channels_last)
    y = ba.bias_act_forward(x, None, 1, "relu", 0.0, 1.0, None)
    assert y.stride() == x.stride()


def test_bias_act_without_bias_and_empty_tensors():
    x = rand(4, 3, seed=13).float()
    y = ba.bias_act_forward(x.to(DEVICE), None, 1, "sigmoid", 0.0, 2.0, None)
    assert_close(y, truth_forward(x, None, 1, "sigmoid", 0.0, 2.0, None), None, torch.float32,
                 "no bias")
    empty = torch.empty(0, 3, device=DEVICE)
    assert ba.bias_act_forward(empty, torch.zeros(3, device=DEVICE), 1, "relu", 0.0, 1.0,
                               None).shape == (0, 3)


def test_bias_act_refuses_bad_input_with_a_clear_error(monkeypatch):
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32"):
        ba.bias_act_forward(x.double(), None, 1, "relu", 0.0, 1.0, None)
    with pytest.raises(ValueError, match="act must be one of"):
        ba.bias_act_forward(x, None, 1, "gelu", 0.0, 1.0, None)
    with pytest.raises(ValueError, match="b must be 1-D"):
        ba.bias_act_forward(x, torch.zeros(2, device=DEVICE), 1, "relu", 0.0, 1.0, None)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        ba.bias_act_backward(x, x, None, 1, "relu", 0.0, 1.0, None, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ba.bias_act_forward(torch.zeros(2, 3), None, 1, "relu", 0.0, 1.0, None)



@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("clamp", [None, 1.0])
def test_bias_act_keeps_nan_inputs_nan_like_the_reference(act, clamp):
    # Triton's default min / max return the non-NaN operand: relu, elu, selu and the clamp
    # turned a NaN (a diverging layer) into 0 or -clamp, hiding it from non-finite checks.
    x = torch.tensor([[float("nan"), 1.0, -1.0, float("inf"), -float("inf")]], device=DEVICE)
    fast = ops.bias_act(x, None, act=act, clamp=clamp, impl="triton")
    ref = ops.bias_act(x, None, act=act, clamp=clamp, impl="ref")
    torch.testing.assert_close(fast, ref, equal_nan=True, msg=f"{act} clamp={clamp}")

@pytest.mark.parametrize("act", ["lrelu", "tanh", "swish"])
def test_bias_act_ops_triton_matches_ops_reference_with_gradients(act):
    x = rand(2, 4, 3, 3, seed=14, scale=2).float().to(DEVICE).requires_grad_(True)
    b = rand(4, seed=15).float().to(DEVICE).requires_grad_(True)
    dy = rand(2, 4, 3, 3, seed=16).float().to(DEVICE)
    results = {}
    for impl in ("triton", "ref"):
        y = ops.bias_act(x, b, act=act, clamp=2.0, impl=impl)
        dx, db = torch.autograd.grad(y, [x, b], dy, create_graph=True)
        (ddx,) = torch.autograd.grad((dx * dy).sum(), [x])
        results[impl] = (y, dx, db, ddx)
    for what, fast, ref in zip(["y", "dx", "db", "d(dx . dy)/dx"], results["triton"],
                               results["ref"]):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5, msg=f"{act} {what}")


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine every test compiles the kernel for real")
def test_bias_act_kernel_compiles_for_an_nvidia_gpu():
    compile_without_gpu("bias_act", """
for dtype, act, order, block_i in [("fp16", 2, 0, 16), ("bf16", 3, 2, 4096), ("fp32", 8, 1, 1),
                                   ("fp16", 7, 1, 256)]:
    types = dict(x_ptr="*" + dtype, b_ptr="*" + dtype, dy_ptr="*" + dtype, out_ptr="*" + dtype,
                 rows="i64", inner="i64", channels="i32", alpha="fp32", gain="fp32",
                 clamp="fp32")
    compile_for_sm90(kernels._bias_act_kernel, types,
                     dict(ACT=act, ORDER=order, HAS_BIAS=True, HAS_CLAMP=True,
                          BLOCK_R=4096 // block_i, BLOCK_I=block_i), 8)
""")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: a tensor past 2**31 elements")
def test_bias_act_indexes_past_two_to_the_31_elements():
    x = torch.zeros((2 ** 31 + 8192) // 2048, 2048, dtype=torch.float16, device="cuda")
    x[-1, -1] = -1.0
    b = torch.arange(x.shape[1], device="cuda", dtype=torch.float16) * 0
    y = ba.bias_act_forward(x, b, 1, "lrelu", 0.5, 2.0, None)
    assert y[-1, -1].item() == -1.0
    del y
    dx = ba.bias_act_backward(x, x, None, 1, "lrelu", 0.5, 2.0, None, 1)
    assert dx[-1, -1].item() == -1.0


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: a StyleGAN-sized tensor")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bias_act_matches_float64_on_stylegan_sized_layers(dtype):
    x = torch.randn(16, 256, 64, 64, device="cuda").to(dtype)
    b = torch.randn(256, device="cuda").to(dtype)
    y = ba.bias_act_forward(x, b, 1, "lrelu", 0.2, math.sqrt(2), 256.0)
    xc, bc = x.cpu(), b.cpu()
    assert_close(y, truth_forward(xc, bc, 1, "lrelu", 0.2, math.sqrt(2), 256.0),
                 same_dtype_forward(xc, bc, 1, "lrelu", 0.2, math.sqrt(2), 256.0), dtype,
                 "stylegan layer")


# ---- non-finite inputs and gradients: the fast paths follow the reference -------------------
#
# The reference (ops.bias_act with impl="ref") is torch: y = clamp(act(x + b) * gain) and its
# derivatives are whatever torch's backward formulas give. For non-finite values they are:
#   first order, dx = B(G, z) with G = where(|y| <= clamp, dy, 0) * gain (clamp_backward picks
#     dy or 0: a NaN dy outside the clamp, or any dy at a NaN y, becomes 0), then B is the
#     activation's backward: relu `y <= 0 ? 0 : G` (a NaN z passes G), lrelu `z > 0 ? G :
#     G * alpha`, elu / selu `z <= 0 ? G * c * exp(z) : G * scale` (a NaN z passes G * scale),
#     softplus `z > 20 ? G : G * sigmoid(z)`, and plain products G * act'(z) for linear, tanh,
#     sigmoid and swish. So a NaN z gives G for relu, G * alpha for lrelu, G * scale for elu
#     and selu, NaN for tanh, sigmoid, softplus and swish, and, under a clamp, 0 for the
#     piecewise-linear activations but still NaN for the smooth ones (0 * NaN). elu and selu
#     at a NaN z are torch's one ambiguity: its vectorised CPU kernel gives NaN, its scalar
#     loop (and CUDA) G * scale, so the same tensor holds both; the fast paths give NaN.
#   second order (the grad of dx . ddx with respect to x) is exactly 0 for linear, relu and
#     lrelu whatever ddx and dy hold (torch's backward has no derivative there), else a product
#     of ddx, G and act''(z), NaN when any factor is (for elu / selu act'' is 0 at z = 0).
# Finite values are compared with the reference run in float64 on the same inputs (in low
# precision torch's own tanh' = 1 - tanh^2 is off by 20% at z = 3).
# The fast paths compute the second order from the single product ddx * dy, so they cannot
# tell a NaN in ddx (which torch keeps outside the clamp) from one in dy (which it drops): they
# keep it. The second-order outputs may therefore hold a NaN that the reference has not, but
# only where the clamp cuts the output; every other value agrees, NaN for NaN and inf for inf.

NONFINITE_Z = [float("nan"), float("inf"), -float("inf"), 0.0, 0.5, -0.5, 3.0, -3.0, 25.0, -25.0]
# (x, b) columns where the bias brings the non-finite value.
NONFINITE_BIAS_COLUMNS = [(1.0, float("nan")), (-1.0, float("inf")), (2.0, -float("inf"))]
NONFINITE_UPSTREAM = [(dy, ddx) for dy in (1.3, 0.0, float("nan"), float("inf"), -float("inf"))
                      for ddx in (0.7, float("nan"), float("inf"))]
NONFINITE_CLAMP = 0.9  # no output lies within a few bf16 steps of it
NONFINITE_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _nonfinite_inputs(dtype, device):
    rows = len(NONFINITE_UPSTREAM)
    x_row = NONFINITE_Z + [x for x, _ in NONFINITE_BIAS_COLUMNS]
    b = [0.0] * len(NONFINITE_Z) + [b for _, b in NONFINITE_BIAS_COLUMNS]
    x = torch.tensor([x_row] * rows, dtype=dtype, device=device)
    dy = torch.tensor([[dy] * len(x_row) for dy, _ in NONFINITE_UPSTREAM], dtype=dtype,
                      device=device)
    ddx = torch.tensor([[ddx] * len(x_row) for _, ddx in NONFINITE_UPSTREAM], dtype=dtype,
                       device=device)
    return x, torch.tensor(b, dtype=dtype, device=device), dy, ddx


def _all_orders(impl, x, b, dy, ddx, act, clamp):
    """y, dx = d(y . dy)/dx, and d(dx . ddx)/dx and /d(dy), through autograd."""
    x = x.clone().requires_grad_(True)
    dy = dy.clone().requires_grad_(True)
    y = ops.bias_act(x, b, dim=1, act=act, clamp=clamp, impl=impl)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    d_x = d_dy = None
    if dx.requires_grad:
        d_x, d_dy = torch.autograd.grad(dx, [x, dy], ddx, allow_unused=True)
    # No graph (linear without a clamp) or an unused input: that derivative is exactly 0.
    d_x = torch.zeros_like(x) if d_x is None else d_x
    d_dy = torch.zeros_like(x) if d_dy is None else d_dy
    return {"y": y, "dx": dx, "d(dx.ddx)/dx": d_x, "d(dx.ddx)/d(dy)": d_dy}


def _describe(where, x, b, dy, ddx):
    row, col = where
    return (f"x={x[row, col].item()} b={b[col].item()} dy={dy[row, col].item()} "
            f"ddx={ddx[row, col].item()}")


def assert_nonfinite_agreement(fast, ref, ref64, dtype, what, inputs, extra_nan_allowed=None,
                               nan_required=None):
    """NaN where the reference is NaN (any non-finite where an upstream gradient is infinite,
    as inf * 0 and rounding decide between inf and NaN there), inf of the same sign where it
    is inf, values close to the float64 reference elsewhere. A NaN the reference lacks only
    where extra_nan_allowed; a NaN wherever nan_required."""
    x, b, dy, ddx = inputs
    fast, ref, ref64 = (t.detach().double().cpu() for t in (fast, ref, ref64))
    inf_upstream = (~torch.isfinite(dy) | ~torch.isfinite(ddx)).cpu()
    lenient = inf_upstream & ~torch.isfinite(ref)
    required = torch.zeros_like(ref, dtype=torch.bool)
    if nan_required is not None:
        required = nan_required.cpu().expand_as(ref)
    checks = [
        ("NaN where the reference is NaN", ref.isnan() & ~lenient & ~fast.isnan()),
        ("NaN at a NaN z (of torch's two answers, the one that keeps it)",
         required & ~fast.isnan()),
        ("non-finite where the reference is", lenient & torch.isfinite(fast)),
        ("inf where the reference is inf", ref.isinf() & ~lenient & ~required & (fast != ref)),
    ]
    extra = fast.isnan() & ~ref.isnan() & ~lenient & ~required
    if extra_nan_allowed is not None:
        extra &= ~extra_nan_allowed.cpu()
    checks.append(("no NaN where the reference has none", extra))
    for rule, bad in checks:
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise AssertionError(f"{what}: {rule}; {bad.sum().item()} elements, e.g. at "
                                 f"{_describe(where, x, b, dy, ddx)}: got "
                                 f"{fast[tuple(where)].item()}, reference "
                                 f"{ref[tuple(where)].item()}")
    both = torch.isfinite(fast) & torch.isfinite(ref) & ~required
    rtol = NONFINITE_RTOL[dtype]
    close = (fast - ref64).abs() <= rtol * (ref64.abs() + 1)
    if (both & ~close).any():
        where = (both & ~close).nonzero()[0].tolist()
        raise AssertionError(f"{what}: value at {_describe(where, x, b, dy, ddx)}: got "
                             f"{fast[tuple(where)].item()}, float64 reference "
                             f"{ref64[tuple(where)].item()}")


def check_nonfinite_values_follow_the_reference(impl, act, clamp, dtype, device):
    """The shared body of the Triton and CUDA tests (run by each for its own impl)."""
    inputs = _nonfinite_inputs(dtype, device)
    fast = _all_orders(impl, *inputs, act, clamp)
    ref = _all_orders("ref", *inputs, act, clamp)
    ref64 = _all_orders("ref", *(t.double() for t in inputs), act, clamp)
    x, b = inputs[:2]
    clamped = None
    if clamp is not None:
        pre_clamp = ops.bias_act(x, b, dim=1, act=act, impl="ref")
        clamped = ~(pre_clamp.abs() <= clamp)  # NaN included
    nan_z = None
    if act in ("elu", "selu"):
        nan_z = (x + b).isnan()
    for what in fast:
        allowed = clamped if what.startswith("d(dx") else None
        assert_nonfinite_agreement(fast[what], ref[what], ref64[what], dtype,
                                   f"{impl} {act} clamp={clamp} {dtype}: {what}", inputs,
                                   extra_nan_allowed=allowed,
                                   nan_required=nan_z if what != "y" else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("clamp", [None, NONFINITE_CLAMP])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bias_act_nan_and_inf_in_inputs_and_gradients_follow_the_reference(act, clamp, dtype):
    # The kernels zeroed the gradient wherever the clamp mask was off, a NaN z included
    # (torch gives NaN for the smooth activations there: 0 * act'(NaN)), took the derivative
    # of relu at a NaN z as 0 (torch passes dy), multiplied a NaN or inf dy by relu's
    # derivative 0 (torch selects 0), gave linear, relu and lrelu a NaN second derivative
    # for a NaN ddx or dy (torch: exactly 0) and elu / selu one of 1 at z = 0 (torch: 0).
    check_nonfinite_values_follow_the_reference("triton", act, clamp, dtype, DEVICE)
