"""ADA's augmentation pipeline and DiffAugment."""
import pytest
import torch

from batikfast.augment import ADA_BGC, AugmentPipe, DiffAugment


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
    for n in range(8):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.roll(x[n], shifts=(dy, dx), dims=(1, 2))
                if torch.allclose(y[n, :, 3:-3, 3:-3], shifted[:, 3:-3, 3:-3], atol=1e-5):
                    found = True
        assert found, f"image {n} is not an integer translation of its input"


def test_colour_transforms_act_as_their_definitions():
    torch.manual_seed(3)
    x = images(batch=8)
    luma = lambda t: t.mean(dim=1)  # noqa: E731  (projection on the grey axis)
    y = AugmentPipe(brightness=1, p=1.0)(x)
    offset = (y - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)
    y = AugmentPipe(contrast=1, p=1.0)(x)
    ratio = (y / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    for kind in ("hue", "saturation"):
        y = AugmentPipe(**{kind: 1}, p=1.0)(x)
        torch.testing.assert_close(luma(y), luma(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, x, atol=1e-3)
    y = AugmentPipe(lumaflip=1, p=1.0)(x)
    for n in range(8):
        assert (torch.allclose(luma(y)[n], luma(x)[n], atol=1e-5)
                or torch.allclose(luma(y)[n], -luma(x)[n], atol=1e-5))
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
