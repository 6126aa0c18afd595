"""Autograd for the fast paths that works under torch.compile and torch.func alike, and costs
little host time in eager mode.

A ``torch.library.custom_op`` with ``register_autograd`` compiles without graph breaks, but its
generated autograd.Function does not support torch.func transforms (torch 2.14 refuses it:
"must override the setup_context staticmethod"). So each fast op is applied through a small
autograd.Function of the setup_context form, built from the same setup and backward functions
that are also registered on the custom op (for direct calls of ``torch.ops.batikfast.*``).

Plain eager calls take a cheaper road to the same kernels. Most of an eager call's host time
went to a custom op's Python dispatch (its autograd and backend wrappers) and to a setup_context
autograd.Function's ``apply``, which binds the arguments with ``inspect.signature`` on every
call: with bias_act's kernel stubbed, a forward call took 187 us through the registered op and
53 us directly on this project's CPU (``benchmarks/results/host-overhead-cpu-2026-12-08/``).
So in eager mode, with no torch.func transform, no tensor subclass and no torch dispatch mode
(fake and distributed tensors, flop counters: they dispatch through the op), the op's
implementation runs directly inside a ctx-in-forward autograd.Function, which profiler traces
show as ``<op>_function``. ``benchmarks/host_overhead.py`` measures both roads.
"""
import contextlib
from typing import Callable, Iterator

import torch

# Types whose calls need nothing from the dispatcher: everything else (FakeTensor, DTensor,
# other __torch_dispatch__ subclasses) goes through the registered op and its fake kernel.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_direct_eager_calls = True


@contextlib.contextmanager
def through_the_dispatcher() -> Iterator[None]:
    """Within: eager calls take the registered op's road too (to compare the two roads)."""
    global _direct_eager_calls
    before, _direct_eager_calls = _direct_eager_calls, False
    try:
        yield
    finally:
        _direct_eager_calls = before


def differentiable(op, setup_fn: Callable, backward_fn: Callable) -> Callable:
    """Register ``backward_fn`` on custom op ``op``; return a function applying it with autograd
    (through the op itself under torch.compile, through an autograd.Function in eager mode)."""
    op.register_autograd(backward_fn, setup_context=setup_fn)
    # Dynamo traces an OpOverload inside an autograd.Function, not the CustomOpDef wrapper.
    name = op._name
    overload = getattr(getattr(torch.ops, op._namespace), name).default
    # The function the custom op was made from (a private attribute of torch 2.11 to 2.14; a
    # torch without it keeps every call on the dispatcher's road).
    implementation = getattr(op, "_init_fn", overload)

    def run(*args):
        if _needs_dispatcher(args):
            return overload(*args)
        return implementation(*args)

    class OpFunction(torch.autograd.Function):
        """The setup_context form, which torch.func transforms require."""

        @staticmethod
        def forward(*args):
            return overload(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_fn(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward_fn(ctx, *grads)

    class EagerOpFunction(torch.autograd.Function):
        """The ctx-in-forward form: its ``apply`` binds no signature."""

        @staticmethod
        def forward(ctx, *args):
            output = run(*args)
            setup_fn(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward_fn(ctx, *grads)

    # Profiler traces show the eager road's autograd.Function by this name (<op>_function).
    EagerOpFunction.__name__ = EagerOpFunction.__qualname__ = f"{name}_function"
    OpFunction.__name__ = OpFunction.__qualname__ = f"{name}_transformable_function"

    def apply(*args):
        # Dynamo cannot trace an autograd.Function applied inside another one's backward; the
        # custom op with its registered autograd compiles cleanly and computes the same.
        if torch.compiler.is_compiling():
            return overload(*args)
        if not _direct_eager_calls or torch._C._are_functorch_transforms_active():
            return OpFunction.apply(*args)
        return EagerOpFunction.apply(*args)

    return apply


def _needs_dispatcher(args) -> bool:
    """Whether a call must go through the registered op: under a torch dispatch mode
    (FakeTensorMode, FlopCounterMode, ...) or with tensor subclasses."""
    if torch._C._len_torch_dispatch_stack():
        return True
    return any(type(arg) not in _PLAIN_TENSOR_TYPES
               for arg in args if isinstance(arg, torch.Tensor))
