"""StyleGAN2 / Wasserstein losses with augmentation and diffusion before the discriminator.

These run on the CPU on every machine (networks and tensors are made without a device); only the
backend comparison at the end takes the ``device`` fixture, the GPU where there is one. R1 through
ADA's resampling relies on batikfast.augment.grid_sample (torch 2.11 cannot differentiate
F.grid_sample twice, on the CPU either)."""

import pytest
import torch
import torch.nn.functional as F

import batikfast
from batikfast.augment import AugmentPipe
from batikfast.diffusion import Diffusion
from batikfast.loss import StyleGAN2Loss, lazy_regularization, make_loss
from batikfast.networks import Discriminator, Generator
from tests.test_networks import fast_backend_unavailable, full_fp32_on_gpu

Z = 8


def tiny_networks():
    torch.manual_seed(0)
    G = Generator(Z, 0, Z, 8, 3, channel_base=64, channel_max=8, conv_clamp=256,
                  mapping_kwargs=dict(num_layers=2))
    D = Discriminator(0, 8, 3, channel_base=64, channel_max=8, conv_clamp=256,
                      mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=2))
    for layer in G.synthesis.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.1)  # a zero strength has a zero noise gradient
    return G, D


class LinearD(torch.nn.Module):
    """D(img) = <img, W>: its R1 gradient is known in closed form."""

    def __init__(self, shape=(3, 8, 8)):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(shape))
        self.seen_t = []

    def forward(self, img, c, t):
        self.seen_t.append(t)
        return (img * self.W).sum(dim=[1, 2, 3])[:, None]


def fixed_t_diffusion(t, noise_std=0.05):
    diffusion = Diffusion(t_min=20, t_max=20, noise_std=noise_std, impl="ref")
    diffusion.pool = torch.full([64], t, dtype=torch.long)
    return diffusion


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def batch(n=4):
    return torch.randn(n, 3, 8, 8), None, torch.randn(n, Z), None


@pytest.mark.parametrize("loss_name", ["stylegan2", "wgan"])
def test_every_phase_sends_gradients_where_it_should(loss_name):
    G, D = tiny_networks()
    loss = make_loss(loss_name, G, D, diffusion=Diffusion(p=0.3, seed=1),
                     augment_pipe=AugmentPipe.bgc(p=0.3))
    real, real_c, z, c = batch()
    for phase in ("Gmain", "Greg", "Gboth"):
        G.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        stats = loss.accumulate_gradients(phase, real, real_c, z, c)
        D.requires_grad_(True)
        for name, grad in grads(G).items():
            assert grad is not None and torch.isfinite(grad).all(), (phase, name)
            if phase == "Greg" and name.endswith("torgb.bias"):
                continue  # the path length does not depend on the output biases
            assert grad.abs().sum() > 0, (phase, name)
        assert ("pl_penalty" in stats) == (phase != "Gmain")
    for phase in ("Dmain", "Dreg", "Dboth"):
        D.zero_grad(set_to_none=True)
        G.zero_grad(set_to_none=True)
        stats = loss.accumulate_gradients(phase, real, real_c, z, c)
        for name, grad in grads(D).items():
            assert grad is not None and torch.isfinite(grad).all(), (phase, name)
            if phase == "Dreg" and name.endswith("bias"):
                continue  # R1 sees biases after the last curved op only through lrelu masks
            assert grad.abs().sum() > 0, (phase, name)
        assert all(grad is None for grad in grads(G).values()), "D phases must not train G"
        assert ("r1_penalty" in stats) == (phase != "Dmain")
    assert loss.pl_mean > 0


def test_r1_is_taken_through_the_noising_step_on_the_clean_image():
    torch.manual_seed(1)
    D = LinearD()
    diffusion = fixed_t_diffusion(7)
    gamma = 3.0
    loss = StyleGAN2Loss(None, None, D, diffusion=diffusion, r1_gamma=gamma)
    real = torch.randn(4, 3, 8, 8)
    stats = loss.accumulate_gradients("Dreg", real, None, None, None)
    a = diffusion.sqrt_alpha_bar[7].item()
    w_norm2 = D.W.detach().square().sum()
    # d D(a x + b eps) / dx = a W for every sample.
    torch.testing.assert_close(stats["r1_penalty"], torch.full([4], a * a * w_norm2.item()))
    # Double backward: d/dW of gamma/2 * a^2 |W|^2.
    torch.testing.assert_close(D.W.grad, gamma * a * a * D.W.detach())
    assert (D.seen_t[-1] == 7).all()


def test_logistic_and_wasserstein_losses_have_their_definitions():
    torch.manual_seed(2)
    G, _ = tiny_networks()
    for name in ("stylegan2", "wgan"):
        D = LinearD()
        loss = make_loss(name, G, D, diffusion=fixed_t_diffusion(0))
        real, real_c, z, c = batch()
        g = loss.accumulate_gradients("Gmain", real, real_c, z, c)
        d = loss.accumulate_gradients("Dmain", real, real_c, z, c)
        fake, real_scores = d["scores/fake"], d["scores/real"]
        if name == "stylegan2":
            torch.testing.assert_close(g["G/loss"], F.softplus(-g["scores/fake"]))
            torch.testing.assert_close(d["D/loss"], F.softplus(fake) + F.softplus(-real_scores))
        else:
            torch.testing.assert_close(g["G/loss"], -g["scores/fake"])
            torch.testing.assert_close(d["D/loss"], fake - real_scores)
            D.zero_grad()
            torch.manual_seed(9)
            loss.accumulate_gradients("Dmain", real, real_c, z, c)
            torch.manual_seed(9)
            with torch.no_grad():
                fake_img, _ = loss.run_G(z, c)
            # d/dW mean(D(fake) - D(real)) = mean(fake) - mean(real) for a linear D at t = 0.
            torch.testing.assert_close(D.W.grad, fake_img.mean(0) - real.mean(0))


