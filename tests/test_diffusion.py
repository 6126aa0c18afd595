"""Diffusion-GAN's adaptive forward diffusion (schedules, T from p, the t pool)."""
import io
import math
from pathlib import Path

import pytest
import torch

from batikfast import backends
from batikfast.diffusion import BETA_SCHEDULES, Diffusion, beta_schedule


def sqrt_alpha_bar_by_hand(T, t, start=1e-4, end=2e-2):
    betas = [start + (end - start) * i / (T - 1) for i in range(T)]
    return math.sqrt(math.prod(1 - b for b in betas[:t]))


@pytest.mark.parametrize("T, signal, noise", [(10, 0.951, 0.0155), (100, 0.603, 0.040),
                                              (1000, 0.0064, 0.050)])
def test_linear_schedule_endpoints_match_diffusion_gan(T, signal, noise):
    diffusion = Diffusion(t_min=T, t_max=T)
    assert diffusion.T == T
    assert diffusion.sqrt_alpha_bar.shape == (T + 1,)
    assert diffusion.sqrt_alpha_bar[0] == 1 and diffusion.sqrt_one_minus_alpha_bar[0] == 0
    last = diffusion.sqrt_alpha_bar[-1].item()
    assert last == pytest.approx(sqrt_alpha_bar_by_hand(T, T), rel=1e-5)
    assert last == pytest.approx(signal, abs=6e-4)
    assert 0.05 * diffusion.sqrt_one_minus_alpha_bar[-1].item() == pytest.approx(noise, abs=6e-4)
    mid = T // 2
    assert diffusion.sqrt_alpha_bar[mid].item() == pytest.approx(
        sqrt_alpha_bar_by_hand(T, mid), rel=1e-5)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_every_beta_schedule_gives_T_betas_in_the_unit_interval(name):
    for T in (1, 7, 50):
        betas = beta_schedule(name, T)
        assert betas.shape == (T,) and betas.dtype == torch.float64
        assert (betas > 0).all() and (betas <= 1).all()


