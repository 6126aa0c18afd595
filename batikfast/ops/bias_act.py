"""Fused bias + activation: ``y = clamp(act(x + b) * gain, -clamp, clamp)``.

``b`` is broadcast along axis ``dim`` of ``x``. The nine activations and their default
``alpha`` / ``gain`` are NVIDIA's (``torch_utils.ops.bias_act``). The reference is plain
PyTorch, differentiable to every order. The fast implementations (Triton, CUDA) run as the
custom op ``batikfast::bias_act``, whose backward ``batikfast::bias_act_grad`` is itself a
differentiable custom op: the first and second derivatives run in the kernels, higher orders
fall back to PyTorch so gradients of every order exist on every backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from batikfast import backends
from batikfast.ops._autograd import differentiable
from batikfast.ops._validate import check_same_device, check_tensor


@dataclass(frozen=True)
class Activation:
    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


ACTIVATIONS = {
    "linear": Activation(lambda z, a: z, 0.0, 1.0),
    "relu": Activation(lambda z, a: F.relu(z), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda z, a: F.leaky_relu(z, a), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda z, a: torch.tanh(z), 0.0, 1.0),
    "sigmoid": Activation(lambda z, a: torch.sigmoid(z), 0.0, 1.0),
    "elu": Activation(lambda z, a: F.elu(z), 0.0, 1.0),
    "selu": Activation(lambda z, a: F.selu(z), 0.0, 1.0),
    "softplus": Activation(lambda z, a: F.softplus(z), 0.0, 1.0),
    "swish": Activation(lambda z, a: torch.sigmoid(z) * z, 0.0, math.sqrt(2)),
}


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, act: str = "linear",
             alpha: float | None = None, gain: float | None = None, clamp: float | None = None,
             impl: str | None = None) -> torch.Tensor:
    """Add a bias along one axis, apply an activation, scale and clamp, in one pass.

    Args:
        x: input of any rank and floating dtype.
        b: None or a 1-D bias of ``x.shape[dim]`` elements (cast to ``x.dtype``).
        dim: the axis of ``x`` that ``b`` runs along.
        act: one of ``linear relu lrelu tanh sigmoid elu selu softplus swish``.
        alpha: the activation's shape parameter (lrelu slope, default 0.2); None for its default.
        gain: scale applied after the activation; None for the activation's default.
        clamp: None or -1 for no clamping, else clamp the output to ``[-clamp, clamp]``.
        impl: ``"ref"``, ``"triton"``, ``"cuda"`` or None for :mod:`batikfast.backends` to pick.

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    act, alpha, gain, clamp = _checked_arguments(x, b, dim, act, alpha, gain, clamp)
    dim = dim % x.ndim if b is not None else 0
    chosen = backends.resolve("bias_act", x, impl)
    if chosen == "ref":
        return bias_act_reference(x, b, dim, act, alpha, gain, clamp)
    if b is not None and b.dtype not in backends.FAST_DTYPES:
        b = b.to(x.dtype)  # a float64 bias, cast to x's dtype as documented
    return _bias_act_fast(x, b, dim, act, alpha, gain, -1.0 if clamp is None else clamp, chosen)


def _checked_arguments(x, b, dim, act, alpha, gain, clamp):
    check_tensor("x", x)
    if b is not None:
        if not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
            raise ValueError(f"dim must be an axis of x (rank {x.ndim}), got {dim!r}")
        check_tensor("b", b, ndim=1)
        check_same_device(x=x, b=b)
        if b.shape[0] != x.shape[dim]:
            raise ValueError(f"b must have x.shape[{dim}] = {x.shape[dim]} elements, "
                             f"got shape {tuple(b.shape)}")
    return resolve_activation(act, alpha, gain, clamp)


