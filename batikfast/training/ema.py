"""The exponential moving average of the generator (NVIDIA's G_ema)."""
from __future__ import annotations

import torch


def ema_beta(batch: int, cur_nimg: int, ema_kimg: float, ema_rampup: float | None) -> float:
    """Per-step decay for a half-life of ``ema_kimg`` thousand images.

    With ``ema_rampup`` the half-life is at most ``ema_rampup * cur_nimg``, so early in training
    (when G moves fast) the average follows it closely.
    """
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """``p_ema <- p + beta (p_ema - p)`` for parameters; buffers (e.g. w_avg) are copied."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)
