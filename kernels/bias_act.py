"""Fused bias + activation (NVIDIA's ``bias_act``) and its first and second derivatives.

``bias_act_forward`` computes, in one pass over ``x``::

    z = x + b.reshape([-1 if axis == dim else 1 for axis in range(x.ndim)])   # if b is given
    y = act(z, alpha) * gain
    y = y.clamp(-clamp, clamp)                                                   # if clamp is given

``bias_act_backward`` computes ``dx = dy * gain * act^(order)(z) * (|act(z) * gain| <= clamp)``
for ``order`` 1 or 2 (the caller reduces dx to the bias gradient and wires autograd).

Non-finite values follow torch's backward formulas, which the reference differentiates with: the
clamp selects dy or 0 before the activation's derivative multiplies it (so a NaN z under a clamp
still gives 0 * NaN = NaN for the smooth activations), relu selects dy or 0 (a NaN z passes dy,
a NaN dy at z <= 0 gives 0), and the second derivative of linear, relu and lrelu is exactly 0.
See ``_chain``.

Layout. The kernel walks the tensor's storage, not its logical shape: any dense layout
(contiguous, channels-last, any permutation of axes) is read and written in place of a copy,
and the output takes the input's strides. Seen through memory, the bias axis splits storage
into rows of ``inner = x.stride(dim)`` elements with bias index ``row % C``, so each program
handles a [BLOCK_R, BLOCK_I] tile of (row, position-in-row): the bias index is computed once
per row instead of an integer division per element (a 64-bit division per element would cost
more than the memory traffic on an H100).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._checks import check_device, grid_x, interpreter_tiles, interpreting, launch_device

ACT_CODES = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "elu": 5, "selu": 6,
             "softplus": 7, "swish": 8}
_PIECEWISE_LINEAR = (ACT_CODES["linear"], ACT_CODES["relu"], ACT_CODES["lrelu"])
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SELU_SCALE = tl.constexpr(1.0507009873554805)
_SELU_ALPHA = tl.constexpr(1.6732632423543772)
# Read when the kernels are decorated, as triton.jit decides then whether to interpret them.
_LIBDEVICE_EXP = tl.constexpr(not interpreting())
# min / max that return NaN for a NaN operand, as torch's relu, elu and clamp do (Triton's
# default returns the other operand, which turned a NaN input into 0 or into -clamp).
_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _exp(z):
    """exp(z) to about one ulp. On NVIDIA GPUs tl.exp is an approximate ex2 of the rounded
    z * log2(e), up to 3e-6 relative error for |z| near 80 (softplus(-30) would lose 1e-6);
    libdevice's expf keeps full precision. The interpreter has no libdevice, and its tl.exp is
    numpy's, already exact."""
    if _LIBDEVICE_EXP:
        return libdevice.exp(z)
    else:
        return tl.exp(z)


@triton.jit
def _expm1(z):
    """exp(z) - 1 for z <= 0 without cancellation near 0.

    A Taylor polynomial near 0 (|error| < 2e-9 relative below 0.25), exp(z) - 1 beyond, where
    the subtraction loses nothing: libdevice's expm1 does not run in the interpreter."""
    poly = z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0 + z * (
        1.0 / 120.0 + z * (1.0 / 720.0 + z * (1.0 / 5040.0)))))))
    return tl.where(z > -0.25, poly, _exp(z) - 1.0)


