"""The StyleGAN2 generator: mapping network plus synthesis network (skip architecture).

The synthesis layers run on ``ops.modulated_conv2d`` with the fused epilogue (noise, bias,
leaky ReLU, gain, clamp in the convolution's pass), so every backend serves the generator.
Constructor arguments and parameter names are NVIDIA's StyleGAN2-ADA ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from batikfast import ops
from batikfast.networks.layers import (RESAMPLE_FILTER, Conv2dLayer, FullyConnectedLayer,
                                       reduced_precision_dtype)
from batikfast.networks.mapping import MappingNetwork

NOISE_MODES = ("random", "const", "none")
ARCHITECTURES = ("orig", "skip", "resnet")


def _check_resolution(img_resolution: int) -> int:
    log2 = int(np.log2(img_resolution)) if img_resolution > 0 else 0
    if img_resolution < 4 or 2 ** log2 != img_resolution:
        raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
    return log2


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution (optionally up-sampling by 2) + noise + bias + lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 activation: str = "lrelu", resample_filter=RESAMPLE_FILTER,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ops.ACTIVATIONS[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                fused_modconv: bool = True, gain: float = 1.0) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution],
                                device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.modulated_conv2d(
            x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
            resample_filter=self.resample_filter, flip_weight=(self.up == 1),
            fused_modconv=fused_modconv, bias=self.bias.to(x.dtype), act=self.activation,
            gain=self.act_gain * gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, " \
               f"resolution={self.resolution}, up={self.up}"


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution without demodulation, to image channels."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        # Bias and clamp in the convolution's epilogue: one kernel on the fast paths.
        return ops.modulated_conv2d(x, self.weight, styles, demodulate=False,
                                    fused_modconv=fused_modconv, bias=self.bias.to(x.dtype),
                                    act="linear", clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: (const or up-sampling conv), conv, ToRGB."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, architecture: str = "skip",
                 resample_filter=RESAMPLE_FILTER, conv_clamp: float | None = None,
                 use_fp16: bool = False, mixed_precision_dtype: torch.dtype = torch.float16,
                 **layer_kwargs):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision_dtype = reduced_precision_dtype(mixed_precision_dtype)
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim,
                                        resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim,
                                    resolution=resolution, conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim,
                                    conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(self, x, img, ws, force_fp32: bool = False, fused_modconv: bool | None = None,
                **layer_kwargs):
        if ws.ndim != 3 or ws.shape[1] != self.num_conv + self.num_torgb:
            raise ValueError(f"ws must have shape [N, {self.num_conv + self.num_torgb}, "
                             f"{self.w_dim}], got {tuple(ws.shape)}")
        w_iter = iter(ws.unbind(dim=1))
        dtype = self.mixed_precision_dtype if self.use_fp16 and not force_fp32 else torch.float32
        if fused_modconv is None:
            # NVIDIA's choice for the reference path; the fast paths compute the same either way.
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5),
                           **layer_kwargs)
            x = y + x
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        if img is not None:
            img = ops.upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}, " \
               f"use_fp16={self.use_fp16}"


class SynthesisNetwork(torch.nn.Module):
    """w [N, num_ws, w_dim] to an image [N, img_channels, img_resolution, img_resolution]."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int,
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 **block_kwargs):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = log2
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            is_last = res == img_resolution
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last,
                                   use_fp16=(res >= fp16_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, **block_kwargs) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], "
                             f"got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, **block_kwargs)
        return img


class Generator(torch.nn.Module):
    """``G(z, c) -> img``: mapping network then synthesis network.

    Synthesis options (``channel_base``, ``channel_max``, ``num_fp16_res``, ``conv_clamp``,
    ``mixed_precision_dtype``, ``architecture``) may come as keywords or, as NVIDIA's
    pickles store them, in ``synthesis_kwargs``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int,
                 img_channels: int, mapping_kwargs: dict | None = None,
                 synthesis_kwargs: dict | None = None, **more_synthesis_kwargs):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        synthesis_kwargs = {**(synthesis_kwargs or {}), **more_synthesis_kwargs}
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution,
                                          img_channels=img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim,
                                      num_ws=self.num_ws, **(mapping_kwargs or {}))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi,
                          truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)
