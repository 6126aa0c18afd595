"""pytest-benchmark entries: one representative layer per op, every implementation and mode.

    pytest benchmarks/ --benchmark-only                  # GPU: paper256 layers, batch 16
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

On a GPU each timed call ends with a synchronize, so the wall clock covers the kernels; on the
CPU the tiny shapes run (Triton interpreted) and the figures only show the entries work.
``benchmarks/run.py`` is the fuller tool (CUDA events, ceilings, compiled reference).
"""
import pytest
import torch

from benchmarks import opcases, shapes
from benchmarks.common import HAS_GPU, default_device, unavailable_reason

pytest.importorskip("pytest_benchmark")

DEVICE = default_device()
DTYPE = torch.float16 if HAS_GPU else torch.float32
BATCH = 16 if HAS_GPU else 2
# The heaviest memory-bound and compute-bound layers of paper256; tiny shapes on the CPU.
GPU_CASES = ("G.b256.conv1", "G.b64.conv0", "G.b256.act", "G.b128.up2", "D.b256.down2",
             "D.b256.conv1", "D.diffusion_noise")


def _cases():
    if not HAS_GPU:
        return shapes.tiny_cases()
    every = {c.name: c for c in shapes.generator_cases() + shapes.discriminator_cases()}
    return [every[name] for name in GPU_CASES]


@pytest.mark.parametrize("mode", opcases.MODES)
@pytest.mark.parametrize("impl", ("ref", "triton", "cuda"))
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_op(benchmark, case, impl, mode):
    reason = unavailable_reason(impl, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(f"{impl} unavailable: {reason}")
    torch.manual_seed(0)
    inputs = opcases.make_inputs(case, BATCH, DTYPE, DEVICE, mode)
    fn = opcases.make_callable(case, inputs, impl, mode)

    def timed():
        fn()
        if HAS_GPU:
            torch.cuda.synchronize()

    benchmark.group = f"{case.name} {mode}"
    nbytes, flops = opcases.cost(case, BATCH, DTYPE, mode)
    benchmark.extra_info.update(bytes=nbytes, flops=flops, shape=case.describe(BATCH),
                                dtype=str(DTYPE), device=str(DEVICE))
    if HAS_GPU:
        benchmark.pedantic(timed, rounds=50, warmup_rounds=5, iterations=1)
    else:
        benchmark.pedantic(timed, rounds=3, warmup_rounds=1, iterations=1)
