"""The residual StyleGAN2 discriminator, conditioned on the diffusion step t.

As in Diffusion-GAN, ``t`` (the raw integer step as a float, ``t_dim`` columns) is appended to
the label ``c`` and mapped by the discriminator's mapping network; the epilogue projects its
output onto that embedding. So with ``t_dim > 0`` the discriminator always has a mapping
network, even unconditionally (``c_dim == 0``). ``t_dim=0`` gives NVIDIA's plain StyleGAN2-ADA
discriminator. Constructor arguments and parameter names are NVIDIA's.
"""
from __future__ import annotations

import numpy as np
import torch

from batikfast import ops
from batikfast.networks.generator import ARCHITECTURES, _check_resolution
from batikfast.networks.layers import (RESAMPLE_FILTER, Conv2dLayer, FullyConnectedLayer,
                                       reduced_precision_dtype)
from batikfast.networks.mapping import MappingNetwork


class DiscriminatorBlock(torch.nn.Module):
    """FromRGB (first block or skip architecture), conv, down-sampling conv, residual skip."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, first_layer_idx: int = 0, architecture: str = "resnet",
                 activation: str = "lrelu", resample_filter=RESAMPLE_FILTER,
                 conv_clamp: float | None = None, use_fp16: bool = False,
                 mixed_precision_dtype: torch.dtype = torch.float16):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision_dtype = reduced_precision_dtype(mixed_precision_dtype)
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.num_layers = 0
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1,
                                       activation=activation, conv_clamp=conv_clamp)
            self.num_layers += 1
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation,
                                 conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation,
                                 down=2, resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.num_layers += 2
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    resample_filter=resample_filter)

    def forward(self, x, img, force_fp32: bool = False):
        dtype = self.mixed_precision_dtype if self.use_fp16 and not force_fp32 else torch.float32
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0 or self.architecture == "skip":
            img = img.to(dtype)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = (ops.downsample2d(img, self.resample_filter)
                   if self.architecture == "skip" else None)
        if self.architecture == "resnet":
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            x = y + x
        else:
            x = self.conv1(self.conv0(x))
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}, " \
               f"use_fp16={self.use_fp16}"


class MinibatchStdLayer(torch.nn.Module):
    """Append the standard deviation across groups of the minibatch as extra channels."""

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        group = min(self.group_size, batch) if self.group_size is not None else batch
        if batch % group != 0:
            raise ValueError(f"the minibatch ({batch}) must be a multiple of the minibatch-std "
                             f"group size ({group})")
        features = self.num_channels
        y = x.reshape(group, -1, features, channels // features, height, width)
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4]).reshape(-1, features, 1, 1)
        y = y.repeat(group, 1, height, width)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(torch.nn.Module):
    """4x4 head: minibatch std, conv, fc, output (projected onto cmap when conditioned)."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4,
                 mbstd_num_channels: int = 1, activation: str = "lrelu",
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1,
                                       activation=activation)
        self.mbstd = (MinibatchStdLayer(mbstd_group_size, mbstd_num_channels)
                      if mbstd_num_channels > 0 else None)
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3,
                                activation=activation, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels,
                                      activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, img, cmap, force_fp32: bool = False):
        x = x.to(torch.float32)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


class Discriminator(torch.nn.Module):
    """``D(img, c, t) -> logits [N, 1]``; ``t`` is [N] or [N, t_dim] diffusion steps."""

    # NVIDIA's arguments in NVIDIA's order (positional calls and pickled init_args line up);
    # batikfast's additions are keyword-only.
    def __init__(self, c_dim: int, img_resolution: int, img_channels: int,
                 architecture: str = "resnet", channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, cmap_dim: int | None = None,
                 block_kwargs: dict | None = None, mapping_kwargs: dict | None = None,
                 epilogue_kwargs: dict | None = None, *, t_dim: int = 1,
                 mixed_precision_dtype: torch.dtype = torch.float16):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.label_dim = c_dim
        self.t_dim = t_dim
        # NVIDIA's Diffusion-GAN code folds t into c_dim; we keep both.
        self.c_dim = c_dim + t_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = log2
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max)
                    for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if self.c_dim == 0:
            cmap_dim = 0
        self.cmap_dim = cmap_dim
        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            in_channels = channels[res] if res < img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels[res], channels[res // 2],
                                       resolution=res, first_layer_idx=layer_idx,
                                       use_fp16=(res >= fp16_resolution),
                                       mixed_precision_dtype=mixed_precision_dtype,
                                       **(block_kwargs or {}), **common)
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if self.c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=self.c_dim, w_dim=cmap_dim, num_ws=None,
                                          w_avg_beta=None, **(mapping_kwargs or {}))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4,
                                        **(epilogue_kwargs or {}), **common)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None,
                t: torch.Tensor | None = None, **block_kwargs) -> torch.Tensor:
        expected = [self.img_channels, self.img_resolution, self.img_resolution]
        if img.ndim != 4 or list(img.shape[1:]) != expected:
            raise ValueError(f"img must have shape [N, {', '.join(map(str, expected))}], "
                             f"got {tuple(img.shape)}")
        conditioning = self._conditioning(img.shape[0], c, t)
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, **block_kwargs)
        cmap = self.mapping(None, conditioning) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)

    def _conditioning(self, batch: int, c, t):
        parts = []
        if self.label_dim > 0:
            if c is None or c.ndim != 2 or c.shape != (batch, self.label_dim):
                raise ValueError(f"c must have shape [{batch}, {self.label_dim}], "
                                 f"got {None if c is None else tuple(c.shape)}")
            parts.append(c.to(torch.float32))
        if self.t_dim > 0:
            if t is None:
                raise ValueError("t is required: this discriminator is conditioned on the "
                                 "diffusion step (t_dim > 0)")
            if t.ndim == 1:
                t = t[:, None]
            if t.shape != (batch, self.t_dim):
                raise ValueError(f"t must have shape [{batch}] or [{batch}, {self.t_dim}], "
                                 f"got {tuple(t.shape)}")
            parts.append(t.to(torch.float32))
        return torch.cat(parts, dim=1) if parts else None
