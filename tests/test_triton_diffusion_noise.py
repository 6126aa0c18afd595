"""The Triton diffusion-noise kernel: the formula against float64, and the drawn noise.

With noise given, y = x_scale[n] * x + noise_scale[n] * noise is checked against float64, the
kernel's error bounded by a small multiple of PyTorch's own error in the kernel's dtype. Without
noise, eps is recovered from the kernel (x_scale 0, noise_scale 1) and checked for what the
contract promises: reproducible from (seed, offset + index), different for different seeds,
standard normal, uncorrelated. Without a GPU the kernel runs in Triton's interpreter, so tensors
stay small.
"""
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batikfast import backends, ops  # noqa: E402
from tests._support import (REPLAY, compile_without_gpu, documented_eps,  # noqa: E402
                            fresh_generator, philox4x32_10, philox_rounds)

dn = backends.triton_kernels("diffusion_noise")

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
FLOOR = {torch.float32: 4e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rand(*shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def per_sample(scale, like):
    return scale.reshape([-1] + [1] * (like.ndim - 1))


def draw(shape, seed, offset=0, dtype=torch.float32):
    """The kernel's eps for a tensor of ``shape``: x_scale 0 and noise_scale 1."""
    x = torch.zeros(shape, dtype=dtype, device=DEVICE)
    ones = torch.ones(shape[0], device=DEVICE)
    return dn.diffusion_noise_forward(x, ones * 0, ones, None, seed, offset).cpu().double()


def assert_close(out, truth, baseline, dtype, what, floor=None):
    assert out.dtype == dtype and out.shape == truth.shape, what
    out = out.double().cpu()
    err = (out - truth).abs().max().item()
    base = (baseline.double().cpu() - truth).abs().max().item()
    allowed = max(4 * base, (floor or FLOOR[dtype]) * (truth.abs().max().item() or 1.0))
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


# Shapes: rank 1 to 4, samples smaller and larger than the kernel's block (so both ways of
# finding an element's sample run), an odd element count, a single sample.
SHAPES = [(5,), (3, 7), (2, 3, 11, 13), (1, 1, 1, 1), (4, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diffusion_noise_with_given_noise_matches_float64(dtype):
    for k, shape in enumerate(SHAPES):
        x = rand(*shape, seed=k).to(dtype)
        noise = rand(*shape, seed=100 + k).to(dtype)
        x_scale = torch.rand(shape[0], generator=torch.Generator().manual_seed(k))
        noise_scale = torch.rand(shape[0], generator=torch.Generator().manual_seed(50 + k)) * 0.1
        y = dn.diffusion_noise_forward(x.to(DEVICE), x_scale.to(DEVICE), noise_scale.to(DEVICE),
                                       noise.to(DEVICE), 7, 0)
        truth = (per_sample(x_scale.double(), x) * x.double()
                 + per_sample(noise_scale.double(), x) * noise.double())
        baseline = (per_sample(x_scale.to(dtype), x) * x
                    + per_sample(noise_scale.to(dtype), x) * noise)
        assert_close(y, truth, baseline, dtype, f"shape {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diffusion_noise_without_noise_scale_is_the_scaled_input(dtype):
    x = rand(3, 2, 9, 5, seed=1).to(dtype)
    x_scale = torch.tensor([0.5, -1.25, 3.0])
    y = dn.diffusion_noise_forward(x.to(DEVICE), x_scale.to(DEVICE), None, None, 0, 0)
    truth = per_sample(x_scale.double(), x) * x.double()
    assert_close(y, truth, (per_sample(x_scale, x) * x.float()).to(dtype), dtype, "x_scale * x")


def test_diffusion_noise_reads_non_contiguous_inputs():
    base = rand(4, 6, 10, seed=2).float()
    x = base.transpose(1, 2)[:, ::2]
    noise = rand(4, 10, 6, seed=3).float()[:, 1::2]
    x_scale, noise_scale = torch.rand(8)[::2], torch.rand(4)
    y = dn.diffusion_noise_forward(x.to(DEVICE), x_scale.to(DEVICE), noise_scale.to(DEVICE),
                                   noise.to(DEVICE), 0, 0)
    truth = (per_sample(x_scale.double(), x) * x.double()
             + per_sample(noise_scale.double(), x) * noise.double())
    assert_close(y, truth, truth.float(), torch.float32, "non-contiguous")


def test_diffusion_noise_draws_the_same_noise_for_the_same_seed_and_offset():
    first = draw((3, 5, 7), seed=1234)
    assert torch.equal(first, draw((3, 5, 7), seed=1234))
    # A seed past 2**32 uses its high word too.
    big = draw((3, 5, 7), seed=2 ** 40 + 1234)
    assert (big != first).float().mean() > 0.99


def test_diffusion_noise_differs_between_seeds_samples_and_positions():
    a, b = draw((2, 300), seed=1), draw((2, 300), seed=2)
    assert (a != b).float().mean() > 0.99
    assert (a[0] != a[1]).float().mean() > 0.99
    assert a.unique().numel() > 0.99 * a.numel()


@pytest.mark.parametrize("offset", [1, 4, 6, 2 ** 34 + 3])
def test_diffusion_noise_is_keyed_by_offset_plus_flat_index(offset):
    whole = draw((1, 40), seed=5, offset=offset - 1).reshape(-1)
    # The same numbers, one element on: a draw at offset k equals a draw at 0 shifted by k.
    part = draw((3, 13), seed=5, offset=offset).reshape(-1)
    assert torch.equal(part, whole[1:40])


def test_diffusion_noise_counters_past_two_to_the_32_do_not_wrap_around():
    # Four elements share a 32-bit-word counter, so offset 2**34 is counter 2**32.
    assert (draw((1, 8), seed=5, offset=2 ** 34) != draw((1, 8), seed=5, offset=0)).all()


def test_reference_philox_reproduces_the_published_known_answers():
    # Random123's known-answer vectors for philox4x32_10 (counter 0 key 0; all ones).
    zero = philox4x32_10(np.array([0], dtype=np.uint64), 0)
    assert [int(w[0]) for w in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = np.array([0xFFFFFFFF], dtype=np.uint64)
    c = philox_rounds([ones] * 4, np.uint64(0xFFFFFFFF), np.uint64(0xFFFFFFFF))
    assert [int(w[0]) for w in c] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,seed,offset", [
    ((3, 5, 7), 0, 0), ((2, 300), 12345, 3), ((4, 1, 3, 9), 2 ** 62 - 1, 2 ** 40 + 6),
    ((1, 1, 1, 1), 7, 1)], ids=str)
def test_diffusion_noise_draws_the_documented_philox_normals(shape, seed, offset, dtype):
    """The stream itself, not only its statistics: Box-Muller normals of Philox4x32-10 words of
    counter (offset + flat index) // 4 keyed by seed, lanes in the documented order, the same
    stream the CUDA kernel draws (so a run's noise does not depend on the backend)."""
    gen = fresh_generator("documented philox", shape, seed, offset, str(dtype))
    big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
    x = big.to(dtype)[..., ::2]  # a gap after every element: neither contiguous nor dense
    x_scale = torch.rand(shape[0], generator=gen) + 0.1
    noise_scale = torch.rand(shape[0], generator=gen) + 0.1
    y = dn.diffusion_noise_forward(x.to(DEVICE), x_scale.to(DEVICE), noise_scale.to(DEVICE),
                                   None, seed, offset)
    eps = documented_eps(seed, offset, x.numel()).reshape(shape)
    truth = (per_sample(x_scale.double(), x) * x.double()
             + per_sample(noise_scale.double(), x) * eps)
    baseline = per_sample(x_scale, x) * x.float() + per_sample(noise_scale, x) * eps.float()
    # In fp32 the kernel's log / sqrt / sin / cos err by ulps of eps (|eps| < 6): 4e-6.
    assert_close(y, truth, baseline.to(dtype), dtype, f"seed {seed} offset {offset}; {REPLAY}",
                 floor=4e-6 if dtype == torch.float32 else None)


def test_diffusion_noise_is_standard_normal_and_uncorrelated():
    eps = draw((4, 4096), seed=99).reshape(-1)
    n = eps.numel()
    assert abs(eps.mean().item()) < 4 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 4 / math.sqrt(2 * n)
    # Each of the four Philox words of a counter, on its own, is standard normal too.
    for lane in range(4):
        words = eps[lane::4]
        assert abs(words.std().item() - 1) < 4 / math.sqrt(2 * words.numel())
    # Gaussian shape: the mass within one and two sigma, and the fourth moment.
    within_one = (eps.abs() < 1).double().mean().item()
    within_two = (eps.abs() < 2).double().mean().item()
    assert abs(within_one - 0.6827) < 0.02 and abs(within_two - 0.9545) < 0.01
    assert abs((eps ** 4).mean().item() - 3) < 0.25
    for lag in (1, 2, 4, 7):
        corr = (eps[:-lag] * eps[lag:]).mean().item()
        assert abs(corr) < 4 / math.sqrt(n), f"lag {lag} correlation {corr}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diffusion_noise_drawn_noise_enters_the_formula(dtype):
    x = rand(3, 4, 5, seed=4).to(dtype)
    x_scale, noise_scale = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.01, 0.03, 0.05])
    eps = draw(x.shape, seed=77)
    y = dn.diffusion_noise_forward(x.to(DEVICE), x_scale.to(DEVICE), noise_scale.to(DEVICE),
                                   None, 77, 0)
    truth = per_sample(x_scale.double(), x) * x.double() + per_sample(noise_scale.double(), x) * eps
    baseline = (per_sample(x_scale, x) * x.float() + per_sample(noise_scale, x) * eps.float())
    assert_close(y, truth, baseline.to(dtype), dtype, "drawn noise")


def test_diffusion_noise_empty_input_gives_empty_output():
    x = torch.empty(0, 3, device=DEVICE)
    y = dn.diffusion_noise_forward(x, torch.empty(0, device=DEVICE), None, None, 0, 0)
    assert y.shape == (0, 3)


def test_diffusion_noise_refuses_bad_input_with_a_clear_error(monkeypatch):
    x, s = torch.zeros(2, 3, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32"):
        dn.diffusion_noise_forward(x.double(), s, s, None, 0, 0)
    with pytest.raises(ValueError, match="x_scale must be"):
        dn.diffusion_noise_forward(x, torch.ones(3, device=DEVICE), s, None, 0, 0)
    with pytest.raises(ValueError, match="noise must be a tensor of x's shape"):
        dn.diffusion_noise_forward(x, s, s, torch.zeros(3, 2, device=DEVICE), 0, 0)
    with pytest.raises(ValueError, match="seed must be"):
        dn.diffusion_noise_forward(x, s, s, None, -1, 0)
    with pytest.raises(ValueError, match="offset must be"):
        dn.diffusion_noise_forward(x, s, s, None, 0, -4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        dn.diffusion_noise_forward(torch.zeros(2, 3), torch.ones(2), None, None, 0, 0)


def test_diffusion_noise_triton_op_matches_the_reference_op_with_given_noise():
    x = rand(3, 3, 6, 5, seed=8).float().to(DEVICE)
    noise = rand(3, 3, 6, 5, seed=9).float().to(DEVICE)
    t = torch.tensor([0, 5, 9], device=DEVICE)
    sqrt_ab = torch.linspace(1, 0.1, 10, device=DEVICE)
    sqrt_1mab = (1 - sqrt_ab ** 2).sqrt()
    fast = ops.diffusion_noise(x, t, sqrt_ab, sqrt_1mab, noise=noise, impl="triton")
    ref = ops.diffusion_noise(x, t, sqrt_ab, sqrt_1mab, noise=noise, impl="ref")
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine every test compiles the kernel for real")
def test_diffusion_noise_kernel_compiles_for_an_nvidia_gpu():
    compile_without_gpu("diffusion_noise", """
for dtype, given, shift, two in [("fp16", False, 0, True), ("bf16", True, 3, False),
                                 ("fp32", False, 1, False)]:
    types = dict(x_ptr="*" + dtype, x_scale_ptr="*fp32", noise_scale_ptr="*fp32",
                 noise_ptr="*" + dtype, y_ptr="*" + dtype, numel="i64", per_sample="i64",
                 batch="i32", seed="i64", first_counter="i64")
    compile_for_sm90(kernels._diffusion_noise_kernel, types,
                     dict(HAS_NOISE_SCALE=True, GIVEN_NOISE=given, SHIFT=shift,
                          AT_MOST_TWO_SAMPLES=two, BLOCK=4096), 8)
""")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: a tensor past 2**31 elements")
def test_diffusion_noise_indexes_past_two_to_the_31_elements():
    numel = 2 ** 31 + 4096
    x = torch.ones(2, numel // 2, dtype=torch.float16, device="cuda")
    ones = torch.ones(2, device="cuda")
    y = dn.diffusion_noise_forward(x, ones * 0.5, ones * 0, None, 3, 0)
    assert y[-1, -4:].tolist() == [0.5] * 4
    noise = dn.diffusion_noise_forward(x, ones * 0, ones, None, 3, 0)
    tail = noise[-1, -4096:].float()
    assert abs(tail.std().item() - 1) < 0.1 and not torch.equal(tail, noise[0, -4096:].float())


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: a batch of 256x256 images")
def test_diffusion_noise_is_standard_normal_on_a_training_batch():
    eps = draw((64, 3, 256, 256), seed=2024).reshape(-1)
    assert abs(eps.mean().item()) < 1e-3 and abs(eps.std().item() - 1) < 1e-3
