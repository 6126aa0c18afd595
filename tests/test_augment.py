"""ADA's augmentation pipeline and DiffAugment."""
import pytest
import torch
import torch.nn.functional as F

from batikfast.augment import ADA_BGC, AugmentPipe, DiffAugment, grid_sample


def images(batch=6, channels=3, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


def test_pipeline_is_the_identity_at_p_zero():
    x = images()
    assert AugmentPipe.bgc(p=0.0)(x) is x


def test_xflip_at_p_one_flips_some_images_exactly():
    torch.manual_seed(0)
    x = images(batch=16)
    y = AugmentPipe(xflip=1, p=1.0)(x)
    flipped = 0
    for n in range(16):
        same = torch.allclose(y[n], x[n], atol=1e-5)
        mirrored = torch.allclose(y[n], x[n].flip(-1), atol=1e-5)
        assert same or mirrored
        flipped += mirrored
    assert 0 < flipped < 16


def test_rotate90_gives_exact_quarter_turns():
    torch.manual_seed(1)
    x = images(batch=16)
    y = AugmentPipe(rotate90=1, p=1.0)(x)
    seen = set()
    for n in range(16):
        matches = [k for k in range(4)
                   if torch.allclose(y[n], torch.rot90(x[n], k, dims=(1, 2)), atol=1e-5)]
        assert matches, f"image {n} is not a quarter turn of its input"
        seen.add(matches[0])
    assert len(seen) >= 3


def test_integer_translation_moves_pixels_by_whole_steps():
    torch.manual_seed(2)
    x = images(batch=8, size=16)
    y = AugmentPipe(xint=1, p=1.0)(x)
    steps = []
    for n in range(8):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.allclose(y[n, :, 3:-3, 3:-3],
                                   torch.roll(x[n], shifts=(dy, dx), dims=(1, 2))[:, 3:-3, 3:-3],
                                   atol=1e-5)]
        assert found, f"image {n} is not an integer translation of its input"
        steps.append(found[0])
    # The identity is the translation by (0, 0): some images must really have moved.
    assert any(step != (0, 0) for step in steps), steps


