"""Pluggable feature networks for the metrics, loaded from a file the user gives; never downloaded.

Two kinds of file load:

* a batikfast feature file: ``torch.save({"arch": "batikfast.SmallFeatureNet", "config": {...},
  "state_dict": {...}})``, read with ``torch.load(weights_only=True)`` into :class:`SmallFeatureNet`
  (a small known architecture; tests build and train nothing, they just save one);
* a TorchScript file, such as NVIDIA's ``inception-2015-12-05.pt`` (the InceptionV3 of the
  reference FID): it is called as NVIDIA's metrics call it, ``net(images, return_features=True)``
  with float images in [0, 255], and resizes to 299x299 itself. TorchScript holds no Python code
  to execute; it is the one way to use Inception weights here.

Every network is wrapped in :class:`FeatureExtractor`, which takes ``uint8`` images ``[N, C, H, W]``
(what the datasets give, and what generator outputs are quantised to) and returns float32 features.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_ARCH = "batikfast.SmallFeatureNet"


class FeatureNetworkError(ValueError):
    """The feature network file cannot be used; the message says why."""


class SmallFeatureNet(nn.Module):
    """Convolutions with ReLU and 2x average pooling, then a global average: features ``[N, C]``."""

    def __init__(self, in_channels: int = 3, channels=(16, 32, 64), resolution: int = 32):
        super().__init__()
        self.config = dict(in_channels=int(in_channels), channels=[int(c) for c in channels],
                           resolution=int(resolution))
        layers, previous = [], in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            previous = width
        self.body = nn.Sequential(*layers)
        self.resolution = int(resolution)
        self.feature_dim = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))

    def save(self, path) -> None:
        torch.save({"arch": SMALL_ARCH, "config": self.config, "state_dict": self.state_dict()},
                   path)


class FeatureExtractor:
    """``uint8`` images ``[N, C, H, W]`` -> float32 features ``[N, D]`` (no gradients)."""

    def __init__(self, net: nn.Module, kind: str, device: torch.device):
        self.net, self.kind, self.device = net.eval().to(device), kind, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.to(self.device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = images.to(torch.float32)
        if self.kind == "torchscript":
            try:
                features = self.net(x, return_features=True)
            except (RuntimeError, TypeError):
                features = self.net(x)
        else:
            x = x / 127.5 - 1
            size = self.net.resolution
            if x.shape[2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)
            features = self.net(x)
        return features.reshape(features.shape[0], -1).to(torch.float32)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl"))
                   for name in archive.namelist())


def load_feature_network(path, device="cpu") -> FeatureExtractor:
    """Load the feature network in ``path`` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"feature network {str(path)!r} does not exist. batikfast never downloads weights: "
            "give a TorchScript InceptionV3 (e.g. NVIDIA's inception-2015-12-05.pt) or a "
            "batikfast SmallFeatureNet file")
    if _is_torchscript(path):
        return FeatureExtractor(torch.jit.load(str(path), map_location=device), "torchscript",
                                device)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"feature network {str(path)!r} is neither TorchScript nor a weights-only "
                         f"batikfast feature file: {error}") from error
    if not isinstance(payload, dict) or payload.get("arch") != SMALL_ARCH:
        raise ValueError(f"feature network {str(path)!r} has arch "
                         f"{payload.get('arch') if isinstance(payload, dict) else type(payload)!r};"
                         f" expected {SMALL_ARCH!r} or a TorchScript file")
    net = SmallFeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return FeatureExtractor(net, "small", device)
