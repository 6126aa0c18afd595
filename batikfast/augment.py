"""Differentiable augmentations applied to real and fake images before the discriminator.

``AugmentPipe`` is ADA's pipeline (Karras et al. 2020) in its "bgc" set: x-flip, rotation by
multiples of 90 degrees, integer translation, isotropic scaling, rotation, anisotropic scaling,
fractional translation (geometric, composed into one affine map per image and applied with one
``grid_sample`` with reflection padding), then brightness, contrast, luma flip, hue rotation and
saturation (composed into one 4x4 colour matrix per image). Each transform is applied to an
image with probability ``p * strength``; ``p = 0`` returns the input unchanged. Everything is
differentiable in the images (also twice, for R1), so generator gradients flow through.
Unlike NVIDIA's pipeline, the geometric resampling is plain bilinear (no 2x supersampling with
a wavelet low-pass): simpler, slightly softer on rotations and fractional shifts.

The resampling goes through :func:`grid_sample`, not ``F.grid_sample`` directly: torch up to at
least 2.11 has no derivative for ``aten::grid_sampler_2d_backward`` (on the CPU and on GPUs), so
R1 through the augmentation would fail there; ours is twice differentiable w.r.t. the images on
every version and device.

``DiffAugment`` (Zhao et al. 2020): colour (brightness, saturation, contrast), translation by
up to 1/8 of the image with zero fill, and cutout of a half-size square, applied to every image.

In Diffusion-GAN the augmentation probability is tied to the diffusion p, capped at 0.25:
``batikfast.diffusion.Diffusion(augment_pipe=pipe)`` keeps ``pipe.p`` at that value.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INTERPOLATION = {"bilinear": 0, "nearest": 1, "bicubic": 2}  # aten's enum values
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """``F.grid_sample`` on 4-D input, differentiable any number of times w.r.t. ``input``.

    Args:
        input: images ``[N, C, H, W]`` (float32, float16 on GPUs, bfloat16, float64).
        grid: sampling positions ``[N, Ho, Wo, 2]`` in [-1, 1] (x, y), as for ``F.grid_sample``;
            cast to ``input``'s dtype.
        mode: ``"bilinear"``, ``"nearest"`` or ``"bicubic"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        align_corners: as for ``F.grid_sample``.

    Returns ``[N, C, Ho, Wo]``, the same values as ``F.grid_sample``.

    The output is linear in ``input``: the gradient w.r.t. ``input`` is the adjoint sampling
    (``aten::grid_sampler_2d_backward``), and the derivative of that adjoint w.r.t. its incoming
    gradient is the forward sampling again, which is how the double backward (R1) is built.
    Second-order gradients w.r.t. ``grid`` are not provided: when ``grid`` requires a gradient
    this calls ``F.grid_sample`` itself (exact first-order gradients for both arguments; its
    double backward is whatever the installed torch offers, absent up to at least 2.11).
    """
    if mode not in _INTERPOLATION:
        raise ValueError(f"mode must be one of {tuple(_INTERPOLATION)}, got {mode!r}")
    if padding_mode not in _PADDING:
        raise ValueError(f"padding_mode must be one of {tuple(_PADDING)}, got {padding_mode!r}")
    if input.ndim != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {tuple(input.shape)}")
    if grid.ndim != 4 or grid.shape[0] != input.shape[0] or grid.shape[3] != 2:
        raise ValueError(f"grid must be [N, Ho, Wo, 2] with N = {input.shape[0]}, got shape "
                         f"{tuple(grid.shape)}")
    grid = grid.to(input.dtype)
    if grid.requires_grad and torch.is_grad_enabled():
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode,
                             align_corners=align_corners)
    return _GridSample.apply(input, grid, _INTERPOLATION[mode], _PADDING[padding_mode],
                             bool(align_corners))


_MODE_NAMES = {value: name for name, value in _INTERPOLATION.items()}
_PADDING_NAMES = {value: name for name, value in _PADDING.items()}


class _GridSample(torch.autograd.Function):
    """input -> sampled output; ``grid`` is a constant (it never requires a gradient here)."""

    @staticmethod
    def forward(ctx, input, grid, mode, padding, align_corners):
        ctx.save_for_backward(input, grid)
        ctx.modes = (mode, padding, align_corners)
        return F.grid_sample(input, grid, mode=_MODE_NAMES[mode],
                             padding_mode=_PADDING_NAMES[padding], align_corners=align_corners)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("batikfast.augment.grid_sample: gradients w.r.t. grid go through "
                               "F.grid_sample (grid must require grad before the call)")
        input, grid = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = _GridSampleAdjoint.apply(grad_output, input, grid, *ctx.modes)
        return grad_input, None, None, None, None


class _GridSampleAdjoint(torch.autograd.Function):
    """grad_output -> grad_input, the adjoint of the sampling; ``input`` only gives the shape."""

    @staticmethod
    def forward(ctx, grad_output, input, grid, mode, padding, align_corners):
        ctx.save_for_backward(grid)
        ctx.modes = (mode, padding, align_corners)
        # Under autocast the forward may have run in float32 on half inputs: the adjoint runs in
        # the input's dtype so that its result matches the input.
        grad_input, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad_output.to(input.dtype), input, grid, mode, padding, align_corners,
            [True, False])
        return grad_input

    @staticmethod
    def backward(ctx, grad_grad_input):
        (grid,) = ctx.saved_tensors
        grad_grad_output = None
        if ctx.needs_input_grad[0]:
            # The adjoint is linear in grad_output; its own adjoint is the forward sampling.
            grad_grad_output = _GridSample.apply(grad_grad_input, grid, *ctx.modes)
        # The adjoint does not depend on input's values, and grid is a constant.
        return grad_grad_output, None, None, None, None, None


ADA_BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1,
               contrast=1, lumaflip=1, hue=1, saturation=1)


def _eye(batch, size, device):
    return torch.eye(size, device=device).repeat(batch, 1, 1)


def _matrix(rows, device):
    """Stack per-sample entries (tensors [N] or numbers) into [N, len(rows), len(rows[0])]."""
    batch = next(e.shape[0] for row in rows for e in row if isinstance(e, torch.Tensor))
    entries = [[e if isinstance(e, torch.Tensor) else torch.full([batch], float(e), device=device)
                for e in row] for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def _translate2d(tx, ty, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device)


def _scale2d(sx, sy, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device)


def _rotate2d(angle, device):
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], device)


def _translate3d(tx, ty, tz, device):
    return _matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]], device)


def _scale3d(sx, sy, sz, device):
    return _matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]], device)


def _rotate3d(axis, angle, device):
    """Rotation about the unit ``axis`` [3] by ``angle`` [N] (Rodrigues' formula)."""
    x, y, z = (float(a) for a in axis)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one_minus = 1 - cos
    return _matrix([
        [x * x * one_minus + cos, x * y * one_minus - z * sin, x * z * one_minus + y * sin, 0],
        [y * x * one_minus + z * sin, y * y * one_minus + cos, y * z * one_minus - x * sin, 0],
        [z * x * one_minus - y * sin, z * y * one_minus + x * sin, z * z * one_minus + cos, 0],
        [0, 0, 0, 1]], device)


class AugmentPipe(torch.nn.Module):
    """ADA's augmentation pipeline; arguments are NVIDIA's (strengths and ranges).

    ``p`` (a float attribute) is the overall probability multiplier, adapted by the training
    loop or tied to the diffusion p. ``AugmentPipe.bgc()`` enables the standard set.
    """

    def __init__(self, xflip=0, rotate90=0, xint=0, xint_max=0.125, scale=0, rotate=0, aniso=0,
                 xfrac=0, scale_std=0.2, rotate_max=1, aniso_std=0.2, xfrac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
                 contrast_std=0.5, hue_max=1, saturation_std=1, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        self.xflip, self.rotate90, self.xint, self.xint_max = xflip, rotate90, xint, xint_max
        self.scale, self.rotate, self.aniso, self.xfrac = scale, rotate, aniso, xfrac
        self.scale_std, self.rotate_max = scale_std, rotate_max
        self.aniso_std, self.xfrac_std = aniso_std, xfrac_std
        self.brightness, self.contrast, self.lumaflip = brightness, contrast, lumaflip
        self.hue, self.saturation = hue, saturation
        self.brightness_std, self.contrast_std = brightness_std, contrast_std
        self.hue_max, self.saturation_std = hue_max, saturation_std

    @classmethod
    def bgc(cls, **overrides) -> "AugmentPipe":
        """The pipeline StyleGAN2-ADA trains with by default (blit, geometric, colour)."""
        return cls(**{**ADA_BGC, **overrides})

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {self.p}")
        if self.p == 0:
            return images
        geometric = (self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso,
                     self.xfrac)
        if any(strength > 0 for strength in geometric):
            images = self._geometric(images)
        colour = (self.brightness, self.contrast, self.lumaflip, self.hue, self.saturation)
        if any(strength > 0 for strength in colour):
            images = self._colour(images)
        return images

    def _chosen(self, strength, batch, device, probability=None):
        """A per-sample 0/1 float mask: apply the transform with probability p * strength."""
        probability = self.p * strength if probability is None else probability
        return (torch.rand([batch], device=device) < probability).float()

    def _geometric(self, images):
        batch, _, height, width = images.shape
        device = images.device
        # Inverse map (output pixel -> input pixel), centred pixel units, composed left to right.
        g_inv = _eye(batch, 3, device)
        if self.xflip > 0:
            flip = torch.randint(2, [batch], device=device)
            flip = flip * self._chosen(self.xflip, batch, device)
            g_inv = g_inv @ _scale2d(1 - 2 * flip, 1, device)
        if self.rotate90 > 0:
            quarter = torch.randint(4, [batch], device=device) * self._chosen(self.rotate90, batch,
                                                                              device)
            g_inv = g_inv @ _rotate2d(-math.pi / 2 * quarter, device)
        if self.xint > 0:
            shift = (torch.rand([batch, 2], device=device) * 2 - 1) * self.xint_max
            shift = shift * self._chosen(self.xint, batch, device)[:, None]
            g_inv = g_inv @ _translate2d(-torch.round(shift[:, 0] * width),
                                         -torch.round(shift[:, 1] * height), device)
        if self.scale > 0:
            factor = torch.exp2(torch.randn([batch], device=device) * self.scale_std)
            factor = torch.lerp(torch.ones_like(factor), factor,
                                self._chosen(self.scale, batch, device))
            g_inv = g_inv @ _scale2d(1 / factor, 1 / factor, device)
        # Rotation is tried twice (around the anisotropic scaling) with a probability that
        # makes "at least one rotation" happen with probability p * rotate.
        rotate_probability = 1 - math.sqrt(max(1 - self.rotate * self.p, 0))
        if self.rotate > 0:
            angle = (torch.rand([batch], device=device) * 2 - 1) * math.pi * self.rotate_max
            angle = angle * self._chosen(None, batch, device, rotate_probability)
            g_inv = g_inv @ _rotate2d(-angle, device)
        if self.aniso > 0:
            factor = torch.exp2(torch.randn([batch], device=device) * self.aniso_std)
            factor = torch.lerp(torch.ones_like(factor), factor,
                                self._chosen(self.aniso, batch, device))
            g_inv = g_inv @ _scale2d(1 / factor, factor, device)
        if self.rotate > 0:
            angle = (torch.rand([batch], device=device) * 2 - 1) * math.pi * self.rotate_max
            angle = angle * self._chosen(None, batch, device, rotate_probability)
            g_inv = g_inv @ _rotate2d(-angle, device)
        if self.xfrac > 0:
            shift = torch.randn([batch, 2], device=device) * self.xfrac_std
            shift = shift * self._chosen(self.xfrac, batch, device)[:, None]
            g_inv = g_inv @ _translate2d(-shift[:, 0] * width, -shift[:, 1] * height, device)
        return _resample(images, g_inv)

    def _colour(self, images):
        batch, channels = images.shape[:2]
        if channels not in (1, 3):
            raise ValueError(f"colour augmentation needs 1 or 3 image channels, got {channels}")
        device = images.device
        c = _eye(batch, 4, device)
        # Built on the device without a host copy (a copy would synchronise with the GPU).
        luma_axis = torch.cat([torch.full([3], 1 / math.sqrt(3), device=device),
                               torch.zeros([1], device=device)])
        luma_outer = torch.outer(luma_axis, luma_axis)
        if self.brightness > 0:
            offset = torch.randn([batch], device=device) * self.brightness_std
            offset = offset * self._chosen(self.brightness, batch, device)
            c = _translate3d(offset, offset, offset, device) @ c
        if self.contrast > 0:
            factor = torch.exp2(torch.randn([batch], device=device) * self.contrast_std)
            factor = torch.lerp(torch.ones_like(factor), factor,
                                self._chosen(self.contrast, batch, device))
            c = _scale3d(factor, factor, factor, device) @ c
        if self.lumaflip > 0:
            flip = torch.randint(2, [batch], device=device) * self._chosen(self.lumaflip, batch,
                                                                           device)
            c = (torch.eye(4, device=device) - 2 * luma_outer * flip[:, None, None]) @ c
        if self.hue > 0 and channels > 1:
            angle = (torch.rand([batch], device=device) * 2 - 1) * math.pi * self.hue_max
            angle = angle * self._chosen(self.hue, batch, device)
            c = _rotate3d([1 / math.sqrt(3)] * 3, angle, device) @ c
        if self.saturation > 0 and channels > 1:
            factor = torch.exp2(torch.randn([batch], device=device) * self.saturation_std)
            factor = torch.lerp(torch.ones_like(factor), factor,
                                self._chosen(self.saturation, batch, device))
            c = (luma_outer + (torch.eye(4, device=device) - luma_outer)
                 * factor[:, None, None]) @ c
        return _apply_colour_matrix(images, c)


def _resample(images, g_inv):
    """Sample ``images`` at ``g_inv`` applied to every output pixel (bilinear, reflection)."""
    batch, _, height, width = images.shape
    # theta = diag(2/W, 2/H, 1) @ g_inv @ diag(W/2, H/2, 1), written out so that no constant
    # tensor has to be copied to the device.
    rows = torch.stack([g_inv[:, 0] * (2.0 / width), g_inv[:, 1] * (2.0 / height)], dim=1)
    theta = torch.stack([rows[:, :, 0] * (width / 2.0), rows[:, :, 1] * (height / 2.0),
                         rows[:, :, 2]], dim=2)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                       align_corners=False)


def _apply_colour_matrix(images, c):
    batch, channels, height, width = images.shape
    c = c.to(images.dtype)
    if channels == 3:
        flat = images.reshape(batch, 3, height * width)
        flat = c[:, :3, :3] @ flat + c[:, :3, 3:]
        return flat.reshape(batch, 3, height, width)
    # One channel: the luma response of the colour matrix, as NVIDIA's pipeline does.
    gain = c[:, :3, :3].mean(dim=[1, 2]).reshape(batch, 1, 1, 1)
    offset = c[:, :3, 3].mean(dim=1).reshape(batch, 1, 1, 1)
    return images * gain + offset


class DiffAugment(torch.nn.Module):
    """Differentiable augmentation of Zhao et al.: ``policy`` is a comma-separated subset of
    ``color, translation, cutout``, each applied to every image."""

    POLICIES = ("color", "translation", "cutout")

    def __init__(self, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5):
        super().__init__()
        self.policy = [name.strip() for name in policy.split(",") if name.strip()]
        for name in self.policy:
            if name not in self.POLICIES:
                raise ValueError(f"policy entries must be among {self.POLICIES}, got {name!r}")
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy)}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        for name in self.policy:
            images = getattr(self, f"_{name}")(images)
        return images

    @staticmethod
    def _color(x):
        batch, device = x.shape[0], x.device
        x = x + (torch.rand([batch, 1, 1, 1], device=device, dtype=x.dtype) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand([batch, 1, 1, 1], device=device, dtype=x.dtype) * 2) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (torch.rand([batch, 1, 1, 1], device=device, dtype=x.dtype)
                             + 0.5) + mean

    def _translation(self, x):
        batch, _, height, width = x.shape
        device = x.device
        max_y = int(height * self.translation_ratio + 0.5)
        max_x = int(width * self.translation_ratio + 0.5)
        shift_y = torch.randint(-max_y, max_y + 1, [batch, 1, 1], device=device)
        shift_x = torch.randint(-max_x, max_x + 1, [batch, 1, 1], device=device)
        # Index into a one-pixel zero border: sources outside the image read zeros.
        rows = torch.arange(height, device=device)[None, :, None] + shift_y + 1
        cols = torch.arange(width, device=device)[None, None, :] + shift_x + 1
        rows, cols = rows.clamp(0, height + 1), cols.clamp(0, width + 1)
        padded = F.pad(x, [1, 1, 1, 1])
        samples = torch.arange(batch, device=device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2)

    def _cutout(self, x):
        batch, _, height, width = x.shape
        device = x.device
        cut_h = int(height * self.cutout_ratio + 0.5)
        cut_w = int(width * self.cutout_ratio + 0.5)
        top = torch.randint(0, height - cut_h + 1, [batch, 1, 1], device=device)
        left = torch.randint(0, width - cut_w + 1, [batch, 1, 1], device=device)
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        inside = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
        return x * (~inside).to(x.dtype)[:, None]
