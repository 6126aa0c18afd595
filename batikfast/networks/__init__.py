"""StyleGAN2 networks with NVIDIA's constructor arguments and parameter names.

``Generator`` (mapping + synthesis), the t-conditioned ``Discriminator`` of Diffusion-GAN, and
``load_nvidia`` that converts NVIDIA StyleGAN2-ADA / Diffusion-GAN network pickles without
running their embedded code.
"""
from batikfast.networks.discriminator import (Discriminator, DiscriminatorBlock,
                                              DiscriminatorEpilogue, MinibatchStdLayer)
from batikfast.networks.generator import (Generator, SynthesisBlock, SynthesisLayer,
                                          SynthesisNetwork, ToRGBLayer)
from batikfast.networks.layers import Conv2dLayer, FullyConnectedLayer, normalize_2nd_moment
from batikfast.networks.mapping import MappingNetwork
from batikfast.networks.nvidia import load_nvidia

__all__ = [
    "Conv2dLayer", "Discriminator", "DiscriminatorBlock", "DiscriminatorEpilogue",
    "FullyConnectedLayer", "Generator", "MappingNetwork", "MinibatchStdLayer",
    "SynthesisBlock", "SynthesisLayer", "SynthesisNetwork", "ToRGBLayer",
    "load_nvidia", "normalize_2nd_moment",
]