def test_beta_schedules_have_their_defining_shapes():
    T = 20
    assert torch.allclose(beta_schedule("quadratic", T),
                          torch.linspace(1e-2, 2e-2 ** 0.5, T, dtype=torch.float64) ** 2)
    assert torch.equal(beta_schedule("constant", T), torch.full([T], 2e-2, dtype=torch.float64))
    assert torch.allclose(beta_schedule("jsd", T), 1 / torch.arange(T, 0, -1).double())
    sigmoid = beta_schedule("sigmoid", T)
    assert sigmoid[0] > 1e-4 and sigmoid[-1] < 2e-2 and (sigmoid.diff() > 0).all()
    cosine_alpha_bar = torch.cumprod(1 - beta_schedule("cosine", T), 0)
    # Diffusion-GAN samples the cosine on T + 1 points spread over [0, T + 1].
    f = lambda k: math.cos((k / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine_alpha_bar[T // 2 - 1].item() == pytest.approx(f(T // 2) / f(0), rel=1e-9)
    assert beta_schedule("cosine", T)[-1] == 0.999  # clipped
    with pytest.raises(ValueError, match="beta_schedule"):
        Diffusion(beta_schedule="exponential")


def test_t_zero_leaves_the_image_clean():
    diffusion = Diffusion(p=0.5)
    x = torch.randn(3, 3, 8, 8)
    x_t, t = diffusion(x, t=torch.zeros(3, dtype=torch.long))
    assert torch.equal(x_t, x) and torch.equal(t, torch.zeros(3, dtype=torch.long))


def test_noise_has_the_scheduled_scale_and_the_gradient_is_sqrt_alpha_bar():
    diffusion = Diffusion(p=1.0, impl="ref")
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    t = torch.tensor([1000, 400])
    x_t, _ = diffusion(x, t=t)
    a, b = diffusion.sqrt_alpha_bar[t], diffusion.sqrt_one_minus_alpha_bar[t]
    residual = (x_t - a[:, None, None, None] * x).detach()
    for n in range(2):
        assert residual[n].std().item() == pytest.approx(0.05 * b[n].item(), rel=0.05)
    (grad,) = torch.autograd.grad(x_t.sum(), x)
    torch.testing.assert_close(grad, a[:, None, None, None].expand_as(x))


def test_p_and_T_follow_the_ada_rule_on_a_scripted_sequence_of_signs():
    diffusion = Diffusion(seed=1)
    batch, step = 64, 64 * 4 / (100 * 1000)
    script = [1.0] * 10 + [0.5] * 3 + [0.6] * 2 + [0.65] * 2 + [-1.0] * 30
    expected_p = 0.0
    for mean_sign in script:
        positives = round((mean_sign + 1) / 2 * batch)
        logits = torch.cat([torch.full([positives, 1], 2.0),
                            torch.full([batch - positives, 1], -3.0)])
        for minibatch in range(4):
            diffusion.accumulate(logits)
            updated = diffusion.step(batch)
            assert updated == (minibatch == 3)
        actual = (2 * positives - batch) / batch
        expected_p += step * ((actual > 0.6) - (actual < 0.6))
        expected_p = min(max(expected_p, 0.0), 1.0)
        assert diffusion.p == pytest.approx(expected_p, abs=1e-12)
        assert diffusion.T == min(max(10 + round(expected_p * 990), 10), 1000)
        assert torch.allclose(diffusion.betas,
                              torch.linspace(1e-4, 2e-2, diffusion.T, dtype=torch.float64))
    assert diffusion.p == 0.0 and diffusion.T == 10


def test_p_is_clipped_at_one():
    diffusion = Diffusion(p=0.999, ada_kimg=1)
    diffusion.adjust(1.0, batch_size=64)
    assert diffusion.p == 1.0 and diffusion.T == 1000


def test_pool_is_redrawn_whenever_T_is_updated():
    diffusion = Diffusion(seed=3)
    pool = diffusion.pool.clone()
    diffusion.adjust(1.0, batch_size=64 * 1000)
    assert diffusion.T > 10 and not torch.equal(pool, diffusion.pool)
    assert diffusion.pool.max() <= diffusion.T


@pytest.mark.parametrize("ts_dist, weight", [("priority", lambda k: k), ("uniform", lambda k: 1)])
def test_t_pool_holds_half_zeros_and_draws_from_the_distribution(ts_dist, weight):
    T = 10
    diffusion = Diffusion(t_min=T, t_max=T, ts_dist=ts_dist, seed=7)
    counts = torch.zeros(T + 1)
    redraws = 1500
    for _ in range(redraws):
        diffusion.update_T()
        pool = diffusion.pool
        assert pool.shape == (64,) and (pool == 0).sum() == 32
        draws = pool[pool > 0]
        assert draws.numel() == 32 and draws.max() <= T
        counts += torch.bincount(pool, minlength=T + 1).float()
    frequencies = counts[1:] / counts[1:].sum()
    expected = torch.tensor([float(weight(k)) for k in range(1, T + 1)])
    expected /= expected.sum()
    # 48000 draws: a frequency's standard error is below 0.0022.
    torch.testing.assert_close(frequencies, expected, atol=0.009, rtol=0)


def test_per_image_t_comes_from_the_pool():
    diffusion = Diffusion(p=0.3, seed=2)
    t = torch.cat([diffusion.sample_t(64) for _ in range(50)])
    assert set(t.tolist()) <= set(diffusion.pool.tolist())
    assert (t == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    _, t_call = diffusion(torch.zeros(5, 3, 4, 4))
    assert t_call.dtype == torch.int64 and t_call.shape == (5,)


def test_state_round_trips_through_a_weights_only_checkpoint():
    diffusion = Diffusion(p=0.2, seed=11)
    diffusion(torch.zeros(2, 1, 2, 2))
    diffusion.accumulate(torch.ones(8, 1))
    diffusion.step(64)
    buffer = io.BytesIO()
    torch.save(diffusion.state_dict(), buffer)
    buffer.seek(0)
    restored = Diffusion(seed=0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.p, restored.T) == (diffusion.p, diffusion.T)
    assert torch.equal(restored.pool, diffusion.pool)
    x = torch.randn(4, 3, 8, 8)
    a, ta = diffusion(x)
    b, tb = restored(x)
    assert torch.equal(ta, tb) and torch.equal(a, b)
    for d in (diffusion, restored):
        for _ in range(3):
            d.accumulate(torch.ones(8, 1))
            d.step(64)
    assert diffusion.p == restored.p and torch.equal(diffusion.pool, restored.pool)


def test_ranks_share_p_T_and_pool_but_draw_their_own_t():
    ranks = [Diffusion(seed=5, rank=r) for r in range(2)]
    for d in ranks:
        d.adjust(1.0, batch_size=64 * 50)
    assert ranks[0].T == ranks[1].T and torch.equal(ranks[0].pool, ranks[1].pool)
    assert not torch.equal(ranks[0].sample_t(256), ranks[1].sample_t(256))


def test_augment_probability_is_p_capped_at_a_quarter():
    class Pipe:
        p = torch.zeros([])

    pipe = Pipe()
    diffusion = Diffusion(augment_pipe=pipe, p=0.1)
    assert pipe.p.item() == pytest.approx(0.1)
    diffusion.p = 0.7
    diffusion.update_T()
    assert pipe.p.item() == 0.25 and diffusion.augment_p == 0.25


def test_bad_arguments_raise_errors_naming_them():
    with pytest.raises(ValueError, match="ts_dist"):
        Diffusion(ts_dist="sometimes")
    with pytest.raises(ValueError, match="t_min"):
        Diffusion(t_min=20, t_max=10)
    with pytest.raises(ValueError, match="p"):
        Diffusion(p=1.5)


def _triton_diffusion_missing():
    kernel = Path(backends.__file__).resolve().parent.parent / "kernels" / "diffusion_noise.py"
    if not kernel.exists():
        return "the Triton kernel batikfast.kernels.diffusion_noise is not there (not yet written?)"
    return backends.triton_unavailable_reason(torch.device("cpu"), torch.float32)


@pytest.mark.skipif(bool(_triton_diffusion_missing()), reason=str(_triton_diffusion_missing()))
def test_noising_matches_between_reference_and_triton_for_given_noise():
    x = torch.randn(3, 3, 5, 7)[:, :, :, ::2]  # odd, non-contiguous
    noise = torch.randn_like(x)
    t = torch.tensor([0, 4, 9])
    outputs = []
    for impl in ("ref", "triton"):
        diffusion = Diffusion(p=0.0, impl=impl)
        x_t, _ = diffusion(x, t=t, noise=noise)
        outputs.append(x_t)
    torch.testing.assert_close(outputs[1], outputs[0])
