"""In eager mode a fast op runs its implementation directly, not through its registered
torch.library op (batikfast.ops._autograd): the same kernels, so the same results and gradients
to the bit, with less host time per call (benchmarks/host_overhead.py measures it). The
registered op is still the road under torch.compile, torch.func transforms, dispatch modes
(fake tensors, flop counters) and tensor subclasses.

The fast ops run in the Triton interpreter on the CPU (TRITON_INTERPRET=1) and on the GPU
where there is one; the CUDA cases skip without a GPU, saying so.
"""
import sys

import pytest
import torch

from batikfast import ops
from batikfast.ops._autograd import differentiable, through_the_dispatcher
from tests._support import DEVICE, FAST_IMPLS, rand, require, schedule


def leaf(*shape, seed):
    return rand(*shape, seed=seed).requires_grad_()


def bias_act_call(impl):
    x, b = leaf(2, 5, 3, 7, seed=1), leaf(5, seed=2)
    return (x, b), lambda: ops.bias_act(x, b, act="swish", clamp=2.0, impl=impl)


def upfirdn2d_call(impl):
    x = leaf(2, 3, 5, 6, seed=3)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=DEVICE)
    return (x,), lambda: ops.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], impl=impl).square()


def modulated_conv2d_call(impl):
    x, weight = leaf(2, 3, 6, 5, seed=4), leaf(4, 3, 3, 3, seed=5)
    styles, bias = leaf(2, 3, seed=6), leaf(4, seed=7)
    noise = rand(2, 1, 6, 5, seed=8)
    return (x, weight, styles, bias), lambda: ops.modulated_conv2d(
        x, weight, styles, noise=noise, padding=1, bias=bias, act="lrelu", impl=impl)


def diffusion_noise_call(impl):
    x = leaf(3, 3, 5, 4, seed=9)
    sab, s1mab = schedule()
    sab.requires_grad_(True)
    t = torch.tensor([0, 4, 9], device=DEVICE)
    return (x, sab), lambda: ops.diffusion_noise(x, t, sab, s1mab, seed=11, impl=impl)


CALLS = {"bias_act": bias_act_call, "upfirdn2d": upfirdn2d_call,
         "modulated_conv2d": modulated_conv2d_call, "diffusion_noise": diffusion_noise_call}


def outputs_and_derivatives(impl, op):
    """The output, its gradients and (where the op has one) a double backward's gradients."""
    inputs, call = CALLS[op](impl)
    y = call()
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    grads = torch.autograd.grad(y, inputs, upstream, create_graph=True, allow_unused=True)
    results = [y.detach()] + [g.detach() for g in grads if g is not None]
    dependent = [g for g in grads if g is not None and g.requires_grad]
    if dependent:
        penalty = sum(g.square().sum() for g in dependent)
        results += [g for g in torch.autograd.grad(penalty, inputs, allow_unused=True)
                    if g is not None]
    return results


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_the_direct_eager_road_gives_the_dispatchers_results_to_the_bit(impl, op, monkeypatch):
    require(impl, op)
    # The convolutions' weight gradient is cuDNN's on a GPU, some of whose algorithms sum in
    # an order that varies between runs; batikfast's own kernels are deterministic.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    direct = outputs_and_derivatives(impl, op)
    with through_the_dispatcher():
        dispatched = outputs_and_derivatives(impl, op)
    assert len(direct) == len(dispatched) >= 2
    for mine, theirs in zip(direct, dispatched):
        assert torch.equal(mine, theirs)


# A custom op of its own, whose implementation records who called it: batikfast's eager road
# (this module's differentiable()) or torch's custom-op machinery behind the dispatcher.
callers = []


@torch.library.custom_op("batikfast_test::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    callers.append(sys._getframe(1).f_globals["__name__"])
    return x * 3


@_triple.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    pass


def _backward(ctx, dy):
    return dy * 3


triple = differentiable(_triple, _setup, _backward)


def road_of(call) -> str:
    callers.clear()
    call()
    assert len(callers) == 1
    return "direct" if callers[0] == "batikfast.ops._autograd" else "dispatcher"


def test_an_eager_call_runs_the_implementation_directly_with_or_without_gradients():
    x = torch.randn(4, requires_grad=True)
    assert road_of(lambda: triple(x)) == "direct"
    assert road_of(lambda: triple(x.detach())) == "direct"
    y = triple(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 3.0))


def test_through_the_dispatcher_is_the_registered_ops_road_and_is_undone_on_exit():
    x = torch.randn(4)
    with through_the_dispatcher():
        assert road_of(lambda: triple(x)) == "dispatcher"
    assert road_of(lambda: triple(x)) == "direct"


def test_a_profile_names_the_op_called_on_the_eager_road():
    x = torch.randn(4, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        assert road_of(lambda: triple(x)) == "direct"
    assert "triple_function" in {event.key for event in profiler.key_averages()}


def test_fake_tensors_get_the_ops_fake_kernel_and_never_the_implementation():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    callers.clear()
    with FakeTensorMode():
        y = triple(torch.randn(4))
    assert isinstance(y, FakeTensor) and callers == []


def test_a_dispatch_mode_sees_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert road_of(lambda: triple(torch.randn(4))) == "dispatcher"


def test_torch_func_transforms_go_through_the_op():
    x = torch.randn(4)
    assert road_of(lambda: torch.func.grad(lambda v: triple(v).sum())(x)) == "dispatcher"