def test_colour_transforms_act_as_their_definitions():
    torch.manual_seed(3)
    x = images(batch=8)
    luma = lambda t: t.mean(dim=1)  # noqa: E731  (projection on the grey axis)
    # Each transform must change the images (the identity also has a constant offset, a
    # constant ratio and an unchanged luma), and change them as its definition says.
    y = AugmentPipe(brightness=1, p=1.0)(x)
    offset = (y - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)
    assert (offset[:, 0].abs() > 1e-3).all(), "brightness left an image unchanged"
    y = AugmentPipe(contrast=1, p=1.0)(x)
    ratio = (y / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert ((ratio[:, 0] - 1).abs() > 1e-3).all(), "contrast left an image unchanged"
    for kind in ("hue", "saturation"):
        y = AugmentPipe(**{kind: 1}, p=1.0)(x)
        torch.testing.assert_close(luma(y), luma(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, x, atol=1e-3)
    y = AugmentPipe(lumaflip=1, p=1.0)(x)
    flipped = 0
    for n in range(8):
        kept = torch.allclose(luma(y)[n], luma(x)[n], atol=1e-5)
        negated = torch.allclose(luma(y)[n], -luma(x)[n], atol=1e-5)
        assert kept or negated
        flipped += negated
    assert 0 < flipped < 8, "lumaflip must negate the luma of some images, not of all"
    grey = torch.full([2, 3, 4, 4], 0.3)
    torch.testing.assert_close(AugmentPipe(hue=1, saturation=1, p=1.0)(grey), grey)


def test_probability_scales_how_often_transforms_apply():
    torch.manual_seed(4)
    x = images(batch=400, size=4)
    y = AugmentPipe(brightness=1, p=0.25)(x)
    changed = ((y - x).abs().flatten(1).max(dim=1).values > 1e-6).float().mean().item()
    assert changed == pytest.approx(0.25, abs=0.07)


@pytest.mark.parametrize("channels", [1, 3])
def test_full_pipeline_keeps_shape_and_is_differentiable_twice(channels):
    torch.manual_seed(5)
    x = images(batch=4, channels=channels).requires_grad_(True)
    y = AugmentPipe.bgc(p=0.8)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert grad.abs().sum() > 0
    (second,) = torch.autograd.grad(grad.square().sum(), x)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_pipeline_gradient_matches_finite_differences():
    x = images(batch=2, size=6).double().requires_grad_(True)
    pipe = AugmentPipe.bgc(p=0.9)

    def seeded(t):
        torch.manual_seed(6)  # the same transforms at every evaluation
        return pipe(t)

    assert torch.autograd.gradcheck(seeded, (x,), eps=1e-6, atol=1e-5)


def test_diffaugment_translation_and_cutout_do_what_they_say():
    torch.manual_seed(7)
    ones = torch.ones(8, 3, 16, 16)
    cut = DiffAugment("cutout")(ones)
    assert ((cut == 0).flatten(1).sum(dim=1) == 3 * 8 * 8).all()
    x = images(batch=8, size=16)
    moved = DiffAugment("translation")(x)
    for n in range(8):
        found = any(torch.equal(moved[n, :, 4:-4, 4:-4],
                                torch.roll(x[n], (dy, dx), dims=(1, 2))[:, 4:-4, 4:-4])
                    for dy in range(-2, 3) for dx in range(-2, 3))
        assert found
    zero_rows = (moved.abs().sum(dim=(1, 3)) == 0).any(dim=1)
    assert zero_rows.any(), "translated-in borders must be zero-filled"


def test_diffaugment_is_differentiable_and_colour_changes_every_image():
    torch.manual_seed(8)
    x = images(batch=4).requires_grad_(True)
    y = DiffAugment()(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    coloured = DiffAugment("color")(x.detach())
    assert not torch.isclose(coloured, x.detach()).flatten(1).all(dim=1).any()


def test_bad_arguments_raise_errors_naming_them():
    with pytest.raises(ValueError, match="policy"):
        DiffAugment("color,blur")
    with pytest.raises(ValueError, match="images"):
        AugmentPipe.bgc(p=0.5)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        AugmentPipe(brightness=1, p=0.5)(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="p"):
        AugmentPipe.bgc(p=2.0)(torch.zeros(2, 3, 8, 8))
    assert set(ADA_BGC) == {"xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
                            "brightness", "contrast", "lumaflip", "hue", "saturation"}


# ---- grid_sample: twice differentiable w.r.t. the images on every torch version -------------

MODES = ("bilinear", "nearest", "bicubic")
PADDINGS = ("zeros", "border", "reflection")


def _sampling_matrices(grid, height, width, **options):
    """Per sample, the float64 matrix [Ho*Wo, H*W] of the (linear) sampling, read off the forward
    pass on one-hot images: an independent reference whose derivatives are matrix products."""
    basis = torch.eye(height * width, dtype=torch.float64).reshape(-1, 1, height, width)
    matrices = []
    for g in grid.detach().cpu().double():
        out = F.grid_sample(basis, g.expand(height * width, *g.shape), **options)
        matrices.append(out.reshape(height * width, -1).T)
    return torch.stack(matrices)


def _sample_with_matrices(x, matrices, out_size):
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).transpose(1, 2)  # [N, H*W, C]
    return (matrices @ flat).transpose(1, 2).reshape(n, c, *out_size)


def _r1_and_its_gradients(sample, x, weight):
    """R1 of a small curved 'discriminator' on sample(x), then d(R1)/dx and d(R1)/dweight."""
    logits = (torch.tanh(sample(x)) * weight).sum(dim=[1, 2, 3])
    (first,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    penalty = first.square().sum()
    second_x, second_w = torch.autograd.grad(penalty, [x, weight])
    return first.detach(), second_x, second_w


def _sampling_case(dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    # odd sizes; the images non-contiguous (a transposed view); positions up to 20% outside
    x = torch.randn(2, 3, 7, 5, generator=generator).transpose(2, 3)
    grid = (torch.rand(2, 4, 6, 2, generator=generator) * 2.4 - 1.2)
    weight = torch.randn(3, 4, 6, generator=generator)
    return (x.to(device, dtype), grid.to(device, dtype), weight.to(device, dtype))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grid_sample_first_and_second_gradients_match_the_sampling_matrix(
        dtype, mode, padding_mode, align_corners):
    options = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    x, grid, weight = _sampling_case(dtype)
    assert not x.is_contiguous()
    matrices = _sampling_matrices(grid, 5, 7, **options)
    ours = _r1_and_its_gradients(lambda t: grid_sample(t, grid, **options),
                                 x.clone().requires_grad_(True), weight.clone().requires_grad_(True))
    truth = _r1_and_its_gradients(lambda t: _sample_with_matrices(t, matrices, (4, 6)),
                                  x.double().requires_grad_(True),
                                  weight.double().requires_grad_(True))
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for name, got, want in zip(("dR1/dx is the R1 gradient", "d2/dx2", "d2/dxdweight"),
                               ours, truth):
        assert got.dtype == dtype, name
        assert want.abs().sum() > 0, name  # the case really exercises this derivative
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=tolerance,
                                   atol=tolerance * scale, msg=name)
    forward = grid_sample(x, grid, **options)
    torch.testing.assert_close(forward, F.grid_sample(x, grid, **options), rtol=0, atol=0)


@pytest.mark.parametrize("mode,padding_mode", [("bilinear", "reflection"), ("nearest", "zeros"),
                                               ("bicubic", "border")])
def test_grid_sample_passes_numerical_gradient_and_gradgrad_checks(mode, padding_mode):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 2, 3, 2, generator=generator, dtype=torch.float64) * 2.2 - 1.1

    def sample(t):
        return grid_sample(t, grid, mode=mode, padding_mode=padding_mode, align_corners=False)

    assert torch.autograd.gradcheck(sample, (x,))
    assert torch.autograd.gradgradcheck(sample, (x,))


def test_grid_sample_first_gradients_match_torch_for_images_and_a_grid_that_needs_one():
    x, grid, _ = _sampling_case(torch.float32, seed=2)
    for wants_grid_grad in (False, True):
        ours_x = x.clone().requires_grad_(True)
        torch_x = x.clone().requires_grad_(True)
        ours_g = grid.clone().requires_grad_(wants_grid_grad)
        torch_g = grid.clone().requires_grad_(wants_grid_grad)
        out = torch.randn(2, 3, 4, 6)
        (grid_sample(ours_x, ours_g, padding_mode="reflection") * out).sum().backward()
        (F.grid_sample(torch_x, torch_g, padding_mode="reflection", align_corners=False)
         * out).sum().backward()
        torch.testing.assert_close(ours_x.grad, torch_x.grad, rtol=1e-6, atol=1e-6)
        if wants_grid_grad:
            torch.testing.assert_close(ours_g.grad, torch_g.grad, rtol=1e-6, atol=1e-6)


def _graph_node_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_r1_through_the_pipeline_does_not_need_torchs_grid_sample_double_backward():
    # torch 2.11 has no derivative for aten::grid_sampler_2d_backward (newer versions do): the
    # R1 graph must hold our adjoint, never torch's grid-sampler backward node.
    torch.manual_seed(5)
    x = images(batch=2).requires_grad_(True)
    y = AugmentPipe(rotate=1, p=1.0)(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    names = _graph_node_names(grad)
    assert not any(name.startswith("GridSampler2DBackward") for name in names), names
    assert any("GridSampleAdjoint" in name for name in names), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grid_sample_second_gradients_on_a_gpu_match_the_float64_sampling_matrix(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (the CUDA grid sampler and its half precision)")
    x, grid, weight = _sampling_case(dtype, device="cuda", seed=3)
    matrices = _sampling_matrices(grid, 5, 7, mode="bilinear", padding_mode="reflection",
                                  align_corners=False)
    ours = _r1_and_its_gradients(lambda t: grid_sample(t, grid, padding_mode="reflection"),
                                 x.clone().requires_grad_(True), weight.clone().requires_grad_(True))
    truth = _r1_and_its_gradients(lambda t: _sample_with_matrices(t, matrices, (4, 6)),
                                  x.cpu().double().requires_grad_(True),
                                  weight.cpu().double().requires_grad_(True))
    # half: the inputs, grid and every intermediate are rounded to 11 bits
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(ours, truth):
        assert got.dtype == dtype and got.is_cuda
        scale = want.abs().max().item()
        torch.testing.assert_close(got.cpu().double(), want, rtol=tolerance,
                                   atol=tolerance * scale)


def test_grid_sample_rejects_bad_arguments_by_name():
    x, grid = torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 4, 2)
    with pytest.raises(ValueError, match="mode"):
        grid_sample(x, grid, mode="area")
    with pytest.raises(ValueError, match="padding_mode"):
        grid_sample(x, grid, padding_mode="circular")
    with pytest.raises(ValueError, match="input"):
        grid_sample(x[0], grid)
    with pytest.raises(ValueError, match="grid"):
        grid_sample(x, grid[:1])