def test_path_length_mean_moves_by_the_decay():
    G, D = tiny_networks()
    loss = make_loss("stylegan2", G, D, diffusion=Diffusion(seed=0), pl_batch_shrink=2)
    real, real_c, z, c = batch()

    def regularise(decay):
        loss.pl_decay = decay
        torch.manual_seed(11)  # the same path lengths at every call (G is not stepped)
        return loss.accumulate_gradients("Greg", real, real_c, z, c)

    # From zero, decay 1 moves the mean all the way: to this minibatch's mean length m, so the
    # penalty (length - m)^2 of the two samples (batch shrink 2) is the same for both.
    stats = regularise(1.0)
    assert stats["pl_penalty"].shape == (2,)
    torch.testing.assert_close(stats["pl_penalty"][0], stats["pl_penalty"][1])
    m = loss.pl_mean.item()
    assert m > 0 and stats["pl_penalty"].mean() < m ** 2
    # From zero again, decay 0.01 moves it 1% of the way to m, then 1% of the remaining way
    # (checking only that it moved would pass with the decay ignored or reversed).
    loss.pl_mean = torch.zeros([])
    regularise(0.01)
    assert loss.pl_mean.item() == pytest.approx(0.01 * m, rel=1e-4)
    regularise(0.01)
    assert loss.pl_mean.item() == pytest.approx((0.01 + 0.01 * 0.99) * m, rel=1e-4)


def test_style_mixing_splices_two_latents_at_a_cutoff():
    G, D = tiny_networks()
    loss = make_loss("stylegan2", G, D, style_mixing_prob=1.0)
    torch.manual_seed(3)
    _, ws = loss.run_G(torch.randn(2, Z), None)
    changes = (ws[:, 1:] != ws[:, :-1]).any(dim=2).any(dim=0)
    assert changes.sum() == 1, "exactly one cutoff where the second latent takes over"
    loss.style_mixing_prob = 0.0
    _, ws = loss.run_G(torch.randn(2, Z), None)
    assert (ws == ws[:, :1]).all()


def test_real_logit_signs_feed_the_diffusion_adaptation_and_images_are_augmented():
    G, D = tiny_networks()
    calls = []

    class CountingAugment(torch.nn.Module):
        def forward(self, img):
            calls.append(img.shape[0])
            return img

    diffusion = Diffusion(seed=0)
    loss = make_loss("stylegan2", G, D, diffusion=diffusion, augment_pipe=CountingAugment())
    real, real_c, z, c = batch()
    loss.accumulate_gradients("Dmain", real, real_c, z, c)
    assert calls == [4, 4], "fake and real images both pass the augmentation"
    assert diffusion.sign_stats()[1] == 4


def test_lazy_regularization_hyperparameters():
    lr, betas = lazy_regularization(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas[0] == 0.0 and betas[1] == pytest.approx(0.99 ** (16 / 17))
    assert lazy_regularization(0.01, (0.5, 0.9), None) == (0.01, (0.5, 0.9))


def test_bad_arguments_raise_errors_naming_them():
    with pytest.raises(ValueError, match="loss"):
        make_loss("hinge", *tiny_networks())
    loss = make_loss("stylegan2", *tiny_networks())
    with pytest.raises(ValueError, match="phase"):
        loss.accumulate_gradients("Gall", *batch())


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_regularisation_gradients_match_between_reference_and_fast_backends(impl, device):
    reason = fast_backend_unavailable(impl, device)
    if reason:
        pytest.skip(reason)
    results = {}
    try:
        with full_fp32_on_gpu():
            for backend in ("ref", impl):
                batikfast.set_backend(backend)
                torch.manual_seed(0)
                # Interpreted Triton is slow: the smallest networks that still resample.
                G = Generator(4, 0, 4, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                              mapping_kwargs=dict(num_layers=1)).to(device)
                D = Discriminator(0, 8, 3, channel_base=32, channel_max=4, conv_clamp=256,
                                  mapping_kwargs=dict(num_layers=1),
                                  epilogue_kwargs=dict(mbstd_group_size=2)).to(device)
                # No noise, so both backends see the same inputs; t > 0 so that cmap is not
                # zero (at initialisation the t-embedding of t = 0 is exactly zero).
                loss = make_loss("stylegan2", G, D, device=device, style_mixing_prob=0.0,
                                 diffusion=fixed_t_diffusion(5, noise_std=0.0))
                torch.manual_seed(4)
                real = torch.randn(2, 3, 8, 8, device=device)
                z = torch.randn(2, 4, device=device)
                loss.accumulate_gradients("Dreg", real, None, z, None)
                torch.manual_seed(5)
                loss.accumulate_gradients("Greg", real, None, z, None)
                results[backend] = [p.grad.clone()
                                    for p in list(D.parameters()) + list(G.parameters())]
    finally:
        batikfast.set_backend(None)
    tolerance = 1e-3 if device.type == "cpu" else 2e-2  # kernels may use TF32 on a GPU
    for ref, fast in zip(results["ref"], results[impl]):
        scale = ref.abs().max().item()
        torch.testing.assert_close(fast, ref, rtol=tolerance, atol=tolerance * max(scale, 0.1))
