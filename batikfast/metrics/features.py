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
        channels = list(channels)
        if not all(_is_positive_int(c) for c in [in_channels, *channels]) or not channels:
            raise ValueError(f"in_channels and channels must be positive integers (at least one "
                             f"channel count), got {in_channels!r} and {channels!r}")
        if not _is_positive_int(resolution) or resolution < 2 ** len(channels):
            # each stage halves the image: fewer pixels than that leave none to pool
            raise ValueError(f"resolution must be an integer of at least 2**len(channels) = "
                             f"{2 ** len(channels)}, got {resolution!r}")
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


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class FeatureExtractor:
    """``uint8`` images ``[N, C, H, W]`` -> float32 features ``[N, D]`` (no gradients)."""

    def __init__(self, net: nn.Module, kind: str, device: torch.device):
        self.net, self.kind, self.device = net.eval().to(device), kind, torch.device(device)
        # Decided once from the signature: retrying without the flag after an error would hide
        # the error, or give Inception's class probabilities in place of its features.
        schema = getattr(getattr(net, "forward", None), "schema", None)
        self._return_features = kind == "torchscript" and schema is not None and any(
            argument.name == "return_features" for argument in schema.arguments)
        # a TorchScript net's input is not declared: it gets RGB, as NVIDIA's Inception needs
        self.in_channels = net.config["in_channels"] if kind == "small" else 3

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.to(self.device)
        if images.shape[1] == 1 and self.in_channels == 3:
            images = images.repeat(1, 3, 1, 1)  # grey as RGB, as NVIDIA's metrics feed Inception
        if self.kind == "small" and images.shape[1] != self.in_channels:
            raise ValueError(f"the feature network takes {self.in_channels}-channel images, "
                             f"got {images.shape[1]} channels")
        x = images.to(torch.float32)
        if self.kind == "torchscript":
            features = self.net(x, return_features=True) if self._return_features else self.net(x)
        else:
            x = x / 127.5 - 1
            size = self.net.resolution
            if x.shape[2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)
            features = self.net(x)
        return features.reshape(features.shape[0], -1).to(torch.float32)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in names)


def load_feature_network(path, device="cpu") -> FeatureExtractor:
    """Load the feature network in ``path`` (see the module docstring for the formats).

    Raises FileNotFoundError when there is no such file, and :class:`FeatureNetworkError`
    naming the file for every file that is not a usable feature network.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"feature network {str(path)!r} does not exist. batikfast never downloads weights: "
            "give a TorchScript InceptionV3 (e.g. NVIDIA's inception-2015-12-05.pt) or a "
            "batikfast SmallFeatureNet file")
    if not path.is_file():
        raise FeatureNetworkError(f"feature network {str(path)!r} is not a file")
    if _is_torchscript(path):
        try:
            net = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError, OSError) as error:
            raise FeatureNetworkError(f"feature network {str(path)!r} is a damaged TorchScript "
                                      f"file: {_first_line(error)}") from error
        return FeatureExtractor(net, "torchscript", device)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FeatureNetworkError(f"feature network {str(path)!r} is neither TorchScript nor a "
                                  f"weights-only batikfast feature file: {_first_line(error)}"
                                  ) from error
    if not isinstance(payload, dict) or payload.get("arch") != SMALL_ARCH:
        raise FeatureNetworkError(
            f"feature network {str(path)!r} has arch "
            f"{payload.get('arch') if isinstance(payload, dict) else type(payload)!r}; "
            f"expected {SMALL_ARCH!r} or a TorchScript file")
    try:
        config, state_dict = payload.get("config"), payload.get("state_dict")
        if not isinstance(config, dict) or not isinstance(state_dict, dict):
            raise TypeError(f"its config and state_dict must be dicts, got "
                            f"{type(config).__name__} and {type(state_dict).__name__}")
        net = SmallFeatureNet(**config)
        net.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as error:
        raise FeatureNetworkError(f"feature network {str(path)!r} is a damaged {SMALL_ARCH} "
                                  f"file: {_first_line(error)}") from error
    return FeatureExtractor(net, "small", device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError) or not text:
        text = f"{type(error).__name__} {text}".strip()
    return " ".join(text.split("\n")[:2]).strip()
