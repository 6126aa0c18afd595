"""Triton kernels of batikfast, installed as ``batikfast.kernels`` (setup.py maps this folder).

One module per op, each exposing the kernel-level functions of the internal contract (no
autograd here; ``batikfast/ops`` wires gradients and dispatch):

- ``bias_act``: ``bias_act_forward``, ``bias_act_backward`` (derivative orders 1 and 2)
- ``upfirdn2d``: ``upfirdn2d`` (polyphase up-sample, FIR filter, down-sample)
- ``diffusion_noise``: ``diffusion_noise_forward`` (per-sample scaling plus in-kernel Philox noise)
- ``modulated_conv2d``: ``modulated_conv2d_forward`` (implicit-GEMM modulated convolution)

The kernels take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was imported (Triton's interpreter, for tests), in float32, float16 or bfloat16, and compute in
float32. This package imports nothing; each module imports triton and compiles on first call.
"""