def resolve_activation(act, alpha, gain, clamp):
    """(act, alpha, gain, clamp) with defaults filled in; clamp None when not clamping."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    spec = ACTIVATIONS[act]
    alpha = _number("alpha", spec.def_alpha if alpha is None else alpha)
    gain = _number("gain", spec.def_gain if gain is None else gain)
    if clamp is not None:
        clamp = _number("clamp", clamp, finite=False)
        if not clamp >= 0:  # NaN included: it would clamp every output to NaN
            if clamp != -1:
                raise ValueError(f"clamp must be None, -1 or >= 0, got {clamp!r}")
            clamp = None
    return act, alpha, gain, clamp


def _number(name: str, value, finite: bool = True) -> float:
    """``value`` as a float, or a ValueError naming the argument (float() alone said "could not
    convert string to float: 'a'"; a NaN or infinite alpha or gain made every output NaN)."""
    try:
        number = None if isinstance(value, (bool, str)) else float(value)
    except (TypeError, ValueError, RuntimeError):
        number = None
    if number is None or (finite and not math.isfinite(number)):
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return number


def bias_act_reference(x, b, dim, act, alpha, gain, clamp):
    """Plain PyTorch; ``clamp`` is None or >= 0 here."""
    if b is not None:
        shape = [-1 if axis == dim else 1 for axis in range(x.ndim)]
        x = x + b.to(x.dtype).reshape(shape)
    y = ACTIVATIONS[act].func(x, alpha)
    if gain != 1:
        y = y * gain
    if clamp is not None and clamp <= torch.finfo(y.dtype).max:
        # A clamp past the dtype's range (1e5 in fp16) leaves every finite value as it is and
        # rounds to inf like the infinities it would clamp; torch refuses it as a bound.
        y = y.clamp(-clamp, clamp)
    return y


def _activation_derivative(z: torch.Tensor, act: str, alpha: float, order: int) -> torch.Tensor:
    """d^order act / dz^order, built with autograd so it is differentiable again."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_(True)
        value = ACTIVATIONS[act].func(z_leaf, alpha)
        for _ in range(order):
            if not value.requires_grad:  # the derivative so far is constant: the next is zero
                return torch.zeros_like(z)
            (value,) = torch.autograd.grad(value.sum(), z_leaf, create_graph=True)
    return value


def _bias_act_grad_reference(dy, x, b, dim, act, alpha, gain, clamp, order):
    """``dy * gain * act^(order)(x + b) * clamp mask`` in PyTorch (used past the 2nd order)."""
    z = x if b is None else x + b.to(x.dtype).reshape([-1 if a == dim else 1 for a in range(x.ndim)])
    grad = dy * gain * _activation_derivative(z.float(), act, alpha, order).to(dy.dtype)
    if clamp >= 0:
        y = ACTIVATIONS[act].func(z, alpha) * gain
        grad = grad * (y.abs() <= clamp).to(grad.dtype)
    return grad


def _sum_to_bias(dx: torch.Tensor, dim: int) -> torch.Tensor:
    others = [axis for axis in range(dx.ndim) if axis != dim]
    # sum(dim=[]) sums over every axis: a 1-D x is its own bias gradient.
    return dx.sum(dim=others) if others else dx


def _kernel_clamp(clamp: float) -> float | None:
    return None if clamp < 0 else clamp


@torch.library.custom_op("batikfast::bias_act", mutates_args=())
def _bias_act_op(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: float,
                 gain: float, clamp: float, impl: str) -> torch.Tensor:
    return backends.kernels("bias_act", impl).bias_act_forward(
        x, b, dim, act, alpha, gain, _kernel_clamp(clamp))


def _empty_output(x, impl):
    """The output a kernel gives, as metadata: a compiled graph must see its real strides (the
    Triton kernel keeps a dense input's layout; the CUDA kernel writes contiguous outputs)."""
    strides_rule = getattr(backends.kernels("bias_act", impl), "output_strides", None)
    if strides_rule is None:
        return x.new_empty(x.shape)
    return x.new_empty_strided(x.shape, strides_rule(x))


@_bias_act_op.register_fake
def _(x, b, dim, act, alpha, gain, clamp, impl):
    return _empty_output(x, impl)


def _bias_act_setup(ctx, inputs, output):
    x, b, ctx.dim, ctx.act, ctx.alpha, ctx.gain, ctx.clamp, ctx.impl = inputs
    ctx.save_for_backward(x, b)


def _bias_act_backward(ctx, dy):
    x, b = ctx.saved_tensors
    dx = _bias_act_grad_fast(dy, x, b, ctx.dim, ctx.act, ctx.alpha, ctx.gain,
                                           ctx.clamp, 1, ctx.impl)
    db = _sum_to_bias(dx, ctx.dim).to(b.dtype) if b is not None and ctx.needs_input_grad[1] else None
    return dx, db, None, None, None, None, None, None


_bias_act_fast = differentiable(_bias_act_op, _bias_act_setup, _bias_act_backward)


@torch.library.custom_op("batikfast::bias_act_grad", mutates_args=())
def _bias_act_grad_op(dy: torch.Tensor, x: torch.Tensor, b: Optional[torch.Tensor], dim: int,
                      act: str, alpha: float, gain: float, clamp: float, order: int,
                      impl: str) -> torch.Tensor:
    return backends.kernels("bias_act", impl).bias_act_backward(
        dy, x, b, dim, act, alpha, gain, _kernel_clamp(clamp), order)


@_bias_act_grad_op.register_fake
def _(dy, x, b, dim, act, alpha, gain, clamp, order, impl):
    return _empty_output(x, impl)


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, b, ctx.dim, ctx.act, ctx.alpha, ctx.gain, ctx.clamp, ctx.order, ctx.impl = inputs
    ctx.save_for_backward(dy, x, b)


def _bias_act_grad_backward(ctx, ddx):
    dy, x, b = ctx.saved_tensors
    args = (ctx.dim, ctx.act, ctx.alpha, ctx.gain, ctx.clamp)
    d_dy = _bias_act_grad_fast(ddx, x, b, *args, ctx.order, ctx.impl)
    next_order = ctx.order + 1
    if next_order <= 2:
        d_x = _bias_act_grad_fast(ddx * dy, x, b, *args, next_order, ctx.impl)
    else:
        d_x = _bias_act_grad_reference(ddx * dy, x, b, *args, next_order)
    d_b = _sum_to_bias(d_x, ctx.dim).to(b.dtype) if b is not None and ctx.needs_input_grad[2] else None
    return d_dy, d_x, d_b, None, None, None, None, None, None, None


_bias_act_grad_fast = differentiable(_bias_act_grad_op, _bias_act_grad_setup,
                                     _bias_act_grad_backward)
