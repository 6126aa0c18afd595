"""Every Triton kernel launches on the GPU that holds its tensors, not on the current one.

Triton launches on the current CUDA device and its current stream, whatever device the pointers
live on; torch's own ops make their tensors' device current themselves. Checked without a GPU:
fake CUDA tensors on device 1 stand in for a second GPU, a stand-in for ``torch.cuda.device``
tracks which device would be current, and recorders replace the compiled kernels. With two GPUs
the last test runs the real kernels on the second one.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from batikfast import backends, ops

OTHER_GPU = torch.device("cuda", 1)


class CurrentDevice:
    """Stands in for ``torch.cuda.device``: a stack of the device indices made current."""
    stack: list = []

    def __init__(self, device):
        self.index = torch.device("cuda", device).index if isinstance(device, int) else \
            torch.device(device).index

    def __enter__(self):
        CurrentDevice.stack.append(self.index)

    def __exit__(self, *exc):
        CurrentDevice.stack.pop()


class RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel: records the device current at each launch."""

    def __init__(self):
        self.launched_on = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched_on.append(CurrentDevice.stack[-1] if CurrentDevice.stack else None)
        return launch


def _kernel_calls():
    """(module, name of its jit kernel, a call of its wrapper on tensors of OTHER_GPU)."""
    def rand(*shape):
        return torch.randn(*shape, device=OTHER_GPU)

    x4 = rand(2, 3, 6, 5)
    yield "bias_act", "_bias_act_kernel", lambda k: k.bias_act_forward(
        x4, rand(3), 1, "lrelu", 0.2, 1.4, None)
    yield "bias_act", "_bias_act_kernel", lambda k: k.bias_act_backward(
        rand(2, 3, 6, 5), x4, rand(3), 1, "lrelu", 0.2, 1.4, None, 1)
    yield "upfirdn2d", "_upfirdn2d_kernel", lambda k: k.upfirdn2d(
        x4, rand(4, 4), 2, 2, 1, 1, 2, 1, 2, 1, False, 4.0)
    yield "modulated_conv2d", "_modulated_conv2d_fwd_kernel", lambda k: k.modulated_conv2d_forward(
        x4, rand(4, 3, 3, 3), rand(2, 3), rand(2, 4), rand(2, 1, 6, 5), rand(4), "lrelu", 0.2,
        1.4, None, 1)
    yield "diffusion_noise", "_diffusion_noise_kernel", lambda k: k.diffusion_noise_forward(
        x4, rand(2), rand(2), None, 7, 0)


def test_every_kernel_launches_with_its_tensors_gpu_current(monkeypatch):
    # The interpreter's launch configuration: it asks no GPU for its multiprocessor count.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("BATIKFAST_INTERPRET_DEVICE_TILES", raising=False)
    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for op, kernel_name, call in _kernel_calls():
            module = backends.triton_kernels(op)
            recorder = RecordingKernel()
            monkeypatch.setattr(module, kernel_name, recorder)
            call(module)
            assert recorder.launched_on == [OTHER_GPU.index], (
                f"{op}: launched with {recorder.launched_on} current, not {OTHER_GPU}")
    assert CurrentDevice.stack == []


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two GPUs: runs the kernels on cuda:1 while cuda:0 is current")
def test_ops_on_a_second_gpu_match_the_reference():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g).to(OTHER_GPU)
    weight = torch.randn(4, 3, 3, 3, generator=g).to(OTHER_GPU)
    styles = (torch.randn(2, 3, generator=g) + 1).to(OTHER_GPU)
    f = ops.setup_filter([1, 3, 3, 1], device=OTHER_GPU)

    def layer(impl):
        y = ops.modulated_conv2d(x, weight, styles, padding=1, impl=impl, act="lrelu")
        y = ops.upfirdn2d(y, f, up=2, padding=[2, 1], gain=4, impl=impl)
        return ops.bias_act(y, act="lrelu", impl=impl)

    expected = layer("ref")
    got = layer("triton")
    torch.cuda.synchronize(OTHER_GPU)
    torch.testing.assert_close(got, expected, rtol=4e-3, atol=4e-3)
