"""Argument checks shared by the ops: each error names the argument and the value it got."""
from __future__ import annotations

from typing import Sequence

import torch


def check_tensor(name: str, value, ndim: int | Sequence[int] | None = None,
                 floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            wanted = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have rank {wanted}, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def parse_scaling(name: str, value) -> tuple[int, int]:
    """An int or [x, y] factor, each >= 1."""
    factors = _pair(name, value)
    if any(f < 1 for f in factors):
        raise ValueError(f"{name} must be >= 1 on each axis, got {value!r}")
    return factors


def parse_padding(value) -> tuple[int, int, int, int]:
    """An int, [x, y] or [x0, x1, y0, y1] padding as (x0, x1, y0, y1); negative crops."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value, value, value
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 2:
            return value[0], value[0], value[1], value[1]
        if len(value) == 4:
            return tuple(value)
    raise ValueError(f"padding must be an int, [x, y] or [x0, x1, y0, y1] of ints, got {value!r}")


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value[0], value[1]
    raise ValueError(f"{name} must be an int or [x, y] of ints, got {value!r}")