@triton.jit
def _log1p(v):
    """log(1 + v) for 0 <= v <= 1, accurate for small v (Taylor polynomial below 1/16)."""
    poly = v * (1.0 + v * (-0.5 + v * (1.0 / 3.0 + v * (-0.25 + v * (0.2 + v * (
        -1.0 / 6.0 + v * (1.0 / 7.0)))))))
    return tl.where(v < 0.0625, poly, tl.log(1.0 + v))


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) from exp(-|z|): never overflows, and keeps relative precision for very
    negative z."""
    e = _exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, r, e * r)


@triton.jit
def _act_and_derivative(z, alpha, ACT: tl.constexpr, ORDER: tl.constexpr):
    """(act(z), act^(ORDER)(z)) in fp32; ORDER 0 returns act(z) twice."""
    if ACT == 0:  # linear
        value = z
        first = tl.full(z.shape, 1.0, tl.float32)
        second = tl.zeros(z.shape, tl.float32)
    elif ACT == 1:  # relu; the derivative at 0 is the left branch's
        value = tl.maximum(z, 0.0, propagate_nan=_NAN)
        first = tl.where(z > 0.0, 1.0, 0.0)
        second = tl.zeros(z.shape, tl.float32)
    elif ACT == 2:  # lrelu
        value = tl.where(z > 0.0, z, z * alpha)
        first = tl.where(z > 0.0, 1.0, alpha)
        second = tl.zeros(z.shape, tl.float32)
    elif ACT == 3:  # tanh, from expm1 of -2|z| so small z keep full relative precision
        t = _expm1(-2.0 * tl.abs(z))
        magnitude = -t / (t + 2.0)
        value = tl.where(z < 0.0, -magnitude, magnitude)
        first = 1.0 - value * value
        second = -2.0 * value * first
    elif ACT == 4:  # sigmoid
        value = _sigmoid(z)
        first = value * (1.0 - value)
        second = first * (1.0 - 2.0 * value)
    elif ACT == 5:  # elu (alpha is not used, as in NVIDIA's bias_act)
        # As torch's elu_backward: the first derivative takes the z <= 0 branch at 0, the
        # second is 0 there (torch multiplies it by z < 0). Both are NaN at a NaN z (as torch's
        # vectorised CPU kernel gives; its scalar loop and CUDA pass dy instead).
        negative = tl.minimum(z, 0.0, propagate_nan=_NAN)
        e = _exp(negative)
        value = tl.where(z > 0.0, z, _expm1(negative))
        first = tl.where(z > 0.0, 1.0, e)
        second = tl.where(z >= 0.0, 0.0, e)
    elif ACT == 6:  # selu, branches as elu's
        negative = tl.minimum(z, 0.0, propagate_nan=_NAN)
        e = _exp(negative)
        value = _SELU_SCALE * tl.where(z > 0.0, z, _SELU_ALPHA * _expm1(negative))
        first = tl.where(z > 0.0, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA * e)
        second = tl.where(z >= 0.0, 0.0, _SELU_SCALE * _SELU_ALPHA * e)
    elif ACT == 7:  # softplus = max(z, 0) + log1p(exp(-|z|)): no overflow for large z
        value = tl.maximum(z, 0.0) + _log1p(_exp(-tl.abs(z)))
        first = _sigmoid(z)
        second = first * (1.0 - first)
    else:  # swish
        s = _sigmoid(z)
        value = z * s
        first = s * (1.0 + z * (1.0 - s))
        second = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if ORDER == 0:
        derivative = value
    elif ORDER == 1:
        derivative = first
    else:
        derivative = second
    return value, derivative


@triton.jit
def _chain(upstream, z, derivative, ACT: tl.constexpr, ORDER: tl.constexpr):
    """upstream * act^(ORDER)(z) with torch's non-finite behaviour: relu's backward selects
    (0 at z <= 0 even for a NaN or inf upstream; a NaN z passes it), and the second derivative
    of the piecewise-linear activations is exactly 0 (torch's backward has none)."""
    if ORDER == 2 and ACT <= 2:  # linear, relu, lrelu (the wrapper launches none of these)
        return tl.zeros(z.shape, tl.float32)
    elif ACT == 1:
        return tl.where(z <= 0.0, 0.0, upstream)
    else:
        return upstream * derivative


@triton.jit
def _bias_act_kernel(x_ptr, b_ptr, dy_ptr, out_ptr, rows, inner, channels, alpha, gain, clamp,
                     ACT: tl.constexpr, ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """Storage seen as [rows, inner], bias index ``row % channels``, z = x + b[row % channels]:
    ORDER 0: out = clamp(act(z) * gain);
    ORDER 1, 2: out = dy * gain * act^(ORDER)(z) * (|act(z) * gain| <= clamp)."""
    pid = tl.program_id(0).to(tl.int64)
    inner_blocks = tl.cdiv(inner, BLOCK_I)
    pid_r = pid // inner_blocks
    pid_i = pid - pid_r * inner_blocks
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    col = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (row < rows)[:, None] & (col < inner)[None, :]
    offsets = row[:, None] * inner + col[None, :]

    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # 32-bit channel arithmetic from the tile's first row: a 64-bit remainder per row
        # would dominate when rows are single elements (inner == 1: FC or channels-last).
        first_channel = ((pid_r * BLOCK_R) % channels).to(tl.int32)
        channel = (first_channel + tl.arange(0, BLOCK_R)) % channels
        z += tl.load(b_ptr + channel, mask=row < rows, other=0.0).to(tl.float32)[:, None]
    value, derivative = _act_and_derivative(z, alpha, ACT, ORDER)
    if ORDER == 0:
        out = value * gain
        if HAS_CLAMP:
            out = tl.minimum(tl.maximum(out, -clamp, propagate_nan=_NAN), clamp,
                             propagate_nan=_NAN)
    else:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_CLAMP:
            inside = tl.abs(value * gain) <= clamp  # False at a NaN output, as torch's
            if ORDER == 1:
                dy = tl.where(inside, dy, 0.0)
            else:
                # The second order gets ddx * dy in one: torch keeps a NaN of ddx outside the
                # clamp and drops one of dy. Which it was is lost, so the NaN is kept.
                dy = tl.where(inside, dy, dy * 0.0)
        out = _chain(dy * gain, z, derivative, ACT, ORDER)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_tensor(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    check_device("bias_act", name, t, like)


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its storage span exactly (a permutation of a contiguous
    layout), so storage order can stand in for logical order."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def output_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides of bias_act_forward's and bias_act_backward's output: x's own when x is
    dense, else contiguous. Fake (meta) implementations must give compiled graphs these. They
    depend on x alone, because a compiled graph may hand the backward a dy whose strides differ
    from those it was traced with."""
    if _is_dense(x):
        return tuple(x.stride())
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _tile(inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_I) for storage rows of ``inner`` elements."""
    # 4096 elements per program (16 per thread with 8 warps) amortise the per-program index
    # arithmetic; the interpreter gets small tiles so tiny test tensors span several programs.
    block = 64 if interpreter_tiles() else 4096
    block_i = min(triton.next_power_of_2(inner), block)
    return block // block_i, block_i


def launch_grid(rows: int, inner: int, block_r: int, block_i: int) -> tuple[int]:
    """One program per [BLOCK_R, BLOCK_I] tile of storage seen as [rows, inner], on axis x."""
    programs = triton.cdiv(rows, block_r) * triton.cdiv(inner, block_i)
    return grid_x("bias_act", programs, f"{rows * inner} elements ({rows} rows of {inner})")


def _launch(x, b, dy, out, dim, act, alpha, gain, clamp, order) -> torch.Tensor:
    numel = x.numel()
    if numel == 0:
        return out
    if b is not None and x.shape[dim] > 1:
        inner = x.stride(dim)
        channels = x.shape[dim]
    else:
        # Without a bias (or with one bias value) the whole tensor is one row.
        inner, channels = numel, 1
    rows = numel // inner
    block_r, block_i = _tile(inner)
    with launch_device(x):
        _bias_act_kernel[launch_grid(rows, inner, block_r, block_i)](
            x, b if b is not None else x, dy if dy is not None else x, out,
            rows, inner, channels, float(alpha), float(gain),
            float(clamp) if clamp is not None else 0.0,
            ACT=ACT_CODES[act], ORDER=order, HAS_BIAS=b is not None, HAS_CLAMP=clamp is not None,
            BLOCK_R=block_r, BLOCK_I=block_i, num_warps=1 if interpreter_tiles() else 8)
    return out


def _check_args(x, b, dim, act, clamp) -> int:
    _check_tensor("x", x)
    if act not in ACT_CODES:
        raise ValueError(f"act must be one of {sorted(ACT_CODES)}, got {act!r}")
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"clamp must be None or >= 0, got {clamp!r}")
    if b is None:
        return 0
    _check_tensor("b", b, like=x)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an axis of x (rank {x.ndim}), got {dim!r}")
    dim %= x.ndim
    if b.ndim != 1 or b.shape[0] != x.shape[dim]:
        raise ValueError(f"b must be 1-D with x.shape[{dim}] = {x.shape[dim]} elements, got shape "
                         f"{tuple(b.shape)}")
    return dim


def bias_act_forward(x, b, dim, act, alpha, gain, clamp):
    """``clamp(act(x + b along dim, alpha) * gain, -clamp, clamp)`` in one pass.

    Args:
        x: float32 / float16 / bfloat16 tensor of any rank and layout.
        b: None or a 1-D tensor of ``x.shape[dim]`` elements (any of the three dtypes).
        dim: the axis of ``x`` that ``b`` runs along.
        act: linear relu lrelu tanh sigmoid elu selu softplus swish.
        alpha: lrelu's negative slope (unused by the others); gain: output scale.
        clamp: None or a float >= 0.

    Returns:
        y of x's shape, dtype and (for dense inputs) strides; math in fp32.
    """
    dim = _check_args(x, b, dim, act, clamp)
    y = torch.empty_strided(x.shape, output_strides(x), dtype=x.dtype, device=x.device)
    if not _is_dense(x):
        x = x.contiguous()
    if b is not None:
        b = b.contiguous()
    return _launch(x, b, None, y, dim, act, alpha, gain, clamp, 0)


def bias_act_backward(dy, x, b, dim, act, alpha, gain, clamp, order):
    """``dy * gain * act^(order)(x + b) * (|act(x + b) * gain| <= clamp)`` for order 1 or 2.

    Arguments as :func:`bias_act_forward`; ``dy`` has x's shape and is cast to fp32 inside.
    Returns dx in x's dtype.
    """
    dim = _check_args(x, b, dim, act, clamp)
    _check_tensor("dy", dy, like=x)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    dx = torch.empty_strided(x.shape, output_strides(x), dtype=x.dtype, device=x.device)
    if order == 2 and ACT_CODES[act] in _PIECEWISE_LINEAR:
        # Their second derivative is 0 everywhere, NaN and inf inputs included (as torch's
        # backward formulas): a fill, not a kernel that reads x and dy to multiply by 0.
        return dx.zero_()
    if not _is_dense(x):
        x = x.contiguous()
    if dy.stride() != x.stride():
        # One walk through storage serves both tensors: dy is copied into x's layout.
        dy = torch.empty_strided(x.shape, x.stride(), dtype=dy.dtype, device=dy.device).copy_(dy)
    if b is not None:
        b = b.contiguous()
    return _launch(x, b, dy, dx, dim, act, alpha, gain, clamp, order)
