"""The StyleGAN2 mapping network: z (and an embedded label) to the intermediate latent w."""
from __future__ import annotations

import torch

from batikfast.networks.layers import FullyConnectedLayer, normalize_2nd_moment


class MappingNetwork(torch.nn.Module):
    """``z -> w`` through ``num_layers`` fully connected layers at a low learning rate.

    z and the embedded label are each normalised to unit second moment and concatenated.
    In training mode the running mean ``w_avg`` is tracked for the truncation trick.
    ``num_ws`` None returns [N, w_dim]; otherwise w is broadcast to [N, num_ws, w_dim].
    The discriminator uses this network (``z_dim=0``) to map its conditioning vector.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None,
                 num_layers: int = 8, embed_features: int | None = None,
                 layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995):
        super().__init__()
        if z_dim == 0 and c_dim == 0:
            raise ValueError("MappingNetwork needs z_dim > 0 or c_dim > 0")
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                skip_w_avg_update: bool = False) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            _check_input("z", z, self.z_dim)
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            _check_input("c", c, self.c_dim)
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            if self.num_ws is not None:
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or self.w_avg_beta is None:
                raise ValueError("truncation needs a mapping network that tracks w_avg")
            if truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff],
                                                           truncation_psi)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, " \
               f"num_ws={self.num_ws}"


def _check_input(name: str, value, features: int) -> None:
    if value is None or value.ndim != 2 or value.shape[1] != features:
        shape = None if value is None else tuple(value.shape)
        raise ValueError(f"{name} must have shape [N, {features}], got {shape}")
