"""Building blocks shared by the generator and the discriminator.

Every layer uses the equalised learning rate of StyleGAN: weights are stored with unit
variance and scaled by ``1 / sqrt(fan_in)`` (times ``lr_multiplier``) at run time, so Adam's
step size means the same for every layer. Parameter and buffer names are NVIDIA's
(``weight``, ``bias``, ``resample_filter``), so their state dicts map onto ours 1:1.
"""
from __future__ import annotations

import math

import torch

from batikfast import ops

RESAMPLE_FILTER = (1, 3, 3, 1)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square along ``dim`` (the mapping network's input)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def reduced_precision_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"mixed_precision_dtype must be torch.float16 or torch.bfloat16, "
                         f"got {dtype}")
    return dtype


class FullyConnectedLayer(torch.nn.Module):
    """``act(x @ (weight * gain).T + bias * lr_multiplier)`` with equalised learning rate."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = (torch.nn.Parameter(torch.full([out_features], float(bias_init)))
                     if bias else None)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_gain
        bias = self.bias
        if bias is not None:
            bias = bias.to(x.dtype)
            if self.bias_gain != 1:
                bias = bias * self.bias_gain
        if self.activation == "linear" and bias is not None:
            return torch.addmm(bias.unsqueeze(0), x, weight.t())
        return ops.bias_act(x.matmul(weight.t()), bias, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"activation={self.activation}"


class Conv2dLayer(torch.nn.Module):
    """Convolution with optional FIR up/down-sampling, bias, activation and clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 resample_filter=RESAMPLE_FILTER, conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = ops.ACTIVATIONS[activation].def_gain
        self.weight = torch.nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        weight = self.weight * self.weight_gain
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        # NVIDIA's up-sampling convolution is a true (flipped) convolution; keep it for
        # weight compatibility.
        x = ops.conv2d_resample(x, weight.to(x.dtype), f=self.resample_filter, up=self.up,
                                down=self.down, padding=self.padding,
                                flip_weight=(self.up == 1))
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, bias, act=self.activation, gain=self.act_gain * gain,
                            clamp=act_clamp)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, " \
               f"activation={self.activation}, up={self.up}, down={self.down}"
