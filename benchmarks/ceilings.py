"""The device's ceilings, measured here rather than taken from a data sheet.

- copy bandwidth: a large device-to-device copy, counting the bytes read plus the bytes written;
- matmul throughput: large square matmuls in bf16, fp16 and fp32 with TF32 off and on.

Results are fractions of what this device really sustains, so "80% of copy bandwidth" means
80% of a plain ``copy_`` on the same GPU, not of the vendor's peak figure.
"""
from __future__ import annotations

import torch

from benchmarks.common import Timer

# Sizes large enough to saturate an H100/H200, small enough for ~1 s of work in all.
GPU_COPY_BYTES = 2 * 2**30
GPU_MATMUL_SIZE = 8192
# On the CPU the figures only label the (not comparable) quick run.
CPU_COPY_BYTES = 8 * 2**20
CPU_MATMUL_SIZE = 128


def measure_copy_gbps(device: torch.device, timer: Timer, nbytes: int | None = None) -> float:
    nbytes = nbytes or (GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, timer: Timer, dtype: torch.dtype,
                          allow_tf32: bool = False, size: int | None = None) -> float:
    size = size or (GPU_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        timing = timer(lambda: torch.mm(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device, timer: Timer) -> dict:
    """``{"copy_gbps": ..., "matmul_tflops": {"bf16", "fp16", "fp32", "tf32"}}``."""
    tflops = {
        "bf16": measure_matmul_tflops(device, timer, torch.bfloat16),
        "fp16": measure_matmul_tflops(device, timer, torch.float16),
        "fp32": measure_matmul_tflops(device, timer, torch.float32, allow_tf32=False),
        "tf32": measure_matmul_tflops(device, timer, torch.float32, allow_tf32=True),
    }
    return {
        "copy_gbps": measure_copy_gbps(device, timer),
        "matmul_tflops": tflops,
        "how": ("copy: dst.copy_(src), bytes read + written; matmul: square "
                f"{GPU_MATMUL_SIZE if device.type == 'cuda' else CPU_MATMUL_SIZE}^3 torch.mm, "
                "2*n^3 FLOPs; fp32 with TF32 off, tf32 = fp32 with TF32 on"),
    }


def flops_ceiling_key(dtype: torch.dtype) -> str:
    """Which matmul ceiling a convolution in ``dtype`` is measured against.

    cuDNN runs fp32 convolutions in TF32 when ``torch.backends.cudnn.allow_tf32`` is on
    (PyTorch's default), so that is the fair ceiling for them then.
    """
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def roofline_fraction(ms: float, nbytes: float, flops: float, ceilings: dict,
                      dtype: torch.dtype) -> float | None:
    """The measured time's share of the roofline bound ``max(bytes / BW, FLOPs / peak)``.

    1.0 means the op ran at the device's measured copy bandwidth or matmul throughput,
    whichever binds; memory-bound ops reduce to achieved GB/s over copy GB/s.
    """
    if not ms or ms <= 0 or not ceilings:
        return None
    bound_s = nbytes / (ceilings["copy_gbps"] * 1e9)
    if flops:
        peak = ceilings["matmul_tflops"].get(flops_ceiling_key(dtype))
        if peak:
            bound_s = max(bound_s, flops / (peak * 1e12))
    return bound_s / (ms * 1e-3)
