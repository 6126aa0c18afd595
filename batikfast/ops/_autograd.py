"""Autograd for the fast paths that works under torch.compile and torch.func alike.

A ``torch.library.custom_op`` with ``register_autograd`` compiles without graph breaks, but its
generated autograd.Function does not support torch.func transforms (torch 2.14 refuses it:
"must override the setup_context staticmethod"). So each fast op is applied through a small
autograd.Function of the setup_context form, built from the same setup and backward functions
that are also registered on the custom op (for direct calls of ``torch.ops.batikfast.*``).
"""
from typing import Callable

import torch


def differentiable(op, setup_fn: Callable, backward_fn: Callable) -> Callable:
    """Register ``backward_fn`` on custom op ``op``; return a function applying it with autograd
    (through the autograd.Function in eager mode, through the op itself under torch.compile)."""
    op.register_autograd(backward_fn, setup_context=setup_fn)
    # Dynamo traces an OpOverload inside an autograd.Function, not the CustomOpDef wrapper.
    name = op._name
    overload = getattr(getattr(torch.ops, op._namespace), name).default

    class OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return overload(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_fn(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward_fn(ctx, *grads)

    OpFunction.__name__ = OpFunction.__qualname__ = f"{name}_function"

    def apply(*args):
        # Dynamo cannot trace an autograd.Function applied inside another one's backward; the
        # custom op with its registered autograd compiles cleanly and computes the same.
        if torch.compiler.is_compiling():
            return overload(*args)
        return OpFunction.apply(*args)

    return apply
